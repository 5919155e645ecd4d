"""Atomic writes of small files: a hidden temp file next to the target, then a rename.

A kill at any moment leaves the old file or the new one, never a torn one; ``prepare_run_dir`` removes
temp files a kill left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from core.errors import UserError, describe_os_error


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write: a hidden temp file next to ``path`` (cleaned up by prepare_run_dir), then rename.
    A failure (disk full, read-only folder) raises UserError and leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {describe_os_error(e)}; the previous file is intact") from None


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# Both training stages end by writing their final validation here (EMA weights); runs written before the
# name was shared used val_metrics.json (tokenizer) and train_metrics.json (MaskGIT), still read.
FINAL_METRICS = "final_metrics.json"
_FORMER_NAMES = ("val_metrics.json", "train_metrics.json")


def final_metrics_path(stage_dir: str | os.PathLike) -> Path:
    """Where a stage's final metrics are: final_metrics.json, or a run's former name when only that exists."""
    stage_dir = Path(stage_dir)
    for name in (FINAL_METRICS, *_FORMER_NAMES):
        if (stage_dir / name).exists():
            return stage_dir / name
    return stage_dir / FINAL_METRICS


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: the one file hash of the project."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
