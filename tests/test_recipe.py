"""The recipe as the paper's reference library runs it: alternating optimization with beta = 1 and no
second codebook step, dead-code replacement checked every step, residual stages without unit-norm
codes, the VQ-loss weight of the paper's presets, and an EMA that never mixes two codebooks."""
import pytest
import torch
from conftest import ROOT, TINY_DATA, run_script

from core.checkpoint import load_checkpoint
from tokenizer import VQ_VARIANTS, VectorQuant, VQConfig
from tokenizer.config import OPT

SGD = lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)  # noqa: E731


def test_alternating_optimization_refuses_beta_below_one():
    with pytest.raises(ValueError, match="beta = 1"):
        VectorQuant(8, 16, inplace_optimizer=SGD, beta=0.98)
    with pytest.raises(ValueError, match="beta=1"):
        VQConfig(inplace_lr=50.0, beta=0.98)
    VQConfig(inplace_lr=50.0, beta=1.0)  # the reference's setting is accepted


@pytest.mark.parametrize("affine", [False, True])
def test_main_objective_moves_codebook_only_by_sync_gradient(affine):
    """With the in-place step on, the VQ loss in the main objective never reaches W (the codebook took
    its step already), however it is weighted; W gets exactly nu * (sum of task gradients of its
    vectors); the affine map does learn from the codebook term."""
    torch.manual_seed(0)
    nu = 2.0
    vq = VectorQuant(6, 10, inplace_optimizer=SGD, beta=1.0, sync_nu=nu, affine_lr=2.0 if affine else 0.0)
    z = torch.randn(50, 6, requires_grad=True)
    z_q, info = vq(z)
    g = torch.randn_like(z_q)
    ((z_q * g).sum() + 5.0 * info["loss"]).backward()
    assert torch.allclose(z.grad, g)  # beta = 1: no commitment gradient, the encoder gets the task gradient
    if affine:  # the sync gradient reaches W through the affine map's scale (1 + affine_lr * s), s = 0 here
        assert vq.affine_scale.grad.abs().sum() > 0 and vq.affine_bias.grad.abs().sum() > 0
    expected = torch.zeros(10, 6).index_add_(0, info["q"], g) * nu
    assert torch.allclose(vq.codebook.weight.grad, expected, atol=1e-5)


def test_every_opt_rung_uses_beta_one_and_no_other_rung_changes_beta():
    for name, variant in VQ_VARIANTS.items():
        cfg = VQConfig(**variant)
        if cfg.inplace_lr > 0:
            assert cfg.beta == 1.0 and all(variant[k] == v for k, v in OPT.items()), name
        else:
            assert cfg.beta == VQConfig().beta, name
    # each rung adds only what the paper's rung adds
    rungs = ["baseline", "l2_replace", "affine", "opt", "opt_affine"]
    added = [set(VQ_VARIANTS[b].items()) - set(VQ_VARIANTS[a].items()) for a, b in zip(rungs, rungs[1:])]
    assert {k for k, _ in added[0]} == {"norm", "cb_norm", "replace_freq"}
    assert {k for k, _ in added[1]} == {"affine_lr"}
    assert set(VQ_VARIANTS["opt"]) - set(VQ_VARIANTS["l2_replace"]) == set(OPT)
    assert set(VQ_VARIANTS["opt_affine"]) == set(VQ_VARIANTS["opt"]) | {"affine_lr"}


def test_dead_code_replaced_after_exactly_replace_freq_idle_steps():
    """Checked every step: a code last used at step s is replaced at step s + T, never later."""
    torch.manual_seed(1)
    T = 5
    vq = VectorQuant(4, 8, replace_freq=T)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.eye(8, 4) * 10)  # codes 4..7 sit at the origin
        vq.codebook.weight[4:] = torch.tensor([[100.0, 0, 0, 0]] * 4) + torch.arange(4.0)[:, None]
    near_first = torch.tensor([[10.0, 0, 0, 0]]) + 0.01 * torch.randn(16, 4)
    vq(near_first)  # step 1: only code 0 is used
    for step in range(2, T + 1):
        before = vq.codebook.weight.detach().clone()
        vq(near_first)
        assert torch.equal(vq.codebook.weight[1:], before[1:]), f"replaced too early, at step {step}"
    before = vq.codebook.weight.detach().clone()
    vq(near_first)  # step T + 1: codes 1..7 have been idle T steps (last_used 0 = never)
    moved = (vq.codebook.weight.detach() != before).any(1)
    assert moved[1:].all() and int(vq.step) == T + 1


def test_one_replacement_event_draws_distinct_vectors():
    torch.manual_seed(2)
    vq = VectorQuant(4, 64, replace_freq=1)
    angle = torch.arange(64) * (2 * torch.pi / 64)
    z = torch.stack([angle.cos(), angle.sin(), 0 * angle, 0 * angle], 1) * 100  # spacing 10, noise ~1
    with torch.no_grad():
        vq.codebook.weight.zero_()  # all codes equal: code 0 takes all of step 1
    vq(z)
    before = vq.codebook.weight.detach().clone()
    vq(z)  # step 2: the 63 dead codes are re-seeded from this batch of 64 vectors
    moved = (vq.codebook.weight.detach() != before).any(1)
    assert moved.sum() == 63
    source = torch.cdist(vq.codebook.weight.detach()[moved], z).argmin(1)  # the vector each code came from
    assert source.unique().numel() == source.numel()  # no vector used twice in one event


def test_residual_refuses_unit_norm_codes_and_runs_from_a_preset(tmp_path):
    with pytest.raises(ValueError, match="cb_norm"):
        VQConfig(kind="residual", groups=2, cb_norm="l2")
    run = tmp_path / "rvq"
    out = run_script(ROOT / "train_tokenizer.py", "--preset", "tiny", "--run-dir", run, "optim.steps=1",
                     "model.vq.kind=residual", "model.vq.groups=2", *TINY_DATA, check=False)
    assert out.returncode == 2 and "cb_norm" in out.stderr and "Traceback" not in out.stderr
    run_script(ROOT / "train_tokenizer.py", "--preset", "tiny", "--run-dir", run, "optim.steps=1",
               "model.vq.kind=residual", "model.vq.groups=2", "model.vq.cb_norm=none", *TINY_DATA)
    ckpt = load_checkpoint(run / "checkpoint.pt", kind="tokenizer")
    assert ckpt["config"]["loss"]["vq_weight"] == 5.0  # the paper's weight in every preset
    # k-means ran on step 1: the EMA took the fitted codebook as it is, not 1 % of it
    for stage in range(2):
        key = f"quantizer.vqs.{stage}.codebook.weight"
        assert bool(ckpt["model"][key.replace("codebook.weight", "kmeans_done")])
        assert torch.equal(ckpt["ema"][key], ckpt["model"][key])
