"""The mask schedule gamma, shared by MaskGIT training and decoding.

MaskGIT (Chang et al., CVPR 2022, sec. 3.2-3.3) uses one function gamma: [0, 1] -> [0, 1],
monotonically decreasing from gamma(0) = 1 to gamma(1) = 0, in two places:

* training: sample r ~ U(0, 1) and mask ceil(gamma(r) * N) of the N tokens (at least one);
* decoding: after step t of T, keep floor(gamma((t + 1) / T) * N) tokens masked.

Keeping both uses in this one module is what makes "the schedule the model was trained on" and
"the schedule it is decoded with" the same thing by construction (docs/method.md section 5).
"""

from __future__ import annotations

import math
from typing import overload

import torch
from torch import Tensor

# Names accepted by `gamma`; the paper's Fig. 8 compares these families.
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "square", "sqrt", "arccos")


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown mask schedule {name!r}; valid names: {', '.join(SCHEDULES)}")


@overload
def gamma(r: float, name: str = "cosine") -> float: ...
@overload
def gamma(r: Tensor, name: str = "cosine") -> Tensor: ...


def gamma(r: float | Tensor, name: str = "cosine") -> float | Tensor:
    """Mask ratio gamma(r) for r in [0, 1]; a Python float in, a float out; a tensor in, a tensor out.

    cosine  cos(pi/2 r)      (MaskGIT default; written as sin(pi/2 (1 - r)) so both ends are exact)
    linear  1 - r
    square  1 - r^2
    sqrt    1 - sqrt(r)
    arccos  arccos(r) / (pi/2)
    """
    _check_name(name)
    is_tensor = isinstance(r, Tensor)
    if is_tensor:
        # checked on CPU tensors only: on a GPU the check would wait for the device at every training
        # step, and the training code draws r in [0, 1) itself
        if r.device.type == "cpu" and r.numel() and (r.min() < 0 or r.max() > 1):
            raise ValueError("gamma: r must lie in [0, 1]")
        fns = {"sin": torch.sin, "sqrt": torch.sqrt, "arccos": torch.arccos}
    else:
        r = float(r)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"gamma: r must lie in [0, 1], got {r}")
        fns = {"sin": math.sin, "sqrt": math.sqrt, "arccos": math.acos}

    if name == "cosine":
        # cos(pi/2 r) == sin(pi/2 (1 - r)); the sine form gives gamma(1) == 0.0 exactly, where
        # cos(pi/2) is 6e-17 and would leave one spurious token masked under ceil().
        return fns["sin"](math.pi / 2 * (1 - r))
    if name == "linear":
        return 1 - r
    if name == "square":
        return 1 - r * r
    if name == "sqrt":
        return 1 - fns["sqrt"](r)
    return fns["arccos"](r) / (math.pi / 2)  # "arccos"


@overload
def num_masked_train(r: float, n: int, name: str = "cosine") -> int: ...
@overload
def num_masked_train(r: Tensor, n: int, name: str = "cosine") -> Tensor: ...


def num_masked_train(r: float | Tensor, n: int, name: str = "cosine") -> int | Tensor:
    """Tokens to mask for a training sample with ratio r: ceil(gamma(r) N), clipped to [1, N].

    At least one token is always masked (MaskGIT sec. 3.2), otherwise the sample has no loss.
    A tensor r (any float dtype; float64 recommended for exact counts) gives a long tensor.
    """
    if n < 1:
        raise ValueError(f"num_masked_train: N must be >= 1, got {n}")
    g = gamma(r, name)
    if isinstance(g, Tensor):
        return torch.ceil(g * n).long().clamp(1, n)
    return min(max(math.ceil(g * n), 1), n)


@overload
def num_masked_decode(t: int, steps: int, n: int, name: str = "cosine",
                      currently_masked: None = None) -> int: ...
@overload
def num_masked_decode(t: int, steps: int, n: int | Tensor, name: str = "cosine",
                      currently_masked: Tensor | None = None) -> Tensor: ...


def num_masked_decode(
    t: int,
    steps: int,
    n: int | Tensor,
    name: str = "cosine",
    currently_masked: Tensor | None = None,
) -> int | Tensor:
    """Tokens that stay masked after decoding step t (0-based) of T = `steps`.

    Schedule value: floor(gamma((t + 1) / T) * N), and exactly 0 after the last step.
    N is the number of positions being generated: the sequence length for full generation, the
    size of the region to fill for inpainting (may be a per-sample long tensor).

    With `currently_masked` (per-sample long tensor, masked count *before* step t) the value is
    clipped as in MaskGIT's decoder (docs/method.md section 5): to at most currently_masked - 1, so each
    step fixes at least one token while any remain, and to at least 1 before the last step, so the
    last step has something left to decide. When the two bounds conflict (currently_masked <= 1
    before the last step) progress wins: the remaining token is fixed now. This also keeps the
    count at 0, never 1, for a sample with nothing to generate.
    """
    if steps < 1 or not 0 <= t < steps:
        raise ValueError(f"num_masked_decode: need 0 <= t < steps and steps >= 1, got t={t}, steps={steps}")
    last = t == steps - 1
    g = 0.0 if last else gamma((t + 1) / steps, name)
    if isinstance(n, Tensor):
        # float64 so floor() sees the same value as the Python-float formula
        target = torch.floor(g * n.double()).long()
    else:
        target = math.floor(g * n)
    if currently_masked is None:
        return target
    if last:
        return torch.zeros_like(currently_masked)
    target = torch.as_tensor(target, device=currently_masked.device)
    return torch.minimum(target.clamp(min=1), currently_masked - 1).clamp(min=0)
