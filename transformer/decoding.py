"""MaskGIT's iterative parallel decoding, and the one-token-per-step baseline it is compared with.

Chang et al., "MaskGIT", CVPR 2022, sec. 3.2 ("Iterative Decoding") and docs/method.md section 5: start
from an all-masked grid; at each of T steps predict every masked token in parallel, then keep only
the most confident predictions and re-mask the rest, with the number left masked given by the same
schedule gamma used in training. T = 8 steps instead of N sequential ones is the paper's speed claim;
`sequential_decode` is that N-step baseline with the same network and sampling rules.

Both functions are pure functions of their inputs and an explicit `torch.Generator`: every random
draw goes through it, so a seed reproduces the output bit for bit (on the same device and software).
A list of B generators instead gives each sample its own: sample b's draws then come from
generator b alone, so a sample does not depend on which others share its batch (what lets
`sample.py` split images over processes and still give the same image i).
The model must be in eval mode (the caller's job; a model in training mode is rejected, since its
dropout and condition-dropping would use the global RNG).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.schedule import gamma, num_masked_decode

CFG_SCHEDULES = ("constant", "linear", "pow-cosine")
ORDERS = ("confidence", "halton")
CHOICE_SCHEDULES = ("linear", "cosine", "constant")


def cfg_weight(w: float, t: int, steps: int, schedule: str = "constant", power: float = 3.0) -> float:
    """Guidance weight at step t of T. "constant": w. "linear": w (t + 1) / T (weak while little is
    decided). "pow-cosine" (MaskBit's guidance annealing): w (1 - cos(pi r^power)) / 2 with r = t / (T - 1),
    from exactly 0 at the first step to exactly w at the last (w with one step)."""
    if schedule == "constant":
        return w
    if schedule == "linear":
        return w * (t + 1) / steps
    r = t / (steps - 1) if steps > 1 else 1.0
    return w * (1 - math.cos(math.pi * r**power)) / 2


def choice_tau(tau0: float, t: int, steps: int, schedule: str = "linear") -> float:
    """Temperature of the Gumbel noise on the confidences at step t of T. "linear" (MaskGIT's reference):
    tau0 (1 - (t + 1) / T); "cosine": tau0 (1 + cos(pi (t + 1) / T)) / 2; both reach 0 at the last step.
    "constant": tau0 at every step."""
    if schedule == "constant":
        return tau0
    r = (t + 1) / steps
    return tau0 * (1.0 - r) if schedule == "linear" else tau0 * (1 + math.cos(math.pi * r)) / 2


def sampling_temperature(start: float, end: float | None, t: int, steps: int) -> float:
    """Softmax temperature at step t of T, linear from ``start`` (first step) to ``end`` (last step);
    ``end=None`` keeps ``start`` throughout."""
    if end is None or steps == 1:
        return start
    return start + (end - start) * t / (steps - 1)


def _radical_inverse(i: int, base: int) -> float:
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def halton_order(h: int, w: int) -> Tensor:
    """The h x w grid's positions (row-major indices, (h w,) long) in the order the 2-D Halton sequence
    (bases 2 and 3) first visits their cells: a low-discrepancy order, so that every prefix is spread
    evenly over the grid (Besnier et al., ICLR 2025, "Halton Scheduler for Masked Generative Image
    Transformer")."""
    seen, order, i = set(), [], 0
    while len(order) < h * w:
        pos = int(_radical_inverse(i, 2) * h) * w + int(_radical_inverse(i, 3) * w)
        if pos not in seen:
            seen.add(pos)
            order.append(pos)
        i += 1
    return torch.tensor(order, dtype=torch.long)


def _grid_of(model: nn.Module) -> tuple[int, int]:
    grid = getattr(getattr(model, "cfg", None), "grid", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(model.seq_len)
    return (side, side) if side * side == model.seq_len else (1, model.seq_len)


def _halton_ranks(model: nn.Module, batch_size: int, generator: torch.Generator | Sequence[torch.Generator],
                  device: torch.device) -> Tensor:
    """(B, N): each position's place in its sample's reveal order, the Halton order of a grid rolled by a
    random (dy, dx) per sample (a torus shift keeps the order's low discrepancy and varies it per image)."""
    h, w = _grid_of(model)
    order = halton_order(h, w)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    rank = rank.view(h, w).to(device)
    gens = [generator] * batch_size if isinstance(generator, torch.Generator) else list(generator)
    rows = []
    for g in gens:
        shift = torch.randint(0, h * w, (1,), generator=g, device=device).item()  # one draw, before decoding
        rows.append(rank.roll((shift // w, shift % w), dims=(0, 1)).reshape(-1))
    return torch.stack(rows)


@torch.no_grad()
def maskgit_decode(
    model: nn.Module,
    batch_size: int,
    generator: torch.Generator | Sequence[torch.Generator],
    steps: int = 8,
    schedule: str = "cosine",
    choice_temperature: float = 4.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    cfg_scale: float = 0.0,
    cfg_schedule: str = "constant",
    cond: Mapping[str, Tensor] | None = None,
    init_tokens: Tensor | None = None,
    init_mask: Tensor | None = None,
    order: str = "confidence",
    temperature_end: float | None = None,
    choice_schedule: str = "linear",
    cfg_power: float = 3.0,
    return_history: bool = False,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Generate token grids (B, N) with T = `steps` MaskGIT decoding steps.

    model: a MaskGIT (or anything with .mask_id, .seq_len and forward(tokens, cond, drop_cond)).
    generator: on the model's device; the only source of randomness (or one per sample, B of them).
    temperature: token sampling temperature (0 = argmax); top_k: sample among the k best codes.
    choice_temperature: tau_0 of the Gumbel noise added to the confidences,
        tau_t = choice_temperature * (1 - (t + 1) / T) (MaskGIT reference: 4.5).
    cfg_scale: classifier-free guidance weight w; logits = cond + w (cond - uncond), which is
        the paper's uncond + s (cond - uncond) with s = 1 + w. So w = 0 is plain conditional
        decoding (one forward per step); w > 0 runs cond and uncond as one batch of 2B.
    cfg_schedule: "constant" (w every step), "linear" (w_t = w (t + 1) / T, weak guidance while
        little is decided, full at the end) or "pow-cosine" (0 -> w along (1 - cos(pi r^cfg_power)) / 2,
        MaskBit's ramp); see ``cfg_weight``.
    order: which masked positions are revealed at each step. "confidence" (MaskGIT): the most
        confident samples, with Gumbel noise of temperature tau_t on the confidences. "halton"
        (Besnier et al., 2025): the next positions of a 2-D Halton sequence over the grid, rolled by a
        random offset per sample; no confidence and no Gumbel noise (choice_temperature is unused).
        Both reveal the same number per step (the schedule).
    temperature_end: the softmax temperature moves linearly from ``temperature`` (first step) to
        this value (last step); None keeps ``temperature`` (``sampling_temperature``).
    choice_schedule: how tau_t decays from choice_temperature: "linear" (the reference's), "cosine"
        or "constant" (``choice_tau``).
    cond: the model's conditioning dict ({"class": (B,), "attrs": (B, A)}); None = unconditional.
    init_tokens, init_mask: (B, N) long and (B, N) bool, for inpainting / outpainting: positions
        with init_mask True are generated, the others are kept from init_tokens and never change.
        The schedule then runs over the region: with N_gen = init_mask.sum(1) per sample, after
        step t floor(gamma((t + 1) / T) * N_gen) positions stay masked. (Measured against the full
        N, a small region would be fixed one token per step and then dumped at once.)
    return_history: also return num_fixed (B, T) long, the tokens fixed at each step.
    on_step: called after each step t as on_step(t, tokens, predicted): tokens (B, N) is the grid
        after step t (mask_id where still masked), predicted (B, N) the step's sample at every
        position (= tokens where fixed). An observer for showing the decoding (the studio's
        strip); it draws no random numbers, so the output is the same with or without it.

    Per step the count left masked is clipped to [1, masked_before - 1] until the last step, which
    fixes everything (see schedule.num_masked_decode): each step fixes at least one token while
    any remain, so with N_gen < T the region is complete before the last step.
    """
    _check_common(model, batch_size, generator, temperature, top_k)
    if steps < 1:
        raise ValueError(f"maskgit_decode: steps must be >= 1, got {steps}")
    if choice_temperature < 0:
        raise ValueError(f"maskgit_decode: choice_temperature must be >= 0, got {choice_temperature}")
    for name, value, valid in (("cfg_schedule", cfg_schedule, CFG_SCHEDULES), ("order", order, ORDERS),
                               ("choice_schedule", choice_schedule, CHOICE_SCHEDULES)):
        if value not in valid:
            raise ValueError(f"maskgit_decode: unknown {name} {value!r}; valid: {', '.join(valid)}")
    if temperature_end is not None and not temperature_end >= 0:
        raise ValueError(f"maskgit_decode: temperature_end must be >= 0 or None, got {temperature_end}")
    if not cfg_power > 0:
        raise ValueError(f"maskgit_decode: cfg_power must be > 0, got {cfg_power}")
    _check_cfg(cfg_scale, cond)
    gamma(0.0, schedule)  # validates the schedule name before any work
    mask_id = model.mask_id
    tokens = _initial_tokens(model, batch_size, init_tokens, init_mask)  # (B, N), mask_id = unknown
    n_gen = (tokens == mask_id).sum(dim=1)  # (B,) positions to generate per sample
    # Halton: a fixed reveal order per sample; earlier in the order = "more confident"
    halton = _halton_ranks(model, batch_size, generator, tokens.device) if order == "halton" else None

    num_fixed = []
    for t in range(steps):
        unknown = tokens == mask_id  # (B, N)
        logits = _logits(model, tokens, cond, cfg_weight(cfg_scale, t, steps, cfg_schedule, cfg_power))  # (B, N, K)
        temp = sampling_temperature(temperature, temperature_end, t, steps)
        sampled, log_p = _sample(logits, temp, top_k, generator)  # (B, N), (B, N)
        sampled = torch.where(unknown, sampled, tokens)  # known tokens never change

        if halton is None:
            # Confidence = log p(sampled) + tau_t * Gumbel: annealed noise makes the choice of which
            # tokens to keep random early and greedy late (MaskGIT reference, mask_by_random_topk).
            tau = choice_tau(choice_temperature, t, steps, choice_schedule)
            confidence = log_p + tau * _gumbel(log_p.shape, generator, log_p.device)  # (B, N)
        else:
            confidence = -halton.to(log_p.dtype)
        confidence = confidence.masked_fill(~unknown, float("inf"))

        n_masked = unknown.sum(dim=1)  # (B,)
        n_keep = num_masked_decode(t, steps, n_gen, schedule, currently_masked=n_masked)  # (B,)
        # Re-mask exactly the n_keep least confident positions of each sample. n_keep <= n_masked
        # and known positions sit at +inf, so only positions still unknown can be re-masked.
        ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)  # (B, N)
        remask = ranks < n_keep[:, None]
        tokens = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
        num_fixed.append(n_masked - n_keep)
        if on_step is not None:
            on_step(t, tokens, sampled)

    if return_history:
        return tokens, torch.stack(num_fixed, dim=1)  # (B, N), (B, T)
    return tokens


@torch.no_grad()
def sequential_decode(
    model: nn.Module,
    batch_size: int,
    generator: torch.Generator | Sequence[torch.Generator],
    temperature: float = 1.0,
    top_k: int | None = None,
    cfg_scale: float = 0.0,
    cond: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Baseline: one token per step in raster order, N forward passes of the same bidirectional
    model (no KV cache is possible: every position attends to every other one).

    Step i sees tokens 0..i-1 fixed and i..N-1 masked, and samples token i with the same rules as
    maskgit_decode (temperature, top-k, constant CFG weight w). Returns (B, N) long.
    """
    _check_common(model, batch_size, generator, temperature, top_k)
    _check_cfg(cfg_scale, cond)
    tokens = _initial_tokens(model, batch_size, None, None)  # (B, N) all masked
    for i in range(model.seq_len):
        logits = _logits(model, tokens, cond, cfg_scale)[:, i : i + 1]  # (B, 1, K)
        ids, _ = _sample(logits, temperature, top_k, generator)  # (B, 1)
        tokens[:, i] = ids[:, 0]
    return tokens


def _logits(model: nn.Module, tokens: Tensor, cond: Mapping[str, Tensor] | None, w: float) -> Tensor:
    """Model logits (B, N, K) in fp32, with classifier-free guidance weight w when w != 0."""
    if w == 0:
        return model(tokens, cond=cond).float()
    b = tokens.shape[0]
    # Conditional and unconditional halves in one forward pass: same tokens, drop_cond True for
    # the second half (the model substitutes its learned null condition).
    both_cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(tokens.device)
    logits = model(torch.cat([tokens, tokens]), cond=both_cond, drop_cond=drop).float()
    cond_logits, uncond_logits = logits[:b], logits[b:]
    return cond_logits + w * (cond_logits - uncond_logits)


def _sample(logits: Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Sample one code per position; returns (ids (...,) long, log p(ids) (...,)) under the
    distribution actually sampled from (temperature and top-k applied)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        ids = logits.argmax(dim=-1)
    else:
        logits = logits / temperature
        # Gumbel-max trick: argmax(logits + Gumbel) ~ Categorical(softmax(logits)), using only
        # our generator (torch.multinomial would work too; this keeps one code path per device).
        ids = (logits + _gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)
    log_p = F.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]
    return ids, log_p


def _gumbel(shape: torch.Size | tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator],
            device: torch.device) -> Tensor:
    """Standard Gumbel noise -log(-log U), U ~ U(0, 1), from the given generator (a list: row b of the
    batch from generator b)."""
    if isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, device=device)
    else:
        u = torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    tiny = torch.finfo(u.dtype).tiny
    neg_log_u = -torch.log(u.clamp(min=tiny))  # in (0, 87]; 0 only if u == 1, which rand() excludes
    return -torch.log(neg_log_u.clamp(min=tiny))


def _initial_tokens(model: nn.Module, batch_size: int, init_tokens: Tensor | None,
                    init_mask: Tensor | None) -> Tensor:
    """Starting grid (B, N): mask_id where a token is to be generated, the known id elsewhere."""
    mask_id, n = model.mask_id, model.seq_len
    device = _model_device(model)
    if init_tokens is None and init_mask is None:
        return torch.full((batch_size, n), mask_id, dtype=torch.long, device=device)
    if init_tokens is None or init_mask is None:
        raise ValueError("maskgit_decode: init_tokens and init_mask must be given together")
    if init_tokens.shape != (batch_size, n) or init_mask.shape != (batch_size, n):
        raise ValueError(f"maskgit_decode: init_tokens and init_mask must be ({batch_size}, {n}), got "
                         f"{tuple(init_tokens.shape)} and {tuple(init_mask.shape)}")
    if init_mask.dtype != torch.bool:
        raise ValueError(f"maskgit_decode: init_mask must be bool (True = generate), got {init_mask.dtype}")
    init_tokens, init_mask = init_tokens.to(device).long(), init_mask.to(device)
    known = init_tokens[~init_mask]
    if known.numel() and (known.min() < 0 or known.max() >= mask_id):
        raise ValueError(f"maskgit_decode: known tokens (init_mask False) must lie in [0, {mask_id})")
    return torch.where(init_mask, torch.full_like(init_tokens, mask_id), init_tokens)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_common(model: nn.Module, batch_size: int, generator: torch.Generator | Sequence[torch.Generator],
                  temperature: float, top_k: int | None) -> None:
    if model.training:
        raise ValueError("decoding: call model.eval() first (training-mode dropout and condition "
                         "dropping would make sampling random outside the generator)")
    if batch_size < 1:
        raise ValueError(f"decoding: batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    one = isinstance(generator, torch.Generator)
    generators = [generator] if one else list(generator) if isinstance(generator, (list, tuple)) else []
    if not generators or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError("decoding: an explicit torch.Generator, or a list of one per sample, is required "
                         "(reproducibility)")
    if not one and len(generators) != batch_size:
        raise ValueError(f"decoding: {len(generators)} generators for a batch of {batch_size}")
    for gdev in {g.device for g in generators}:
        if gdev.type != device.type or (gdev.index or 0) != (device.index or 0):
            raise ValueError(f"decoding: generator is on {gdev} but the model is on {device}")
    if temperature < 0:
        raise ValueError(f"decoding: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"decoding: top_k must be None or >= 1, got {top_k}")


def _check_cfg(cfg_scale: float, cond: Mapping[str, Tensor] | None) -> None:
    if cfg_scale != 0 and not cond:
        raise ValueError("decoding: cfg_scale != 0 needs a condition (cond) to guide towards")
