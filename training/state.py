"""The training state and what protects it: TrainState (what a checkpoint saves and restores), the
non-finite policy (NonFiniteGuard, decided by all processes together), the window roll-back that lets
steps that do not log run without a host read (Rollback), and the check that replicas agree."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import non_finite, rng_state, save_checkpoint, set_rng_state
from core.config import ConfigError
from core.files import write_json
from core.finite import DeviceFlag, deferred
from core.processes import all_ranks_any
from training.run import RunError


class NonFiniteGuard:
    """What to do with a NaN/inf loss: ``"skip"`` the step (stop after ``patience`` in a row) or ``"stop"``.
    The decision is taken by all processes together: a NaN on one rank skips the step on every rank.

    Two ways to ask. ``bad(loss)`` decides now (a host read of the loss, an all-reduce with several
    processes): the strict path. ``checked(loss, strict=False)`` only notes the verdict into a flag on
    the device (``flag``; the quantizers' input checks note into it too, inside ``deferring``) and lets
    the step train on; ``window_bad`` reads the flag once, and ``Rollback`` then replays the window on
    the strict path. See ``Rollback`` for why this loses nothing."""

    def __init__(self, policy: str, patience: int = 20) -> None:
        if policy not in ("skip", "stop"):
            raise ConfigError(f"nan_policy must be 'skip' or 'stop', got {policy!r}")
        self.policy, self.patience, self.in_a_row, self.skipped = policy, patience, 0, 0
        self.flag, self.noted_last = DeviceFlag(), False  # noted_last: the latest check went to the flag

    def deferring(self, strict: bool) -> contextlib.AbstractContextManager:
        """The block's finiteness checks (the quantizers' input) note into ``flag`` unless ``strict``."""
        return deferred(None if strict else self.flag)

    def checked(self, loss: torch.Tensor, strict: bool) -> bool:
        """``bad(loss)`` when ``strict``; otherwise note the verdict on the device and return False."""
        self.noted_last = not strict
        if strict:
            return self.bad(loss)
        self.flag.note(~torch.isfinite(loss).all())
        return False

    def window_bad(self, device: torch.device) -> bool:
        """Whether any step since the last call noted a non-finite value, on any process (one host read
        and, with several processes, one all-reduce); the flag is cleared. When it is clean and the latest
        check was noted (not decided on the host), finite steps came last: the run of non-finite steps in
        a row is over, as those steps would have ended it on the strict path."""
        if all_ranks_any(self.flag.read(), device):
            return True
        if self.noted_last:
            self.in_a_row = 0
        return False

    def bad(self, loss: torch.Tensor) -> bool:
        """True when this step must be skipped; raises RunError when the run must stop."""
        if not all_ranks_any(not bool(torch.isfinite(loss).all()), loss.device):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        if self.policy == "stop" or self.in_a_row >= self.patience:
            raise RunError(f"loss is {float(loss)} on this process ({self.in_a_row} non-finite step(s) in a row on "
                           f"some process, policy '{self.policy}'); stopping. The last checkpoint is intact: lower "
                           f"the learning rate or use mixed_precision=no, then --resume")
        return True


@dataclass
class TrainState:
    """Everything a checkpoint restores besides the config: weights, EMA, optimizer, extra modules and
    optimizers (by name, e.g. the discriminator), the step and (on save) every RNG."""

    model: torch.nn.Module  # the unwrapped model
    ema: Any
    optimizer: Any
    extra: dict[str, Any] = field(default_factory=dict)
    step: int = 0

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Load a checkpoint of the common layout (see ``save``) into this state, RNGs included."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for name, obj in self.extra.items():
            obj.load_state_dict(ckpt["extra"][name])
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"])

    def snapshot(self) -> dict[str, Any]:
        """The checkpoint's content (without config and meta), copied in memory where the tensors live:
        ``restore`` takes it back. Device copies only, no host read. ``restore`` may adopt its tensors,
        so a snapshot is restored at most once."""
        return _copied({"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "step": self.step, "rng": rng_state(),
                        "extra": {name: obj.state_dict() for name, obj in self.extra.items()}})

    def save(self, run_dir: Path, accelerator: Any, kind: str, config: dict[str, Any], meta: dict[str, Any]) -> None:
        """Check that the replicas agree and the weights are finite, then write the checkpoint atomically:
        {kind, config (the training config), meta (provenance), step, model, ema, optimizer, rng, extra}.
        Non-finite weights are refused, so checkpoint.pt is always the last good one."""
        sums = check_replicas(accelerator, self.model)  # every process must hold the same weights and codebook
        for name, module in (("weights", self.model), ("EMA weights", self.ema.model)):
            if bad := non_finite(module.state_dict()):
                raise RunError(f"step {self.step}: the {name} are not finite ({bad}); not saved, the "
                               f"checkpoint in {run_dir} is the last good one: lower the learning rate, then --resume")
        if accelerator.is_main_process:
            write_json(run_dir / "replicas.json", {"step": self.step, "processes": accelerator.num_processes,
                                                   "checksums": sums})
            save_checkpoint(run_dir / "checkpoint.pt", {
                "kind": kind, "config": config, "meta": meta, "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                "extra": {name: obj.state_dict() for name, obj in self.extra.items()}})
        accelerator.wait_for_everyone()


def _copied(tree: Any) -> Any:
    """A copy of nested dicts / lists / tuples whose tensors are cloned (on their device); other leaves shared."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return type(tree)((k, _copied(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copied(v) for v in tree)
    return tree


class Rollback:
    """The non-finite guard without a host read in the steps that do not log.

    Deciding at every step whether to skip it needs the loss on the host: on a GPU, a stall per step
    until the device has caught up. Instead, the loop runs the steps of a window (the steps between two
    steps that log, write images, checkpoint or stop: those read the device anyway) on the fast path:
    every check notes into the guard's device flag (``NonFiniteGuard.checked``, the quantizers' input
    check) and the step trains on regardless. At the window's last step, ``settle`` reads the flag once.
    Clean (the usual case): nothing else happens, and the fast path computed exactly what the strict
    path would have (the same ops, the same random draws). Not clean: the whole training state goes back
    to the window's start (weights, EMA, optimizers, quantizer buffers, RNGs, the loop's own metrics
    and data position: ``mark``'s copy, in device memory) and the window's steps run again on the strict
    path, each deciding on the host as before: a non-finite step is skipped (and printed) or stops the
    run with the same one-line error, at the same step, only later in wall time. So no finite step is
    lost, nothing non-finite is ever kept, logged or saved. Costs: one device copy of the training
    state per window, and a window computed twice when it held a non-finite value."""

    def __init__(self, state: TrainState, guard: NonFiniteGuard, device: torch.device,
                 save_loop: Callable[[], Any], load_loop: Callable[[Any], None], enabled: bool = True) -> None:
        self.state, self.guard, self.device, self.enabled = state, guard, device, enabled  # off: every step strict
        self.save_loop, self.load_loop = save_loop, load_loop  # the loop's own state: metrics, data position
        self.start: tuple[dict[str, Any], Any] | None = None

    def mark(self) -> None:
        """Copy the state: a window starts here. (The old copy goes first: only one is held.)"""
        self.start = None
        if self.enabled:
            self.start = (self.state.snapshot(), self.save_loop())

    def settle(self, advance: Callable[[], None]) -> bool:
        """At a window's last step: when the window held a non-finite value, go back to ``mark`` and run
        ``advance`` (one strict step) up to this step again. Returns whether it did."""
        if not self.enabled or not self.guard.window_bad(self.device):
            return False
        target = self.state.step
        snapshot, loop = self.start
        self.start = None
        self.state.restore(snapshot)
        self.load_loop(loop)
        while self.state.step < target:
            advance()
        return True


def state_checksum(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in order: equal checksums = bit-identical replicas."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_replicas(accelerator: Any, module: torch.nn.Module) -> list[str]:
    """All processes must hold bit-identical weights (and codebooks); raise RunError if they do not."""
    from accelerate.utils import gather_object

    sums = gather_object([state_checksum(module)]) if accelerator.num_processes > 1 else [state_checksum(module)]
    if len(set(sums)) > 1:
        raise RunError(f"replicas diverged: weight checksums per process {sums}")
    return sums
