"""Invariants of MaskGIT decoding (schedule-exact counts, inpainting, CFG, seeds) and the
sequential baseline, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transformer import SCHEDULES, MaskGIT, MaskGITConfig, maskgit_decode, sequential_decode
from transformer.decoding import _sample

K, GRID, N = 16, (4, 4), 16


pytestmark = pytest.mark.usefixtures("one_thread")
SPEC_GAMMA = {  # docs/method.md section 5, written independently of transformer/schedule.py
    "cosine": lambda r: math.cos(math.pi / 2 * r),
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,
    "sqrt": lambda r: 1 - math.sqrt(r),
    "arccos": lambda r: math.acos(r) / (math.pi / 2),
}


def tiny(**overrides) -> MaskGIT:
    torch.manual_seed(0)
    cfg = dict(num_codes=K, grid=GRID, dim=32, depth=1, heads=2)
    return MaskGIT(MaskGITConfig(**{**cfg, **overrides})).eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def count_calls(model: nn.Module) -> list[int]:
    """Wrap model.forward to record the batch size of every call."""
    calls, forward = [], model.forward

    def wrapped(tokens, *args, **kwargs):
        calls.append(tokens.shape[0])
        return forward(tokens, *args, **kwargs)

    model.forward = wrapped
    return calls


def expected_fixed(n_gen: int, steps: int, name: str) -> list[int]:
    """Tokens fixed per step by the rule of docs/method.md section 5: keep floor(gamma((t+1)/T) n_gen) masked,
    clipped to [1, masked - 1] before the last step (never below 0), 0 after the last."""
    masked, out = n_gen, []
    for t in range(steps):
        if t == steps - 1:
            keep = 0
        else:
            keep = max(min(max(math.floor(SPEC_GAMMA[name]((t + 1) / steps) * n_gen), 1), masked - 1), 0)
        out.append(masked - keep)
        masked = keep
    return out


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 4, 8, 16, 20])
def test_full_generation_follows_schedule_exactly(name, steps):
    model = tiny()
    tokens, fixed = maskgit_decode(model, 3, gen(), steps=steps, schedule=name, return_history=True)
    assert tokens.shape == (3, N) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < K  # no mask token left after T steps
    assert fixed.shape == (3, steps)
    for row in fixed.tolist():
        assert row == expected_fixed(N, steps, name)
    # Every step fixes at least one token while any remain (front-loaded schedules such as sqrt
    # with T = N finish early; those late steps then have nothing left to fix).
    done_before = fixed.cumsum(1) - fixed
    assert (fixed[done_before < N] >= 1).all()
    assert (fixed.sum(1) == N).all()


def test_cosine_eight_steps_counts():
    # Hand-computed from floor(cos(pi/2 (t+1)/8) * 16): 15, 14, 13, 11, 8, 6, 3, 0 left masked.
    _, fixed = maskgit_decode(tiny(), 1, gen(), return_history=True)
    assert fixed[0].tolist() == [1, 1, 1, 2, 3, 2, 3, 3]


def test_inpainting_keeps_known_tokens_and_schedules_the_region():
    model = tiny()
    g = gen(1)
    init = torch.randint(0, K, (3, N), generator=g)
    region = torch.zeros(3, N, dtype=torch.bool)
    region[0, :8] = True  # top half
    region[1, torch.randperm(N, generator=g)[:5]] = True  # scattered
    # sample 2: nothing to generate
    garbage = init.clone()
    garbage[region] = 3  # values under the mask must be ignored
    tokens, fixed = maskgit_decode(model, 3, g, steps=6, init_tokens=garbage, init_mask=region,
                                   return_history=True)
    assert torch.equal(tokens[~region], init[~region])
    assert tokens.max() < K
    for b in range(3):
        n_gen = int(region[b].sum())
        assert fixed[b].tolist() == expected_fixed(n_gen, 6, "cosine")


def test_on_step_shows_each_state_without_changing_the_output():
    model = tiny()
    region = torch.zeros(2, N, dtype=torch.bool)
    region[:, 4:12] = True
    init = torch.randint(0, K, (2, N), generator=gen(3))
    kwargs = dict(steps=5, init_tokens=init, init_mask=region, return_history=True)
    states = []
    tokens, fixed = maskgit_decode(model, 2, gen(), on_step=lambda t, x, p: states.append((t, x, p)), **kwargs)
    plain, _ = maskgit_decode(model, 2, gen(), **kwargs)
    assert torch.equal(tokens, plain)  # observing draws nothing from the generator
    assert [t for t, _, _ in states] == list(range(5)) and torch.equal(states[-1][1], tokens)
    before = torch.where(region, K, init)
    for t, x, predicted in states:
        known = x != K
        assert torch.equal(x[known], predicted[known]) and predicted.max() < K
        assert torch.equal(x[~region], init[~region])  # kept tokens are never masked
        was = before != K
        assert torch.equal(x[was], before[was])  # fixed tokens never change
        assert torch.equal((known & ~was).sum(1), fixed[:, t])  # the step fixed exactly num_fixed[t]
        before = x


def test_inpainting_argument_checks():
    model = tiny()
    with pytest.raises(ValueError, match="together"):
        maskgit_decode(model, 1, gen(), init_tokens=torch.zeros(1, N, dtype=torch.long))
    with pytest.raises(ValueError, match="known tokens"):
        maskgit_decode(model, 1, gen(), init_tokens=torch.full((1, N), K),
                       init_mask=torch.zeros(1, N, dtype=torch.bool))


class ConfidenceByPosition(nn.Module):
    """Fake model: position i predicts code i with logit scale i, so confidence grows with i.
    Records the known set of every input it sees."""

    mask_id, seq_len = K, N

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.known: list[torch.Tensor] = []

    def forward(self, tokens, cond=None, drop_cond=None):
        self.known.append(tokens[0] != K)
        scale = torch.arange(N, dtype=torch.float32)  # (N,)
        logits = torch.eye(K)[torch.arange(N) % K] * scale[:, None]  # (N, K)
        return logits.expand(tokens.shape[0], N, K)


def test_most_confident_tokens_are_kept_first_and_never_remasked():
    model = ConfidenceByPosition().eval()
    tokens = maskgit_decode(model, 1, gen(), steps=8, choice_temperature=0.0, temperature=0.0)
    assert tokens[0].tolist() == list(range(N))
    prev = torch.zeros(N, dtype=torch.bool)
    for known in model.known:
        k = int(known.sum())
        assert known[N - k:].all() and not known[: N - k].any()  # the most confident suffix
        assert (known | ~prev).all()  # a fixed token is never re-masked


class OneUnsurePosition(nn.Module):
    """Fake model over 256 codes: position 0 predicts uniformly (log p = -log 256 whatever is
    sampled), every other position is certain (log p = 0). Records the inputs it sees."""

    codes = 256
    mask_id, seq_len = codes, N

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, tokens, cond=None, drop_cond=None):
        self.inputs.append(tokens)
        logits = torch.zeros(tokens.shape[0], N, self.codes)
        logits[:, 1:, 0] = 50.0
        return logits


def test_choice_noise_is_annealed_as_in_maskgit():
    """With T = 2 and tau_0 = 4.5, step 0 fixes 5 of 16 tokens (cosine) by confidence + tau_t Gumbel
    with tau_t = 4.5 (1 - 1/2) = 2.25. The unsure position 0 is among them with a probability
    that depends on tau_t; compare with a direct simulation of the rule in docs/method.md section 5."""

    def spec_probability(tau: float, draws: int = 200_000) -> float:
        g = gen(99)
        u = torch.rand(draws, N, generator=g, dtype=torch.float64)
        conf = torch.zeros(draws, N, dtype=torch.float64)
        conf[:, 0] = -math.log(OneUnsurePosition.codes)
        conf += tau * -torch.log(-torch.log(u))
        return ((conf[:, 1:] > conf[:, :1]).sum(1) < 5).double().mean().item()

    model = OneUnsurePosition().eval()
    b = 3000
    maskgit_decode(model, b, gen(), steps=2, choice_temperature=4.5, temperature=0.0)
    fixed_at_step0 = (model.inputs[1][:, 0] != model.mask_id).double().mean().item()
    annealed, constant = spec_probability(2.25), spec_probability(4.5)
    assert constant - annealed > 0.05  # the test can tell the two rules apart
    assert abs(fixed_at_step0 - annealed) < 0.02


def test_seed_reproducibility():
    model = tiny()
    a = maskgit_decode(model, 4, gen(7), top_k=8)
    b = maskgit_decode(model, 4, gen(7), top_k=8)
    c = maskgit_decode(model, 4, gen(8), top_k=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(maskgit_decode(model, 4, gen(7), top_k=8), a)
    assert torch.equal(sequential_decode(model, 2, gen(7)), sequential_decode(model, 2, gen(7)))


def test_cfg_weight_zero_is_plain_conditional_and_guidance_batches():
    model = tiny(num_classes=3)
    cond = {"class": torch.tensor([0, 2])}
    calls = count_calls(model)
    plain = maskgit_decode(model, 2, gen(), steps=4, cond=cond)
    assert calls == [2] * 4  # w = 0: one forward of B per step
    assert torch.equal(maskgit_decode(model, 2, gen(), steps=4, cond=cond, cfg_scale=0.0), plain)
    calls.clear()
    guided = maskgit_decode(model, 2, gen(), steps=4, cond=cond, cfg_scale=3.0)
    assert calls == [4] * 4  # w != 0: cond and uncond in one batch of 2B per step
    assert guided.shape == (2, N) and guided.max() < K


def test_cfg_is_a_no_op_when_condition_carries_no_information():
    model = tiny(num_classes=3)
    with torch.no_grad():  # every class embedding equals the null one: cond logits == uncond
        model.class_emb.weight[:] = model.class_emb.weight[3]
    cond = {"class": torch.tensor([0, 1, 2])}
    plain = maskgit_decode(model, 3, gen(), cond=cond)
    for schedule in ("constant", "linear"):
        guided = maskgit_decode(model, 3, gen(), cond=cond, cfg_scale=5.0, cfg_schedule=schedule)
        assert torch.equal(guided, plain)


class WeakCondition(nn.Module):
    """Fake conditional model: logits favour code 0 by 2; the condition adds 1 to code `class`.
    Conditional argmax is still 0; guidance w gives code c logit 1 + w vs 2, so c wins for w > 1."""

    mask_id, seq_len = K, N

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, cond=None, drop_cond=None):
        b = tokens.shape[0]
        logits = torch.zeros(b, N, K)
        logits[..., 0] = 2.0
        if cond is not None:
            use = torch.ones(b) if drop_cond is None else (~drop_cond).float()
            logits[torch.arange(b), :, cond["class"]] += use[:, None]
        return logits


def test_cfg_formula_and_linear_ramp():
    model = WeakCondition().eval()
    cond = {"class": torch.tensor([5, 9])}
    greedy = dict(temperature=0.0, cond=cond, steps=8)
    assert (maskgit_decode(model, 2, gen(), **greedy) == 0).all()
    guided = maskgit_decode(model, 2, gen(), cfg_scale=2.0, **greedy)
    assert torch.equal(guided, torch.tensor([[5], [9]]).expand(2, N))
    # Linear ramp w_t = 2.5 (t + 1) / 8 exceeds 1 from step t = 3 on: the tokens fixed at steps
    # 0-2 (1 + 1 + 1 under the cosine schedule) are code 0, all later ones the class code.
    ramped = maskgit_decode(model, 2, gen(), cfg_scale=2.5, cfg_schedule="linear", **greedy)
    assert (ramped == 0).sum(1).tolist() == [3, 3]
    assert (ramped == torch.tensor([[5], [9]])).sum(1).tolist() == [N - 3, N - 3]
    with pytest.raises(ValueError, match="cond"):
        maskgit_decode(model, 2, gen(), cfg_scale=2.0)


@pytest.mark.parametrize("tied", [True, False])
def test_dominant_code_is_returned_everywhere(tied):
    model = tiny(tied_head=tied)
    with torch.no_grad():
        bias = model.head_bias if tied else model.head.bias
        bias[11] = 1e4
    for kwargs in ({}, {"top_k": 3}, {"temperature": 0.0}, {"steps": 16}):
        assert (maskgit_decode(model, 2, gen(), **kwargs) == 11).all()
    assert (sequential_decode(model, 2, gen()) == 11).all()


def test_sequential_decode_runs_n_forward_passes():
    model = tiny(num_classes=3)
    calls = count_calls(model)
    out = sequential_decode(model, 2, gen(), top_k=5, cond={"class": torch.tensor([1, 2])})
    assert out.shape == (2, N) and out.min() >= 0 and out.max() < K
    assert calls == [2] * N
    calls.clear()
    maskgit_decode(model, 2, gen(), steps=8)
    assert len(calls) == 8


def test_sampling_distribution_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 20000
    for temperature in (1.0, 0.5):
        ids, log_p = _sample(logits.expand(draws, 4), temperature, None, gen())
        freq = torch.bincount(ids, minlength=4).float() / draws
        p = (logits / temperature).softmax(-1)
        assert (freq - p).abs().max() < 0.015
        assert torch.allclose(log_p, p.log()[ids])
    ids, log_p = _sample(logits.expand(draws, 4), 1.0, 2, gen())
    assert set(ids.tolist()) == {0, 1}
    assert torch.allclose(log_p.exp().unique().sort().values, logits[:2].softmax(-1).sort().values)


def test_decoding_argument_checks():
    model = tiny()
    with pytest.raises(ValueError, match="eval"):
        maskgit_decode(model.train(), 1, gen())
    model.eval()
    with pytest.raises(ValueError, match="schedule"):
        maskgit_decode(model, 1, gen(), schedule="cosinus")
    with pytest.raises(ValueError, match="cfg_schedule"):
        maskgit_decode(model, 1, gen(), cfg_schedule="cosine")
    with pytest.raises(ValueError, match="steps"):
        maskgit_decode(model, 1, gen(), steps=0)
    with pytest.raises(ValueError, match="num_classes=0"):
        maskgit_decode(model, 1, gen(), cond={"class": torch.tensor([0])})


# ---- samplers: Halton ordering and the guidance / temperature schedules ----------------------------

def test_halton_order_is_a_low_discrepancy_permutation():
    """Every prefix of the Halton order is spread over the grid: on an 8x8 grid no 4x4 quadrant holds
    more than one position beyond its fair share k/4 of any prefix of k positions (raster order puts
    the first 32 all in the top half: 8 beyond)."""
    from transformer.decoding import halton_order

    order = halton_order(8, 8)
    assert sorted(order.tolist()) == list(range(64))
    quadrant = lambda p: (p // 8 >= 4) * 2 + (p % 8 >= 4)  # noqa: E731

    def worst(seq):
        return max(abs(sum(quadrant(p) == q for p in seq[:k]) - k / 4) for k in range(4, 65, 4) for q in range(4))
    assert worst(order.tolist()) <= 1 and worst(list(range(64))) >= 8
    assert halton_order(3, 5).sort().values.tolist() == list(range(15))  # any grid shape


def test_halton_decoding_reveals_its_rolled_order_schedule_exact():
    """order="halton": after each step the fixed positions are exactly the first ones of the sample's
    rolled Halton order (as many as the schedule says), whatever the model predicts; samples differ
    in their roll."""
    from transformer.decoding import _halton_ranks

    model = tiny(grid=(4, 4))
    steps, seen = 5, []
    ranks = _halton_ranks(model, 3, gen(7), torch.device("cpu"))
    assert all(sorted(r.tolist()) == list(range(N)) for r in ranks) and not torch.equal(ranks[0], ranks[1])
    maskgit_decode(model, 3, gen(7), steps=steps, order="halton",
                   on_step=lambda t, tokens, _: seen.append(tokens != model.mask_id))
    fixed = torch.tensor(expected_fixed(N, steps, "cosine")).cumsum(0)
    for t, known in enumerate(seen):
        assert torch.equal(known, ranks < fixed[t]), t


def test_ramps_start_and_end_at_their_stated_values():
    from transformer.decoding import cfg_weight, choice_tau, sampling_temperature

    for T in (2, 8, 13):
        assert cfg_weight(3.0, 0, T, "pow-cosine") == 0.0 and cfg_weight(3.0, T - 1, T, "pow-cosine") == pytest.approx(3.0)
        ramp = [cfg_weight(3.0, t, T, "pow-cosine", power=2.0) for t in range(T)]
        assert ramp == sorted(ramp)  # monotone
        assert cfg_weight(3.0, 4 % T, T, "constant") == 3.0 and cfg_weight(3.0, T - 1, T, "linear") == 3.0
        assert sampling_temperature(1.5, 0.5, 0, T) == 1.5 and sampling_temperature(1.5, 0.5, T - 1, T) == pytest.approx(0.5)
        assert sampling_temperature(1.5, None, T - 1, T) == 1.5
        for schedule in ("linear", "cosine"):
            taus = [choice_tau(4.5, t, T, schedule) for t in range(T)]
            assert taus[-1] == pytest.approx(0.0, abs=1e-12) and taus == sorted(taus, reverse=True)
        assert choice_tau(4.5, T - 1, T, "constant") == 4.5
    assert cfg_weight(3.0, 0, 1, "pow-cosine") == pytest.approx(3.0)  # one step: the full weight


def test_one_step_without_noise_all_samplers_agree():
    model = tiny()
    ref = maskgit_decode(model, 2, gen(0), steps=1, temperature=0.0, choice_temperature=0.0)
    assert torch.equal(ref, model(torch.full((2, N), model.mask_id)).argmax(-1))
    for kwargs in (dict(order="halton"), dict(choice_schedule="cosine"), dict(temperature_end=3.0),
                   dict(order="halton", choice_schedule="constant")):
        assert torch.equal(maskgit_decode(model, 2, gen(5), steps=1, temperature=0.0, choice_temperature=0.0,
                                          **kwargs), ref), kwargs


def test_default_sampler_is_unchanged_and_new_options_change_samples():
    """The defaults are today's sampler (the same tokens as spelling its options out); each new option
    changes the samples of a random model."""
    model = tiny()
    base = maskgit_decode(model, 4, gen(3), steps=6)
    assert torch.equal(base, maskgit_decode(model, 4, gen(3), steps=6, order="confidence", choice_schedule="linear",
                                            temperature_end=None, cfg_schedule="constant"))
    for kwargs in (dict(order="halton"), dict(choice_schedule="cosine"), dict(temperature_end=0.2)):
        assert not torch.equal(base, maskgit_decode(model, 4, gen(3), steps=6, **kwargs)), kwargs


@pytest.mark.parametrize("bad", [dict(order="raster"), dict(choice_schedule="exp"), dict(cfg_schedule="cos"),
                                 dict(temperature_end=-1.0), dict(temperature_end=float("nan")), dict(cfg_power=0.0)])
def test_sampler_options_are_validated(bad):
    with pytest.raises(ValueError, match="maskgit_decode"):
        maskgit_decode(tiny(), 1, gen(0), steps=2, **bad)
