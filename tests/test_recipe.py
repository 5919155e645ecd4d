"""The recipe as the paper's reference library runs it: alternating optimization with beta = 1 and no
second codebook step, dead-code replacement checked every step, residual stages without unit-norm
codes, the VQ-loss weight of the paper's presets, and an EMA that never mixes two codebooks."""
import pytest
import torch
from conftest import ROOT, SMOKE, run_script

from core.checkpoint import load_checkpoint
from tokenizer import VQ_VARIANTS, VectorQuant, VQConfig
from tokenizer.config import OPT

SGD = lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)  # noqa: E731


def test_alternating_optimization_with_beta_below_one_keeps_the_commitment_term():
    """beta < 1 with the in-place step (the opt_commit rung): the encoder gets the task gradient plus the
    commitment gradient (1 - beta) d/dz mean((z - sg(z_q))^2); W still gets only the sync gradient."""
    torch.manual_seed(0)
    beta, nu = 0.95, 2.0
    vq = VectorQuant(6, 10, inplace_optimizer=SGD, beta=beta, sync_nu=nu)
    z = torch.randn(50, 6, requires_grad=True)
    z_q, info = vq(z)
    g = torch.randn_like(z_q)
    ((z_q * g).sum() + info["loss"]).backward()
    commit = (1 - beta) * 2 * (z - info["z_q"]).detach() / z.numel()
    assert torch.allclose(z.grad, g + commit, atol=1e-7)
    assert not torch.allclose(z.grad, g)  # the term is really there
    expected = torch.zeros(10, 6).index_add_(0, info["q"], g) * nu
    assert torch.allclose(vq.codebook.weight.grad, expected, atol=1e-5)
    VQConfig(inplace_lr=50.0, beta=0.95)  # accepted by the config too


def test_cb_renorm_keeps_unit_rows_without_growth_and_refuses_cb_norm():
    """cb_renorm: W's rows are unit length after every training forward (in-place step included) and the
    effective codes are unit rows in eval even after a main-optimizer step moved W off the sphere; with
    cb_norm=l2 inside the graph instead, the in-place SGD grows ||W|| (what opt_renorm avoids)."""
    with pytest.raises(ValueError, match="one codebook normalization"):
        VectorQuant(8, 16, cb_norm="l2", cb_renorm=True)
    norms = {}
    for mode in ("renorm", "graph"):
        torch.manual_seed(3)
        opts = dict(cb_renorm=True) if mode == "renorm" else dict(cb_norm="l2")
        vq = VectorQuant(8, 16, norm="l2", inplace_optimizer=lambda p: torch.optim.SGD(p, lr=50.0, momentum=0.9),
                         beta=1.0, sync_nu=2.0, **opts)
        main = torch.optim.AdamW(vq.parameters(), lr=1e-2)
        for _ in range(30):
            z = torch.randn(256, 8) + torch.linspace(-1, 1, 8)
            z_q, info = vq(z)
            ((z_q * torch.randn_like(z_q)).sum() + info["loss"]).backward()
            if mode == "renorm":
                assert torch.allclose(vq.codebook.weight.detach().norm(dim=1), torch.ones(16), atol=1e-5)
            main.step()
            main.zero_grad()
        norms[mode] = vq.codebook.weight.detach().norm(dim=1)
        assert torch.allclose(vq.get_codebook().detach().norm(dim=1), torch.ones(16), atol=1e-5)
    assert norms["graph"].mean() > 1.2 and (norms["renorm"] - 1).abs().max() < 0.1, norms


def test_sync_nu_is_a_switch_under_alternating_optimization():
    """Documented property: under OPT, W's only main-optimizer gradient is nu * g, and AdamW's update is
    invariant to the gradient's scale, so nu = 2 and nu = 0.2 give (nearly) the same codebook while
    nu = 0 (no gradient at all) does not."""
    books = {}
    for nu in (2.0, 0.2, 0.0):
        torch.manual_seed(4)
        vq = VectorQuant(6, 12, norm="l2", cb_norm="l2", inplace_optimizer=SGD, beta=1.0, sync_nu=nu)
        main = torch.optim.AdamW(vq.parameters(), lr=1e-2, weight_decay=0.0)
        gen = torch.Generator().manual_seed(5)
        for _ in range(20):
            z = torch.randn(64, 6, generator=gen)
            z_q, info = vq(z)
            (z_q * torch.randn(z_q.shape, generator=gen)).sum().backward()
            main.step()
            main.zero_grad()
        books[nu] = vq.codebook.weight.detach().clone()
    scale_change = (books[2.0] - books[0.2]).abs().max()
    switch = (books[2.0] - books[0.0]).abs().max()
    assert switch > 10 * scale_change, (float(switch), float(scale_change))


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


def test_rungs_change_only_what_they_name():
    """Each rung of the paper's ladder adds what the paper's rung adds; the OPT rungs use beta = 1 (the
    reference's) except opt_commit, which differs from opt by beta alone; no other rung changes beta
    except seed_recipe (the reference's recommended layer, beta 0.98)."""
    for name, variant in VQ_VARIANTS.items():
        cfg = VQConfig(**variant)
        if name == "opt_commit":
            assert cfg.beta == 0.95 and cfg.inplace_lr == OPT["inplace_lr"]
        elif cfg.inplace_lr > 0:
            assert cfg.beta == 1.0 and all(variant[k] == v for k, v in OPT.items()), name
        elif name != "seed_recipe":
            assert cfg.beta == VQConfig().beta, name
    rungs = ["baseline", "l2_replace", "affine", "opt", "opt_affine"]
    added = [set(VQ_VARIANTS[b].items()) - set(VQ_VARIANTS[a].items()) for a, b in zip(rungs, rungs[1:])]
    assert {k for k, _ in added[0]} == {"norm", "cb_norm", "replace_freq"}
    assert {k for k, _ in added[1]} == {"affine_lr"}
    assert set(VQ_VARIANTS["opt"]) - set(VQ_VARIANTS["l2_replace"]) == set(OPT)
    assert set(VQ_VARIANTS["opt_affine"]) == set(VQ_VARIANTS["opt"]) | {"affine_lr"}
    diff = lambda a, b: {k for k in set(VQ_VARIANTS[a]) | set(VQ_VARIANTS[b])  # noqa: E731
                         if VQ_VARIANTS[a].get(k) != VQ_VARIANTS[b].get(k)}
    assert diff("opt", "opt_commit") == {"beta"}
    assert diff("opt", "opt_renorm") == {"cb_norm", "cb_renorm"}
    seed = VQConfig(**VQ_VARIANTS["seed_recipe"])  # the reference's README layer, exactly
    assert (seed.beta, seed.sync_nu, seed.affine_lr, seed.replace_freq, seed.kmeans_init) == (0.98, 0.2, 10.0, 20, True)
    assert seed.norm is None and seed.cb_norm is None and not seed.cb_renorm and seed.inplace_lr == 0


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


@torch.no_grad()
def _replace_the_old_way(vq, z):
    """Dead-code replacement as it was before it stopped reading the device (torch.nonzero, then writes
    of the dead rows only): the reference the masked-write version is compared with."""
    dead = torch.nonzero(vq.step - vq.last_used > vq.replace_freq).squeeze(1)
    if dead.numel() == 0:
        return
    n = z.shape[0]
    order = torch.cat([torch.randperm(n) for _ in range(-(-dead.numel() // n))])
    picks = z[order[:dead.numel()]]
    picks = picks + vq._noise_like(picks)
    vq.codebook.weight[dead] = vq._invert_affine(picks, dead).to(vq.codebook.weight.dtype)
    vq.last_used[dead] = vq.step


def test_replaced_codes_come_from_the_batch_and_live_codes_are_untouched():
    """The masked write (no host read): every dead code becomes a vector of this batch plus 1 % noise,
    through the inverse affine map (the *effective* code is that vector); live rows and their usage
    steps keep their exact values."""
    torch.manual_seed(3)
    vq = VectorQuant(4, 16, replace_freq=2, affine_lr=10.0, affine_groups=2)
    with torch.no_grad():
        vq.affine_scale.normal_(0, 0.05)
        vq.affine_bias.normal_(0, 0.05)
    vq.train()
    vq.step.fill_(10)
    vq.last_used.copy_(torch.tensor([10, 9, 8, 3, 0, 10, 7, 1, 10, 10, 8, 2, 9, 9, 0, 10]))
    dead = vq.step - vq.last_used > 2
    z = torch.randn(32, 4) * 3
    before_w, before_used = vq.codebook.weight.detach().clone(), vq.last_used.clone()
    with torch.no_grad():
        vq._replace_dead_codes(z)
    assert torch.equal(vq.codebook.weight[~dead], before_w[~dead])
    assert torch.equal(vq.last_used[~dead], before_used[~dead]) and (vq.last_used[dead] == 10).all()
    codes = vq.get_codebook().detach()[dead]  # the effective codes
    dist = torch.cdist(codes, z)
    nearest = dist.argmin(1)
    assert (dist.min(1).values <= 0.05 * z[nearest].norm(dim=1)).all()  # a batch vector plus ~1 % noise
    assert nearest.unique().numel() == int(dead.sum())  # distinct vectors


def test_usage_with_replacement_behaves_as_before_the_masked_write():
    """The masked write draws its random numbers differently, so codes are not bit-identical to the old
    nonzero-based replacement; what replacement is for is the same: no code idle longer than T steps, and
    about the same share of codes in use along a run that starts with most of the codebook dead."""
    T = 3
    shares = {}
    for way in ("new", "old"):
        torch.manual_seed(4)
        vq = VectorQuant(8, 64, replace_freq=T)
        with torch.no_grad():
            vq.codebook.weight.mul_(0.01).add_(50.0)  # far from the data: all codes but one dead at once
        if way == "old":
            vq._replace_dead_codes = lambda z, vq=vq: _replace_the_old_way(vq, z)
        data = torch.Generator().manual_seed(5)
        used = []
        for _ in range(40):
            _, info = vq(torch.randn(128, 8, generator=data))
            assert int((vq.step - vq.last_used).max()) <= T
            used.append(float(info["codes_used"]))
        shares[way] = sum(used[10:]) / len(used[10:])
    assert shares["new"] == pytest.approx(shares["old"], abs=0.05), shares
    assert shares["new"] > 0.5  # without replacement: 1 code of 64


def test_residual_refuses_unit_norm_codes_and_runs_from_a_preset(tmp_path):
    with pytest.raises(ValueError, match="cb_norm"):
        VQConfig(kind="residual", groups=2, cb_norm="l2")
    run = tmp_path / "rvq"
    out = run_script(ROOT / "train_tokenizer.py", *SMOKE, "--run-dir", run, "optim.steps=1",
                     "model.vq.kind=residual", "model.vq.groups=2", check=False)
    assert out.returncode == 2 and "cb_norm" in out.stderr and "Traceback" not in out.stderr
    run_script(ROOT / "train_tokenizer.py", *SMOKE, "--run-dir", run, "optim.steps=1",
               "model.vq.kind=residual", "model.vq.groups=2", "model.vq.cb_norm=none")
    ckpt = load_checkpoint(run / "checkpoint.pt", kind="tokenizer")
    assert ckpt["config"]["loss"]["vq_weight"] == 5.0  # the paper's weight in every preset
    # k-means ran on step 1: the EMA took the fitted codebook as it is, not 1 % of it
    for stage in range(2):
        key = f"quantizer.vqs.{stage}.codebook.weight"
        assert bool(ckpt["model"][key.replace("codebook.weight", "kmeans_done")])
        assert torch.equal(ckpt["ema"][key], ckpt["model"][key])


def test_the_layer_owns_its_rules_and_the_config_relies_on_them():
    """A rule lives in the layer users import; the config refuses the same settings by building the layer,
    in one line that names the config's fields."""
    from core.config import ConfigError
    from tokenizer import ResidualVectorQuant

    with pytest.raises(ValueError, match="cb_norm"):
        ResidualVectorQuant(16, 32, groups=2, cb_norm="l2")  # refused by the layer itself now
    with pytest.raises(ConfigError, match=r"vq \(kind=residual\).*cb_norm"):
        VQConfig(kind="residual", groups=2, cb_norm="l2")
    with pytest.raises(ConfigError, match=r"feature_size is vq.code_dim.*got 0"):
        VQConfig(code_dim=0)
    with pytest.raises(ConfigError, match="one codebook normalization"):
        VQConfig(cb_norm="l2", cb_renorm=True)


def test_recipe_flag_trains_a_rungs_quantizer_and_overrides_still_win():
    """``train_tokenizer.py --recipe RUNG``: every model.vq option as the rung sets it (the preset's fixes do
    not leak in), the codebook's size kept, and key=value overrides applied after it; an unknown rung is
    refused by name."""
    import dataclasses
    import json

    from tokenizer import preset

    tiny = preset("tiny").vq
    for rung, extra in (("all", []), ("baseline", ["model.vq.replace_freq=7"])):
        out = run_script(ROOT / "train_tokenizer.py", "--print-config", "--preset", "tiny", "--recipe", rung, *extra)
        got = json.loads(out.stdout)["model"]["vq"]
        want = dataclasses.asdict(VQConfig(**{**VQ_VARIANTS[rung], "num_codes": tiny.num_codes, "code_dim": tiny.code_dim}))
        if extra:
            want["replace_freq"] = 7  # the command line wins over the rung
        assert got == json.loads(json.dumps(want)), rung
    out = run_script(ROOT / "train_tokenizer.py", "--print-config", "--recipe", "nope", check=False)
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr
