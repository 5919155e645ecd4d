"""Reference statistics: computed once per protocol, cached as ``.npz`` + ``.json``, refused on mismatch.

A reference is identified by its *protocol*: which images (``source``, ``split``, and the split's
``val_fraction`` / ``split_seed`` / ``num_images``), how they were made (``resolution``, ``crop``), and
which extractor saw them (``weights_sha256``). ``<name>.npz`` holds ``mu`` (2048,), ``sigma``
(2048, 2048) float64, ``count`` and, for KID, ``features`` (k, 2048) float32: a seeded uniform sample of
at most ``keep_features`` images (8 KiB each). ``<name>.json`` (the sidecar) holds the protocol, the
extractor description, the preprocessing and the dataset's own ``describe()``. Loading with an
expected protocol compares field by field and names every field that differs.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.files import write_text
from eval.errors import EvalError, ReferenceMismatchError
from eval.images import ImageSet, as_uint8_nchw, checked_uint8, with_progress
from eval.inception import FEATURE_DIM, InceptionExtractor
from eval.stats import FeatureStats

FORMAT = "straight-maskgit reference statistics v1"
PROTOCOL_FIELDS = ("source", "split", "resolution", "crop", "val_fraction", "split_seed", "num_images",
                   "weights_sha256")
KEEP_FEATURES = 20_000  # default KID sample kept with a reference: 164 MB in the .npz
UINT8_RULE = "uint8 = round((x + 1) * 127.5) clamped to [0, 255] (eval.images.to_uint8)"


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    count: int
    features: np.ndarray | None  # (k, D) float32 for KID, or None
    protocol: dict  # PROTOCOL_FIELDS -> value
    meta: dict  # the whole sidecar

    @property
    def resolution(self) -> int:
        return int(self.protocol["resolution"])


def dataset_protocol(cfg, split: str) -> dict:
    """Protocol fields of a ``data.DataConfig`` split (weights are added when statistics are computed).

    Fields the data package ignores for this source are None, so they cannot cause false mismatches:
    ``crop`` for procedural faces (drawn at the resolution), ``num_images`` for image files.
    """
    from data import normalize_split  # 'valid' and 'val' name one split

    procedural = str(cfg.source) == "procedural"
    source = str(cfg.source) if procedural else str(Path(cfg.source).resolve())  # one spelling per folder
    return {"source": source, "split": normalize_split(split), "resolution": int(cfg.resolution),
            "crop": None if procedural else cfg.crop, "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed, "num_images": cfg.num_images if procedural else None}


def folder_protocol(images: ImageSet) -> dict:
    """Protocol fields of a folder / .npz used as its own reference set (square images only)."""
    if images.height != images.width:
        raise EvalError(f"{images.path}: reference images must be square, got {images.width}x{images.height}")
    return {"source": f"{images.kind}:{images.path}", "split": None, "resolution": images.height,
            "crop": None, "val_fraction": None, "split_seed": None, "num_images": images.count}


def dataset_batches(cfg, split: str, batch_size: int,
                    uint8: bool = True) -> tuple[Iterator[torch.Tensor], int, dict]:
    """Batches of a split of the project's dataset (no flip), its length and ``describe()``.

    The dataset comes from the ``data`` package: ``build_dataset(cfg, split, train=False)`` yields
    ``{"image": (3, H, W) float in [-1, 1], ...}``; images are converted by ``checked_uint8`` only.
    ``uint8=False`` keeps the float images (a tokenizer's input for reconstruction FID).
    """
    from data import build_dataset  # imported here: only needed when a dataset is the source

    dataset = build_dataset(cfg, split=split, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=getattr(cfg, "num_workers", 0))
    batches = (checked_uint8(batch["image"]) if uint8 else batch["image"] for batch in loader)
    describe = dataset.describe() if hasattr(dataset, "describe") else {}
    return batches, len(dataset), describe


def compute_reference(batches: Iterable[torch.Tensor], extractor: InceptionExtractor, protocol: dict, *,
                      keep_features: int = KEEP_FEATURES, total: int | None = None, progress: bool = False,
                      preprocessing: str = "", description: dict | None = None) -> ReferenceStats:
    """Stream uint8 batches through the extractor into a ``ReferenceStats`` (not yet saved)."""
    missing = set(PROTOCOL_FIELDS) - {"weights_sha256"} - set(protocol)
    if missing:
        raise EvalError(f"reference protocol lacks fields {sorted(missing)}")
    resolution = int(protocol["resolution"])
    stats = FeatureStats(FEATURE_DIM, keep_features=keep_features)
    for batch in with_progress(batches, total, "reference features", progress):
        x = as_uint8_nchw(batch, "reference images")
        if x.shape[-2:] != (resolution, resolution):
            raise EvalError(f"reference images are {tuple(x.shape[-2:])}, protocol says {resolution}x{resolution}")
        stats.update(extractor(x))
    if stats.count < 2:
        raise EvalError(f"a reference needs at least 2 images, got {stats.count}")
    protocol = {**protocol, "weights_sha256": extractor.weights.sha256}
    features = stats.features()
    meta = {"format": FORMAT, "protocol": protocol, "count": stats.count,
            "kid_features": 0 if features is None else len(features),
            "preprocessing": f"{preprocessing}; {UINT8_RULE}" if preprocessing else UINT8_RULE,
            "extractor": extractor.describe(), "dataset": description or {},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return ReferenceStats(stats.mu, stats.sigma, stats.count, features, protocol, meta)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_reference(path: str | os.PathLike, ref: ReferenceStats) -> tuple[Path, Path]:
    """Write ``path`` (.npz) and its ``.json`` sidecar, each atomically (temp file, then rename)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise EvalError(f"reference file must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": ref.mu, "sigma": ref.sigma, "count": np.int64(ref.count)}
    if ref.features is not None:
        arrays["features"] = ref.features
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    side = sidecar_path(path)
    write_text(side, json.dumps(ref.meta, indent=2, default=str) + "\n")
    return path, side


def check_protocol(protocol: dict, expect: dict, what: str) -> None:
    """Raise ``ReferenceMismatchError`` naming every field of ``expect`` that ``protocol`` differs in."""
    unknown = set(expect) - set(PROTOCOL_FIELDS)
    if unknown:
        raise EvalError(f"unknown protocol fields {sorted(unknown)}; known: {list(PROTOCOL_FIELDS)}")
    diffs = [f"{k}: reference {protocol.get(k)!r} vs requested {v!r}"
             for k, v in expect.items() if protocol.get(k) != v]
    if diffs:
        raise ReferenceMismatchError(f"{what} was computed under another protocol ({'; '.join(diffs)}); "
                                     f"recompute it with `python -m eval ref` (--force overwrites)")


def load_reference(path: str | os.PathLike, expect: dict | None = None) -> ReferenceStats:
    """Load ``path`` and its sidecar; with ``expect``, refuse it unless those protocol fields match."""
    path, side = Path(path), sidecar_path(path)
    if not path.is_file():
        raise EvalError(f"reference statistics {path} not found (build them with `python -m eval ref`)")
    if not side.is_file():
        raise EvalError(f"{path}: sidecar {side.name} missing, so its protocol is unknown; recompute it")
    try:
        meta = json.loads(side.read_text())
        with np.load(path, allow_pickle=False) as f:
            mu, sigma, count = f["mu"], f["sigma"], int(f["count"])
            features = f["features"] if "features" in f.files else None
    except Exception as e:  # noqa: BLE001 - bad zip, bad JSON, missing arrays
        raise EvalError(f"{path}: cannot read reference statistics ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT or "protocol" not in meta:
        raise EvalError(f"{side}: not a reference sidecar of format {FORMAT!r}")
    if meta.get("count") != count or mu.shape != (sigma.shape[0],) or sigma.ndim != 2:
        raise EvalError(f"{path}: arrays (count {count}, mu {mu.shape}, sigma {sigma.shape}) "
                        f"disagree with the sidecar")
    if expect:
        check_protocol(meta["protocol"], expect, f"reference {path}")
    return ReferenceStats(mu.astype(np.float64), sigma.astype(np.float64), count, features, meta["protocol"], meta)
