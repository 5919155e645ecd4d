"""What both training scripts share around their loops: the command line and config, the run directory
and its lock, the log and its metric window, signals, the Accelerator. The training state, the NaN policy
and the replica checks are in training/state.py; the loops themselves stay in the scripts."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from core.checkpoint import load_checkpoint
from core.config import ConfigError, apply_overrides, stored_config, to_dict
from core.errors import UserError
from core.files import write_text
from core.processes import all_ranks_any, distributed, multi_cpu

T = TypeVar("T")


class RunError(UserError):
    """A problem with the run (directory, resume, numerics) that stops it with a one-line message."""


def base_parser(description: str, presets: dict[str, Any], default_preset: str) -> argparse.ArgumentParser:
    """The training scripts' command line; --help lists every config key with the default preset's value."""
    keys = "\n".join(f"  {k}={v}" for k, v in flatten(to_dict(presets[default_preset])).items())
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"config keys (key=value overrides; values of the {default_preset!r} preset, "
                                       f"--print-config shows another preset's):\n{keys}")
    p.add_argument("--preset", default=default_preset, choices=sorted(presets), help="named configuration")
    p.add_argument("--run-dir", help="where checkpoints, logs and images go (required unless --print-config)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoint.pt if it exists (idempotent: starts fresh otherwise)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a RUN_DIR that holds a checkpoint, deleting its log (without it: refused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, with preset and overrides applied) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.steps=500")
    return p


def parse_run_args(p: argparse.ArgumentParser, presets: dict[str, Any], *required: str,
                   tie: Callable[[list[str]], list[str]] | None = None,
                   recipe: Callable[[str], list[str]] | None = None) -> argparse.Namespace:
    """Parse the command line; --print-config prints preset + overrides as JSON and exits, before the
    flags a run needs (--run-dir and ``required``) are checked. ``recipe`` turns a ``--recipe`` name into
    overrides that go before the command line's own (which therefore win); ``tie`` then rewrites the
    overrides (one setting stored under two keys)."""
    args = p.parse_args()
    if recipe is not None and getattr(args, "recipe", None):
        args.overrides = [*recipe(args.recipe), *args.overrides]
    if tie is not None:
        args.overrides = tie(args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(apply_overrides(presets[args.preset], args.overrides)), indent=2))
        sys.exit(0)
    missing = [f"--{name.replace('_', '-')}" for name in ("run_dir", *required) if getattr(args, name) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def resolve_config(cls: type[T], preset_cfg: T, overrides: list[str], stored: dict[str, Any] | None,
                   fixed: tuple[str, ...] = (), source: str = "the checkpoint") -> T:
    """Preset + overrides, or (on resume) the checkpoint's stored config + overrides. Refused: overrides
    of ``fixed`` keys (set from the data), and on resume any change to the model (its weights would not
    fit); repeating the run's own model overrides on resume is fine."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if any(key == f or key.startswith(f + ".") for f in fixed):
            raise ConfigError(f"{key} comes from the data and cannot be overridden")
    if stored is None:
        return apply_overrides(preset_cfg, overrides)
    base = stored_config(cls, stored, source)  # fields newer than the checkpoint take their defaults here
    cfg = apply_overrides(base, overrides)
    before = flatten(to_dict(base)["model"])
    changed = sorted(k for k, v in flatten(to_dict(cfg)["model"]).items() if before.get(k) != v)
    if changed:
        raise ConfigError(f"model.{changed[0]}: the model cannot change on --resume (the checkpoint's weights would "
                          f"not fit); start a new run directory instead")
    return cfg


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: {"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def open_run(args: argparse.Namespace, kind: str) -> tuple[Path, dict[str, Any] | None]:
    """The run directory (created, writable) and, with --resume, its checkpoint. A directory that
    holds a checkpoint is never reset silently: without --resume it is refused unless --overwrite."""
    run_dir = prepare_run_dir(args.run_dir, owner=args)
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return run_dir, None
    if args.resume:
        return run_dir, load_checkpoint(path, kind=kind)
    if not args.overwrite:
        raise RunError(f"{run_dir} already holds a checkpoint; add --resume to continue it, or --overwrite to "
                       f"start afresh (the checkpoint is then replaced and log.jsonl emptied)")
    return run_dir, None


def prepare_run_dir(path: str | os.PathLike, owner: Any = None) -> Path:
    """Create the run directory and prove it is writable now, not at the first checkpoint hours later.
    With ``owner`` (the run's parsed arguments) the directory is first locked for this process
    (``RunLock``, kept as ``owner.run_lock``), so another run cannot write into it meanwhile."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    if owner is not None:
        owner.run_lock = RunLock(run_dir)  # before the clean-up below: another run's temp files are its own
    for stale in run_dir.glob(".*.tmp"):  # atomic writes cut short by a kill: the targets are intact
        stale.unlink(missing_ok=True)
    return run_dir


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on RUN/.lock, which names its holder (pid, host,
    start time, command). The kernel drops the lock when its process ends, however it ends (a return, an
    error, kill -9), so a lock file left by a dead process is free again: nothing stale to delete by hand.
    Released when this object goes (the run's ``main`` returns) or with ``release``. Under a launcher only
    the first process (RANK 0) takes it: the others are the same run."""

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.file = None
        if int(os.environ.get("RANK", "0")) != 0:
            return
        f = open(run_dir / self.NAME, "a+")  # noqa: SIM115 - held open as long as the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not yet written its name"
            f.close()
            raise RunError(f"{run_dir} is in use by another run ({holder}); wait for it to end or stop it, "
                           f"or choose another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:200]}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()  # closing the file drops the flock

    __del__ = release


class JsonlLog:
    """Append-only metrics log, one JSON object per line; lines past a resumed step are dropped (an
    atomic rewrite). A last line torn by a kill is dropped too; any other unreadable line is an error."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append((json.loads(line), line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise RunError(f"{path}: line {i + 1} is not JSON; fix or delete the line, then --resume") from None
            write_text(path, "".join(line + "\n" for record, line in records if record.get("step", 0) <= resume_step))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class MetricWindow:
    """Per-step metrics summed since the last log line. Averages divide by the steps actually summed:
    the first window after a resume off a log boundary is shorter, and skipped steps add nothing.

    Values may be floats or scalar tensors. Tensors are summed where they live (in float64, as Python
    floats would be), so the window adds no host sync per step: the device is read once per log line,
    in ``averages``. (Nor does the rest of a step that does not log: see ``Rollback``; only the k-means
    init, once, reads the device.)"""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.count, self.items, self.t0 = 0, 0, time.time()

    def add(self, values: dict[str, float | torch.Tensor], items: int) -> None:
        for k, v in values.items():
            v = v.detach().reshape(()).double() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.items += items

    def copy(self) -> MetricWindow:
        """A copy to go back to (``Rollback``): the sums are replaced, never changed in place, by ``add``."""
        other = MetricWindow.__new__(MetricWindow)
        other.__dict__.update(self.__dict__, sums=dict(self.sums))
        return other

    def averages(self, rate_name: str) -> dict[str, float]:
        """The window's means and ``rate_name`` (items per second); then start a new window."""
        on_device = {k: v for k, v in self.sums.items() if isinstance(v, torch.Tensor)}
        if on_device:  # one read of the device for the whole window
            device = next(iter(on_device.values())).device
            self.sums.update(zip(on_device, torch.stack([v.to(device) for v in on_device.values()]).tolist()))
        out = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        out[rate_name] = self.items / max(time.time() - self.t0, 1e-9)
        self.__init__()
        return out


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits with
    ``exit_status`` (128 + the signal: 130 for Ctrl-C, 143 for SIGTERM), never 0, so that
    ``train && next_stage`` and make stop at an unfinished model. ``agreed`` makes the decision
    together: a signal to one process stops them all at the same step. With one process the flag is
    read at every step (a Python bool, no device read); with several, the processes agree (one
    all-reduce and a host read) only at the steps the loop passes as ``due`` (those that log, write
    images or checkpoint), so the steps between them never wait on the host: a signal then takes effect
    at the next such step, at most ``log.log_every`` steps later. A second signal stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signum = signal.SIGTERM  # a stop decided on another process ends this one as terminated
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested, self.signum = signal.Signals(signum).name, signum

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)

    def agreed(self, device: torch.device, due: bool = True) -> bool:
        if not distributed():
            return self.requested is not None
        if not due:
            return False
        if all_ranks_any(self.requested is not None, device) and self.requested is None:
            self.requested = "stop requested on another process"
        return self.requested is not None


def make_accelerator(mixed_precision: str, grad_accum: int, **kwargs: Any) -> Any:
    """Accelerator for CPU / one GPU / many GPUs. Several processes without CUDA (torchrun or
    ``accelerate launch --cpu``) run data-parallel on CPU with the gloo backend. ``kwargs``: the
    tracker's (training.tracking.accelerator_kwargs)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=multi_cpu(),
                       **kwargs)
