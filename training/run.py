"""Run-directory plumbing shared by the training scripts: CLI config, logs, signals, NaN policy."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from training.config import ConfigError, apply_overrides, from_dict, to_dict

T = TypeVar("T")


class RunError(RuntimeError):
    """A problem with the run (directory, resume, numerics) that stops it with a one-line message."""


def base_parser(description: str, presets: dict[str, Any], default_preset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default=default_preset, choices=sorted(presets), help="named configuration")
    p.add_argument("--run-dir", required=True, help="where checkpoints, logs and images go")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoint.pt if it exists (idempotent: starts fresh otherwise)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.steps=500")
    return p


def resolve_config(cls: type[T], preset_cfg: T, overrides: list[str], stored: dict[str, Any] | None) -> T:
    """Preset + overrides, or (on resume) the checkpoint's stored config + overrides."""
    base = from_dict(cls, stored) if stored is not None else preset_cfg
    return apply_overrides(base, overrides)


def prepare_run_dir(path: str | os.PathLike) -> Path:
    """Create the run directory and prove it is writable now, not at the first checkpoint hours later."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    for stale in run_dir.glob(".*.tmp"):  # atomic writes cut short by a kill: the targets are intact
        stale.unlink(missing_ok=True)
    return run_dir


def write_text(path: Path, text: str) -> None:
    """Atomic text write: a hidden temp file next to ``path`` (cleaned up by prepare_run_dir), then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class JsonlLog:
    """Append-only metrics log, one JSON object per line; lines past a resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self) -> None:
        self.requested: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


class NonFiniteGuard:
    """What to do with a NaN/inf loss: ``"skip"`` the step (stop after ``patience`` in a row) or ``"stop"``."""

    def __init__(self, policy: str, patience: int = 20) -> None:
        if policy not in ("skip", "stop"):
            raise ConfigError(f"nan_policy must be 'skip' or 'stop', got {policy!r}")
        self.policy, self.patience, self.in_a_row, self.skipped = policy, patience, 0, 0

    def bad(self, loss: torch.Tensor | float) -> bool:
        """True when this step must be skipped; raises RunError when the run must stop."""
        value = float(loss)
        if math.isfinite(value):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        if self.policy == "stop" or self.in_a_row >= self.patience:
            raise RunError(f"loss is {value} ({self.in_a_row} non-finite step(s) in a row, policy "
                           f"'{self.policy}'); stopping. The last checkpoint is intact: lower the learning "
                           f"rate or use mixed_precision=no, then --resume")
        return True


def main_guard(main: Callable[[], None]) -> None:
    """Run ``main`` and turn expected errors into one line on stderr and exit code 2.

    Config, data and checkpoint errors are ValueErrors with messages written for the user; set
    TRACEBACK=1 to see the stack instead."""
    try:
        main()
    except (ValueError, RunError, FileNotFoundError, PermissionError) as e:  # ConfigError, DataError, CheckpointError
        if os.environ.get("TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)




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


def make_accelerator(mixed_precision: str, grad_accum: int) -> Any:
    """Accelerator for CPU / one GPU / many GPUs. Several processes without CUDA (torchrun or
    ``accelerate launch --cpu``) run data-parallel on CPU with the gloo backend."""
    from accelerate import Accelerator

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=multi_cpu)
