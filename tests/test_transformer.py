"""Invariants of the MaskGIT schedule, training-side masking/loss and the transformer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from core.config import from_dict
from transformer import (
    PRESETS,
    SCHEDULES,
    MaskGIT,
    MaskGITConfig,
    build_maskgit,
    gamma,
    mask_tokens,
    masked_ce_loss,
    num_masked_train,
)

K, GRID, N = 16, (4, 4), 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> MaskGIT:
    torch.manual_seed(0)
    cfg = dict(num_codes=K, grid=GRID, dim=32, depth=1, heads=2, dropout=0.0, attn_dropout=0.0)
    return MaskGIT(MaskGITConfig(**{**cfg, **overrides}))


# --- schedule -------------------------------------------------------------------------------------

PAPER_FORMULAS = {
    "cosine": lambda r: math.cos(math.pi / 2 * r),
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,
    "sqrt": lambda r: 1 - math.sqrt(r),
    "arccos": lambda r: math.acos(r) / (math.pi / 2),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_gamma_monotone_from_one_to_zero(name):
    assert gamma(0.0, name) == 1.0
    assert gamma(1.0, name) == 0.0
    r = torch.linspace(0, 1, 1001, dtype=torch.float64)
    g = gamma(r, name)
    assert (g[1:] < g[:-1]).all(), "gamma must be strictly decreasing"
    assert g[0] == 1.0 and g[-1] == 0.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_gamma_matches_formula_for_floats_and_tensors(name):
    rs = [0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0]
    expected = [PAPER_FORMULAS[name](r) for r in rs]
    assert [gamma(r, name) for r in rs] == pytest.approx(expected, abs=1e-12)
    got = gamma(torch.tensor(rs, dtype=torch.float64), name)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_gamma_rejects_unknown_name_and_bad_r():
    with pytest.raises(ValueError, match="cosine.*linear.*square.*sqrt.*arccos"):
        gamma(0.5, "cosinus")
    with pytest.raises(ValueError):
        gamma(1.5)
    with pytest.raises(ValueError):
        gamma(torch.tensor([-0.1, 0.5]))


def test_num_masked_train_bounds():
    assert num_masked_train(0.0, N) == N
    assert num_masked_train(1.0, N) == 1  # gamma(1) = 0, but at least one token is masked
    r = torch.rand(1000, dtype=torch.float64)
    n = num_masked_train(r, N, "linear")
    assert n.dtype == torch.long and n.min() >= 1 and n.max() <= N


# --- masking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_mask_tokens_masks_exactly_ceil_gamma_n(name):
    g = torch.Generator().manual_seed(1)
    b = 2000
    tokens = torch.randint(0, K, (b, N), generator=g)
    r = torch.rand(b, generator=g, dtype=torch.float64)
    r[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # both ends of the schedule
    inputs, mask = mask_tokens(tokens, K, name, generator=g, r=r)
    expected = [min(max(math.ceil(PAPER_FORMULAS[name](x) * N), 1), N) for x in r.tolist()]
    assert mask.sum(1).tolist() == expected
    assert mask.sum(1).min() >= 1
    # The mask marks exactly the positions fed as mask ids; everything else is the original token.
    assert torch.equal(inputs == K, mask)
    assert torch.equal(inputs[~mask], tokens[~mask])


def test_mask_tokens_default_ratio_and_uniform_positions():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, K, (4000, N), generator=g)
    inputs, mask = mask_tokens(tokens, K, generator=g)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= N
    assert len(counts.unique()) > N // 2  # r ~ U(0, 1) spreads the counts
    # With a fixed ratio every position must be masked equally often (no positional bias).
    _, mask = mask_tokens(tokens, K, "linear", generator=g, r=torch.full((4000,), 0.5, dtype=torch.float64))
    assert (mask.sum(1) == N // 2).all()
    freq = mask.float().mean(0)
    assert (freq - 0.5).abs().max() < 0.05


def test_mask_tokens_reproducible_and_validates():
    tokens = torch.randint(0, K, (8, N))
    a = mask_tokens(tokens, K, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(tokens, K, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="mask ids"):
        mask_tokens(torch.full((2, N), K), K)


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, N, K, generator=g)
    targets = torch.randint(0, K, (4, N), generator=g)
    _, mask = mask_tokens(targets, K, generator=g)
    return logits, targets, mask


def test_masked_loss_ignores_unmasked_positions():
    logits, targets, mask = _loss_inputs()
    logits.requires_grad_(True)
    loss, _ = masked_ce_loss(logits, targets, mask)
    loss.backward()
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[mask].abs().sum(-1) > 0).all()

    perturbed = logits.detach().clone()
    perturbed[~mask] = torch.randn_like(perturbed[~mask]) * 100
    assert torch.equal(masked_ce_loss(perturbed, targets, mask)[0], loss.detach())
    perturbed = logits.detach().clone()
    perturbed[mask] += torch.randn_like(perturbed[mask])
    assert masked_ce_loss(perturbed, targets, mask)[0] != loss.detach()


def test_masked_loss_value_label_smoothing_and_accuracy():
    logits, targets, mask = _loss_inputs(1)
    loss, acc = masked_ce_loss(logits, targets, mask)
    # Manual: mean over masked tokens of the 0.1-smoothed cross-entropy.
    logp = logits.log_softmax(-1)[mask]  # (M, K)
    t = targets[mask]
    nll = -logp.gather(1, t[:, None])[:, 0]
    manual = (0.9 * nll + 0.1 * (-logp.mean(-1))).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert masked_ce_loss(logits, targets, mask, label_smoothing=0.0)[0].item() == pytest.approx(
        nll.mean().item(), rel=1e-5)
    assert acc.item() == pytest.approx((logits[mask].argmax(-1) == t).float().mean().item())
    # Perfect logits at masked positions -> accuracy 1, whatever the unmasked ones say.
    perfect = F.one_hot(targets, K).float() * 50
    perfect[~mask] = torch.randn_like(perfect[~mask])
    assert masked_ce_loss(perfect, targets, mask)[1].item() == 1.0


def _masked_ce_the_old_way(logits, targets, mask, label_smoothing=0.1):
    """The loss as it was computed before it stopped reading the device: the masked logits selected by
    boolean indexing (a data-dependent shape), then the mean cross-entropy over them. A mask with no
    masked position (which the old code refused, after a host read) is 0: nothing to learn."""
    if not mask.any():
        return logits.sum() * 0.0, torch.tensor(0.0)
    sel_logits, sel_targets = logits[mask].float(), targets[mask]
    loss = F.cross_entropy(sel_logits, sel_targets, label_smoothing=label_smoothing)
    return loss, (sel_logits.argmax(-1) == sel_targets).float().mean()


@pytest.mark.parametrize("masked", ["random", "all", "one", "none"])
def test_masked_loss_equals_the_boolean_indexing_formula(masked):
    """The mask-weighted sum over all positions equals the old selection of the masked positions, in value,
    accuracy and gradient, also when all, one or no position is masked (no masked position: loss 0 and a
    zero gradient, where the old code raised)."""
    logits, targets, mask = _loss_inputs(2)
    mask = {"random": mask, "all": torch.ones_like(mask), "none": torch.zeros_like(mask),
            "one": torch.zeros_like(mask).index_fill_(1, torch.tensor([3]), True) & (torch.arange(4) == 1)[:, None]}[masked]
    grads = []
    for fn in (masked_ce_loss, _masked_ce_the_old_way):
        x = logits.clone().requires_grad_(True)
        loss, acc = fn(x, targets, mask)
        loss.backward()
        grads.append((loss.detach(), acc, x.grad))
    (new_loss, new_acc, new_grad), (old_loss, old_acc, old_grad) = grads
    assert new_loss.item() == pytest.approx(old_loss.item(), rel=1e-5, abs=1e-7)
    assert new_acc.item() == pytest.approx(old_acc.item())
    torch.testing.assert_close(new_grad, old_grad, rtol=1e-5, atol=1e-7)
    if masked == "none":
        assert new_loss.item() == 0.0 and not new_grad.any()


# --- model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("num_classes,num_attrs", [(0, 0), (3, 0), (0, 5), (3, 5)])
def test_forward_shape_and_mask_token(tied, num_classes, num_attrs):
    model = tiny(tied_head=tied, num_classes=num_classes, num_attrs=num_attrs).eval()
    tokens = torch.randint(0, K + 1, (3, N))
    tokens[:, 0] = K  # the mask id is a valid input
    cond = {}
    if num_classes:
        cond["class"] = torch.tensor([0, 1, 2])
    if num_attrs:
        cond["attrs"] = torch.randint(0, 2, (3, num_attrs))
    logits = model(tokens, cond=cond or None)
    assert logits.shape == (3, N, K)  # over the K codes only, never the mask id
    assert torch.isfinite(logits).all()


def test_token_ids_are_validated():
    model = tiny().eval()
    with pytest.raises(ValueError, match="ids"):
        model(torch.full((1, N), K + 1))
    with pytest.raises(ValueError, match="ids"):
        model(torch.full((1, N), -1))
    with pytest.raises(ValueError):
        model(torch.zeros(1, N - 1, dtype=torch.long))


def test_unsupported_conditioning_raises():
    uncond = tiny().eval()
    tokens = torch.zeros(2, N, dtype=torch.long)
    with pytest.raises(ValueError, match="num_classes=0"):
        uncond(tokens, cond={"class": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="unconditional"):
        uncond(tokens, drop_cond=torch.tensor([True, False]))
    classes = tiny(num_classes=3).eval()
    with pytest.raises(ValueError, match="num_attrs=0"):
        classes(tokens, cond={"attrs": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="unknown"):
        classes(tokens, cond={"label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="class ids"):
        classes(tokens, cond={"class": torch.tensor([0, 3])})
    attrs = tiny(num_attrs=4).eval()
    with pytest.raises(ValueError, match="0 or 1"):
        attrs(tokens, cond={"attrs": -torch.ones(2, 4, dtype=torch.long)})


@pytest.mark.parametrize("num_classes,num_attrs", [(3, 0), (0, 4), (3, 4)])
def test_conditioning_changes_output_and_missing_means_null(num_classes, num_attrs):
    model = tiny(num_classes=num_classes, num_attrs=num_attrs).eval()
    tokens = torch.randint(0, K + 1, (2, N))
    cond = {}
    if num_classes:
        cond["class"] = torch.tensor([0, 2])
    if num_attrs:
        cond["attrs"] = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        c = model(tokens, cond=cond)
        null = model(tokens)
        dropped = model(tokens, cond=cond, drop_cond=torch.tensor([True, True]))
        half = model(tokens, cond=cond, drop_cond=torch.tensor([False, True]))
    assert not torch.allclose(c, null)
    assert torch.allclose(null, dropped)
    assert torch.allclose(half[0], c[0]) and torch.allclose(half[1], null[1])


def test_training_mode_drops_condition_at_cond_drop_prob():
    model = tiny(num_classes=3, cond_drop_prob=0.5).train()
    tokens = torch.randint(0, K, (400, N))
    cond = {"class": torch.zeros(400, dtype=torch.long)}
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(tokens, cond=cond)
        null = model(tokens, cond=cond, drop_cond=torch.ones(400, dtype=torch.bool))
    dropped = torch.isclose(out, null).flatten(1).all(1).float().mean().item()
    assert 0.4 < dropped < 0.6


def test_bidirectional_attention():
    model = tiny().eval()
    tokens = torch.randint(0, K, (1, N))
    other = tokens.clone()
    other[0, -1] = (other[0, -1] + 1) % K
    with torch.no_grad():
        assert not torch.allclose(model(tokens)[0, 0], model(other)[0, 0])  # first sees last


@pytest.mark.parametrize("stage", ["maskgit", "tokenizer"])
def test_attention_runs_in_fp32_under_cpu_autocast(stage, monkeypatch):
    """CPU bf16 autocast would run the fused attention's backward in bf16, which is many times slower
    than fp32 there: core.attention hands it fp32 inputs with autocast off, forward and backward, and
    gives q's dtype back. Outside autocast it is the fused kernel on the caller's tensors, unchanged."""
    from tokenizer.autoencoder import VQModel
    from tokenizer.config import ALL_FIXES, VQConfig, preset

    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, torch.is_autocast_enabled("cpu"))) or real(q, k, v, **kw))
    if stage == "maskgit":
        model, x = tiny(), torch.randint(0, K, (2, N))
    else:
        torch.manual_seed(0)
        # the full recipe: its k-means init fits the codes to this batch on the first forward, so bf16 rounding
        # of the latents does not flip their codes (a random codebook has near-ties that do)
        cfg = preset("tiny")
        vq = VQConfig(num_codes=cfg.vq.num_codes, code_dim=cfg.vq.code_dim, **ALL_FIXES)
        model = VQModel(dataclasses.replace(cfg, attention=True, vq=vq))
        x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = model(x)
    reference = (reference[0] if stage == "tokenizer" else reference).detach()
    assert seen == [(torch.float32, False)] * len(seen) and seen  # fp32 model, no autocast: as before
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out = out[0] if stage == "tokenizer" else out
    out.float().square().mean().backward()
    assert seen and all(dtype == torch.float32 and not on for dtype, on in seen)
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 rounding, not a new function


def test_tied_vs_untied_head():
    tied, untied = tiny(tied_head=True), tiny(tied_head=False)
    assert untied.num_params() - tied.num_params() == 32 * K  # separate (D, K) output matrix
    for model, grads_reach_codes in ((tied, True), (untied, False)):
        # Input is all mask ids, so code rows of the embedding get gradient only via a tied head.
        model.zero_grad()
        model(torch.full((2, N), K)).sum().backward()
        code_grad = model.tok_emb.weight.grad[:K].abs().sum().item()
        assert (code_grad > 0) == grads_reach_codes
    with torch.no_grad():
        tied.head_bias[5] = 1e3
    assert (tied(torch.full((1, N), K)).argmax(-1) == 5).all()


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="divisible"):
        MaskGITConfig(num_codes=K, grid=GRID, dim=30, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        MaskGITConfig(num_codes=K, grid=GRID, dropout=1.0)
    with pytest.raises(ValueError, match="depth"):
        MaskGITConfig(num_codes=K, grid=GRID, depth=0)
    with pytest.raises(ValueError, match="num_codes"):
        MaskGITConfig(num_codes=-3, grid=GRID)
    with pytest.raises(ValueError, match="unknown config key"):
        from_dict(MaskGITConfig, {"num_codes": K, "grid": GRID, "n_layer": 3})
    with pytest.raises(ValueError, match="tiny"):
        build_maskgit("huge", K, GRID)
    assert {"tiny", "celeba64"} <= set(PRESETS)
    big = build_maskgit("celeba64", 1024, 16).cfg
    assert big.grid == (16, 16) and big.seq_len == 256 and big.mask_id == 1024
    model = build_maskgit("tiny", K, GRID, num_attrs=40, dropout=0.0)
    assert model.cfg.num_attrs == 40 and model.cfg.dim == PRESETS["tiny"].dim
    # A checkpoint's dict (JSON turns the grid tuple into a list) rebuilds the same config.
    import dataclasses
    d = dataclasses.asdict(model.cfg)
    d["grid"] = list(d["grid"])
    assert from_dict(MaskGITConfig, d) == model.cfg


def test_tiny_model_learns_masked_tokens():
    """Masking + model + loss wired together: on data drawn from two fixed templates (x and
    K-1-x), each position holds one of two codes, so the masked-token loss must fall well below
    chance (log K = 2.77) within a few dozen steps."""
    model = tiny(dim=32, depth=1).train()
    g = torch.Generator().manual_seed(0)
    template = torch.randperm(K, generator=g)[:N]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        flip = torch.rand(16, 1, generator=g) < 0.5
        tokens = torch.where(flip, K - 1 - template, template)  # (16, N)
        inputs, mask = mask_tokens(tokens, K, generator=g)
        loss, _ = masked_ce_loss(model(inputs), tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[:5]) / 5 > 2.5  # starts near chance
    assert sum(losses[-5:]) / 5 < 1.6  # the gradient reaches the right outputs
