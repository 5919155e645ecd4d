"""Exported models: a folder per model holding ``model.safetensors`` (the weights) and ``config.json``
(everything needed to rebuild the model, plus what its users need to know: provenance, and for MaskGIT
the decoding defaults and the identity of its tokenizer).

    tokenizer = VQModel.from_pretrained("exports/celeba64/tokenizer")
    maskgit = MaskGIT.from_pretrained("exports/celeba64/maskgit")

A training checkpoint (``core.checkpoint``) is the resumable file: optimizer, RNG, raw and EMA weights.
An export is what people share: one set of weights (EMA unless chosen otherwise), no pickle, no
training state. safetensors holds tensors only, so a file cannot run code when loaded; the quantizer's
non-tensor extra state (the in-place optimizer's momentum) is training state and is not exported.

Why not huggingface_hub's ``PyTorchModelHubMixin``: it rebuilds the model from ``config.json`` by
passing the JSON to ``__init__``; our models take one typed, nested config dataclass, and its decoding
of nested dataclasses does not apply under ``from __future__ import annotations`` (it hands the
constructor a plain dict). Writing the two functions here costs ~100 lines and keeps the one config
idiom (``core.config.from_dict``: unknown keys and wrong types raise). The folders it writes are the
usual layout, so ``huggingface_hub.upload_folder`` can push one as is.

Loading is strict: a missing, extra or wrongly shaped tensor, a file that is not safetensors, or a
config of another kind is one ``CheckpointError`` line naming the folder. model.safetensors carries the
``content_sha256`` of its tensors in its metadata, checked on load: flipped bytes are refused, not
sampled from (exports written before the hash load unchecked); so are weights that are not finite.
Exported files are readable by everyone (0644), like any file a user shares.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from core.checkpoint import FORMAT, CheckpointError, content_sha256, file_sha256, non_finite
from core.config import ConfigError, from_dict, to_dict
from core.files import write_json

WEIGHTS, CONFIG = "model.safetensors", "config.json"
EXPORT_VERSION = 1
M = TypeVar("M", bound="Pretrained")


def is_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is an exported model folder (rather than a checkpoint or a run directory)."""
    return (Path(path) / WEIGHTS).is_file()


def weights_sha256(path: str | os.PathLike) -> str:
    """``file_sha256`` of a checkpoint, or of an exported folder's model.safetensors: what made a set of samples."""
    return file_sha256(Path(path) / WEIGHTS if is_export(path) else path)


def tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict without non-tensor extra state and without aliases (a module registered under
    two names, e.g. the decoder's last conv, is stored once, under its first name), contiguous, on the CPU."""
    state, seen = {}, set()
    for k, v in module.state_dict().items():
        if isinstance(v, torch.Tensor) and (key := (v.data_ptr(), v.shape, v.stride())) not in seen:
            seen.add(key)
            state[k] = v.detach().cpu().contiguous()
    return state


def read_config(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The config.json of an exported ``kind`` ("tokenizer" / "maskgit") model folder, checked."""
    folder = Path(folder)
    if not is_export(folder):
        raise CheckpointError(f"{folder} is not an exported model folder (no {WEIGHTS}); export one with export.py")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: cannot read the model config ({type(e).__name__})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG} is not a {FORMAT} model config")
    if config.get("kind") != kind:
        raise CheckpointError(f"{folder} holds a {config.get('kind')!r} model, but a {kind!r} model was expected here")
    if config.get("export_version") != EXPORT_VERSION:
        raise CheckpointError(f"{folder}: export version {config.get('export_version')!r}, this code reads {EXPORT_VERSION}")
    return config


def load_strict(module: nn.Module, folder: str | os.PathLike) -> None:
    """Load ``folder``/model.safetensors into ``module``: every tensor present, none extra, shapes equal."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    try:
        state = load_file(path)
        with safe_open(path, "pt") as f:
            written = (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a safetensors file ({str(e)[:120]})") from None
    if written is not None and content_sha256(dict(sorted(state.items()))) != written:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the sha256 written with them (damaged on "
                              f"disk or in a copy); export again from the checkpoint")
    if bad := non_finite(state):
        raise CheckpointError(f"{path}: the weights are not finite ({bad}); refused")
    expected = tensor_state(module)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or shapes:
        k = shapes[0] if shapes else ""
        what = (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}" if extra
                else f"{k} has shape {tuple(state[k].shape)}, the config gives {tuple(expected[k].shape)}")
        raise CheckpointError(f"{path} does not fit its config.json: {what}")
    dtypes = [k for k in expected if state[k].dtype != expected[k].dtype]
    if dtypes:
        raise CheckpointError(f"{path}: {dtypes[0]} is {state[dtypes[0]].dtype}, expected {expected[dtypes[0]].dtype}")
    # strict=False for the aliases and the extra state (training state, never exported); every tensor was checked above
    module.load_state_dict(state, strict=False)


class Pretrained:
    """``save_pretrained(folder, **info)`` / ``cls.from_pretrained(folder)`` for a module built from one typed
    config ``self.cfg`` of class ``config_class``; ``kind`` names the model in config.json."""

    kind: str
    config_class: type
    cfg: Any

    def save_pretrained(self, folder: str | os.PathLike, **info: Any) -> Path:
        """Write model.safetensors (this module's tensors) and config.json ({format, kind, export_version,
        model: the config, **info}); each file atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS}.tmp"
        state = tensor_state(self)
        save_file(state, str(tmp), metadata={"format": FORMAT, "kind": self.kind,
                                             "sha256": content_sha256(dict(sorted(state.items())))})
        os.chmod(tmp, 0o644)  # safetensors writes 0600: a shared folder must be readable
        os.replace(tmp, folder / WEIGHTS)
        write_json(folder / CONFIG, {"format": FORMAT, "kind": self.kind, "export_version": EXPORT_VERSION,
                                     "model": to_dict(self.cfg), **info})
        return folder

    @classmethod
    def from_pretrained(cls: type[M], folder: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        """The model saved in ``folder`` by ``save_pretrained``, in eval mode on ``device``."""
        config = read_config(folder, cls.kind)
        try:
            model = cls(from_dict(cls.config_class, config["model"]))
        except (ConfigError, KeyError) as e:
            raise CheckpointError(f"{Path(folder) / CONFIG}: bad model config: {e}") from None
        load_strict(model, folder)
        return model.to(device).eval()
