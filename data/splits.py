"""Deterministic held-out splits, and JSON-able descriptions of them for the run directory.

When a dataset ships no official partition, the validation set is chosen by *hash rank*: every file
gets the key ``sha256(f"{seed}:{relative_path}")`` and the ``n_val`` files with the smallest keys are
validation. This is a seeded permutation that depends on nothing but the seed and the file names:
not on the OS's listing order, a library's RNG stream, or the machine. Adding files to a folder moves
only a few files across the boundary instead of reshuffling everything.

``n_val = floor(n * val_fraction + 0.5)`` (round half up, computed so that float error cannot turn
1000.0 into 999), clamped to [1, n - 1]: 10,000 images at 0.1 give exactly 9,000 / 1,000.

The description records the method, seed, fraction, counts and the sha256 of the sorted validation
key list, so a reader can check that two runs evaluated on the same images.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from data.images import DataError

SPLITS = ("train", "val", "test", "all")
_ALIASES = {"valid": "val", "validation": "val"}


def normalize_split(split: str) -> str:
    """'train' | 'val' (alias 'valid', 'validation') | 'test' | 'all'; anything else is a ValueError."""
    if not isinstance(split, str):
        raise DataError(f"split must be a string, one of {SPLITS}, got {split!r}")
    name = _ALIASES.get(split.lower(), split.lower())
    if name not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {SPLITS} (or alias 'valid')")
    return name


def check_val_fraction(val_fraction: float) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise DataError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in (0, 1) exclusive, got {val_fraction}")
    return float(val_fraction)


def num_val(n: int, val_fraction: float) -> int:
    """Validation size for ``n`` items: round half up, then at least 1 and at most n - 1 (n >= 2)."""
    check_val_fraction(val_fraction)
    if n < 2:
        raise DataError(f"cannot split {n} item(s) into non-empty train and validation sets")
    # n * f can land a hair below an integer (0.29 * 100 = 28.999...); the rounding absorbs it.
    k = int(math.floor(n * val_fraction + 0.5))
    return min(max(k, 1), n - 1)


def _rank_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogateescape")).digest()


def list_sha256(keys: Sequence[str]) -> str:
    """sha256 of the sorted keys joined by newlines: a fingerprint of a set of files."""
    text = "\n".join(sorted(keys))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def seeded_split(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (into ``keys``) of train and validation, each in ascending order; disjoint, complete.

    Keys must be unique (relative paths). Deterministic in (keys, val_fraction, seed) only.
    """
    if len(set(keys)) != len(keys):
        raise DataError("split keys must be unique")
    k = num_val(len(keys), val_fraction)
    order = sorted(range(len(keys)), key=lambda i: _rank_key(seed, keys[i]))
    val = sorted(order[:k])
    train = sorted(order[k:])
    return train, val


def describe_seeded(keys: Sequence[str], train: Sequence[int], val: Sequence[int],
                    val_fraction: float, seed: int) -> dict:
    """JSON-able record of a ``seeded_split`` (test is the validation set; there is no test set)."""
    return {
        "method": "seeded_hash_rank",
        "rule": "val = the n_val keys with smallest sha256(f'{seed}:{relative_path}'), "
                "n_val = floor(n * val_fraction + 0.5)",
        "seed": seed,
        "val_fraction": val_fraction,
        "counts": {"train": len(train), "val": len(val), "test": len(val), "all": len(keys)},
        "val_sha256": list_sha256([keys[i] for i in val]),
        "note": "no official partition: split 'test' is the validation set",
    }


def index_range_split(n: int, val_fraction: float) -> tuple[range, range]:
    """Train = the first ``n - n_val`` indices, validation = the last ``n_val`` (procedural data)."""
    k = num_val(n, val_fraction)
    return range(0, n - k), range(n - k, n)
