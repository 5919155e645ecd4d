"""Finiteness checks that do not wait for the device.

A check that raises at once must read the tensor on the host: on a GPU that stalls the queue until the
device has caught up. Inside ``deferred(flag)`` the checks that support it (``note_non_finite``: the
quantizers' input check) instead OR their verdict into ``flag``, a boolean on the device, and return
at once; whoever opened the block reads the flag later, once, and decides then (the training loops do
so at the end of each log window, see ``training.state.Rollback``). Outside such a block nothing changes:
the caller checks on the host and raises as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor


class DeviceFlag:
    """'Something was not finite', kept where the tensors live; ``read`` is the one host read."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def note(self, bad: Tensor) -> None:
        """OR a boolean (0-dim) tensor into the flag, on its device, without reading it."""
        self.value = bad if self.value is None else self.value | bad.to(self.value.device)

    def read(self) -> bool:
        """True when any noted verdict was True (one host read); the flag is cleared."""
        value, self.value = self.value, None
        return value is not None and bool(value)


_active: ContextVar[DeviceFlag | None] = ContextVar("deferred_finite_checks", default=None)


@contextlib.contextmanager
def deferred(flag: DeviceFlag | None) -> Iterator[None]:
    """Checks inside the block note into ``flag`` instead of raising (no-op for ``flag=None``)."""
    token = _active.set(flag)
    try:
        yield
    finally:
        _active.reset(token)


def note_non_finite(x: Tensor) -> bool:
    """Inside ``deferred``: note whether ``x`` holds NaN/inf into the block's flag and return True (the
    caller skips its own check). Outside: return False (the caller checks on the host).

    One reduction: the sum (accumulated in fp32) is not finite exactly when an element is not, or when
    finite elements overflow it; such a false alarm costs the flag's owner a second look, nothing more."""
    flag = _active.get()
    if flag is None:
        return False
    flag.note(~torch.isfinite(x.sum(dtype=torch.float32)))
    return True
