"""The standard FID feature extractor: torch-fidelity's Inception-v3, located, hash-checked and loaded.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat"): the TF
2015-12-05 Inception graph ported to PyTorch, TF1.x-exact bilinear resize of uint8 NCHW input to
299x299, 2048-d pool3 features. It is never re-implemented here; this module only decides *which
weights file* it gets, and refuses files that are not the standard one.

Weights are looked up in this order (``find_weights``), and never downloaded unless asked:

1. an explicit path (``--weights PATH`` / ``path=``),
2. the environment variable ``FID_INCEPTION_WEIGHTS``,
3. torch-fidelity's own cache: ``torch.hub.get_dir()/checkpoints/<file name>``, i.e.
   ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``), where
   ``torch.hub.load_state_dict_from_url`` puts the file when torch-fidelity downloads it,
4. a download from torch-fidelity's release URL into that cache, only with ``allow_download=True``.

Verification (``verify_weights``): the file is named, torch-hub style, after the first 8 hex digits of
its sha256 (``...-6726825d.pth``); the sha256 of the file is computed and must start with them. Any
other file (truncated, converted, random) is refused unless ``allow_unverified=True``, and then every
result computed with it is labelled ``FID(unverified-weights)`` with ``standard_weights: False``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from core.files import sha256_file
from eval.errors import WeightsError
from eval.images import as_uint8_nchw

WEIGHTS_URL = URL_INCEPTION_V3  # taken from the installed torch-fidelity, not copied
WEIGHTS_FILENAME = WEIGHTS_URL.rsplit("/", 1)[-1]  # "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub naming convention: filename-<sha256 prefix>.ext
ENV_WEIGHTS = "FID_INCEPTION_WEIGHTS"
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name for this network
FEATURE_LAYER = "2048"  # pool3, the FID/KID layer
FEATURE_DIM = 2048


def default_cache_path() -> Path:
    """Where torch-fidelity's download lands and where we look last: ``<torch hub dir>/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _where_to_get() -> str:
    return (f"need {WEIGHTS_FILENAME} (sha256 {WEIGHTS_SHA256_PREFIX}...) from {WEIGHTS_URL}; "
            f"pass --weights PATH, set ${ENV_WEIGHTS}, or copy it to {default_cache_path()}")


def find_weights(path: str | os.PathLike | None = None, *, allow_download: bool = False,
                 progress: bool = False) -> Path:
    """Locate the weights file (order in the module docstring) or raise ``WeightsError``."""
    for candidate, origin in ((path, "--weights"), (os.environ.get(ENV_WEIGHTS) or None, f"${ENV_WEIGHTS}")):
        if candidate is not None:
            candidate = Path(candidate).expanduser()
            if not candidate.is_file():
                raise WeightsError(f"Inception weights file {candidate} (from {origin}) not found; {_where_to_get()}")
            return candidate
    cached = default_cache_path()
    if cached.is_file():
        return cached
    if allow_download:
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:  # verifies the sha256 prefix while downloading, as torch hub's check_hash does
            torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), hash_prefix=WEIGHTS_SHA256_PREFIX,
                                           progress=progress)
        except Exception as e:  # noqa: BLE001 - URLError, hash mismatch RuntimeError, OSError
            raise WeightsError(f"download of {WEIGHTS_URL} failed ({type(e).__name__}: {e}); "
                               f"{_where_to_get()}") from None
        return cached
    raise WeightsError(f"FID Inception weights not found (downloads are off by default); {_where_to_get()}")


@dataclass(frozen=True)
class WeightsInfo:
    """A weights file that passed ``verify_weights``; ``standard`` is False for unverified files."""

    path: str
    file_name: str
    sha256: str
    standard: bool


def verify_weights(path: str | os.PathLike, *, allow_unverified: bool = False) -> WeightsInfo:
    """Hash the file; refuse it unless it is the standard file or ``allow_unverified`` is set."""
    path = Path(path)
    digest = sha256_file(path)
    standard = digest.startswith(WEIGHTS_SHA256_PREFIX)
    if not standard and not allow_unverified:
        raise WeightsError(
            f"{path} ({path.stat().st_size} bytes) has sha256 {digest[:16]}..., not {WEIGHTS_SHA256_PREFIX}...: "
            f"not the standard {WEIGHTS_FILENAME} (truncated or another file); re-fetch it from {WEIGHTS_URL}, "
            f"or pass --allow-unverified-weights to get numbers labelled FID(unverified-weights)")
    return WeightsInfo(str(path.resolve()), path.name, digest, standard)


def metric_name(metric: str, standard: bool) -> str:
    """'FID' / 'KID' only for the standard weights; anything else is never called FID."""
    return metric if standard else f"{metric}(unverified-weights)"


def _check_state_dict(path: str) -> None:
    """A plain tensor dict (``weights_only``), before torch-fidelity unpickles the file in full."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise WeightsError(f"{path}: cannot be loaded as a PyTorch state dict, the file is truncated "
                           f"or corrupted ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, expected an InceptionV3 state dict")


class InceptionExtractor:
    """uint8 images ``(B, 3, H, W)`` -> float32 pool3 features ``(B, 2048)``; no gradients, any device."""

    def __init__(self, weights: WeightsInfo, device: str | torch.device = "cpu") -> None:
        if not weights.standard:  # the hash vouches for the standard file; any other is checked first
            _check_state_dict(weights.path)
        try:
            net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER],
                                              feature_extractor_weights_path=weights.path)
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatch
            raise WeightsError(f"{weights.path}: not an InceptionV3 state dict for torch-fidelity "
                               f"({' '.join(str(e).split())[:200]})") from None
        self.weights = weights
        self.device = torch.device(device)
        self.net = net.to(self.device)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, allow_unverified: bool = False,
             allow_download: bool = False, device: str | torch.device = "cpu") -> InceptionExtractor:
        """Find, verify and load the weights (see the module docstring for the lookup order)."""
        found = find_weights(path, allow_download=allow_download)
        return cls(verify_weights(found, allow_unverified=allow_unverified), device)

    @property
    def standard(self) -> bool:
        return self.weights.standard

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = as_uint8_nchw(images)  # (B, 3, H, W) uint8
        (features,) = self.net(x.to(self.device))  # (B, 2048) float32
        return features.cpu().numpy()

    def describe(self) -> dict:
        return {"tool": "torch-fidelity", "version": torch_fidelity.__version__,
                "feature_extractor": EXTRACTOR_NAME, "feature_layer": FEATURE_LAYER,
                "input": "uint8 NCHW, TF1.x-compatible bilinear resize to 299x299", "internal_dtype": "float32",
                "weights_file": self.weights.file_name, "weights_sha256": self.weights.sha256,
                "standard_weights": self.weights.standard}


@contextmanager
def _without_weights():
    """Let torch-fidelity build its InceptionV3 with PyTorch's default init: no download, no loading."""
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        yield


def make_random_weights(path: str | os.PathLike, seed: int = 0, calibration_images: int = 8) -> Path:
    """Write a randomly initialised torch-fidelity InceptionV3 state dict to ``path`` (for tests only).

    With default init and BatchNorm running stats (0, 1) the pool3 features vanish (~1e-8) through the
    ~50 layers, which would make every test distance ~0. So BatchNorm statistics are calibrated once
    on ``calibration_images`` smooth random images (4x4 uniform noise, bilinearly upsampled to 32x32;
    a train-mode forward with cumulative averages), giving features of order 1-10 instead.
    Deterministic for a seed; the global RNG is left untouched.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _without_weights():
            net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER])
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative moving average over the calibration pass
        net.train()
        coarse = torch.rand(calibration_images, 3, 4, 4)
        smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
        with torch.no_grad():
            net((smooth * 255).round().to(torch.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return path
