"""Self-describing checkpoints, written atomically and loaded without executing code.

A checkpoint is one file holding a dict of tensors and plain Python values only:

    {"format": "straight-maskgit", "version": 2, "kind": "tokenizer" | "maskgit",
     "config": the training config, "meta": provenance (MaskGIT: tokenizer path, sha256 and weights,
     code directory, attribute names), "step": int, "model": state_dict, "ema": state_dict,
     "optimizer": ..., "rng": ..., "extra": {name: state_dict} (e.g. the discriminator)}

Both stages write it with ``training.state.TrainState.save`` and read it back with ``restore``.

It is saved with ``torch.save`` to a temporary file in the same directory, fsync'ed and renamed over
the target (``os.replace`` is atomic on POSIX), so a kill at any moment leaves either the old or the
new file, never a torn one. It is loaded with ``torch.load(weights_only=True)``: a pickle that tries
to build arbitrary objects (the classic ``__reduce__`` exploit) is refused before anything runs.

Every checkpoint carries ``"sha256"``, the ``content_sha256`` of the rest of its content (every tensor's
bytes, dtype and shape, every plain value), checked on load: bytes flipped on disk or in a copy are one
``CheckpointError`` naming the file, never weights trained or sampled from. Weights (``model``/``ema``)
that are not finite are refused on load too. (Checkpoints written before the hash load unchecked.)
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.files import sha256_file

FORMAT = "straight-maskgit"
VERSION = 2  # 2: the same layout for both stages (config = training config, meta = provenance)


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, unsafe or of the wrong kind."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` (tensors and plain values only) to ``path``."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    payload["sha256"] = content_sha256(payload)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint in {path.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not save checkpoint {path}: {why}; the previous checkpoint is intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file a user means: the file itself, or a run directory's checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; ``kind`` ("tokenizer" / "maskgit") is checked when given. A run
    directory stands for its checkpoint.pt."""
    path = checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(f"refused to load {path}: it is not a plain-tensor checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    if "sha256" in ckpt and content_sha256({k: v for k, v in ckpt.items() if k != "sha256"}) != ckpt.pop("sha256"):
        raise CheckpointError(f"{path} is corrupt: its content does not match the sha256 written with it (damaged on "
                              f"disk or in a copy); restore a good copy, or train again")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, but a {kind!r} checkpoint was expected here")
    for part in ("model", "ema"):
        if bad := non_finite(ckpt.get(part)):
            raise CheckpointError(f"{path}: the {part} weights are not finite ({bad}); refused, use an earlier checkpoint")
    ckpt.setdefault("meta", {})
    if ckpt.get("version") == 1 and ckpt.get("kind") == "maskgit":  # v1 kept provenance next to the training config
        meta = dict(ckpt["config"])
        ckpt["config"] = meta.pop("train")
        meta.pop("model")
        ckpt["meta"], ckpt["version"] = meta, VERSION
    return ckpt


def content_sha256(obj: Any) -> str:
    """sha256 (hex) of a checkpoint's content: dicts (keys in order), lists, tuples, tensors (dtype, shape,
    bytes) and plain values (their repr), so a flipped byte anywhere a value comes from changes it."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__[0]}{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def non_finite(state: Any) -> str:
    """The names (at most three, comma-separated) of a state dict's floating tensors that hold NaN or inf; ''
    when all are finite or ``state`` is not a dict."""
    if not isinstance(state, dict):
        return ""
    bad = [str(k) for k, t in state.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    return ", ".join(bad[:3])


def file_sha256(path: str | os.PathLike, prefix: int = 16) -> str:
    """First ``prefix`` hex digits of a file's sha256 (a run directory: its checkpoint.pt). Ties code
    files to their tokenizer and to their header."""
    return sha256_file(checkpoint_path(path))[:prefix]


def rng_state() -> dict[str, Any]:
    """All RNG states a resumed run needs, as tensors / plain values (weights_only-safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
