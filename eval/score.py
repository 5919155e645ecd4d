"""Scoring cores: image batches in, metrics plus the full protocol out.

``score_images`` scores any stream of uint8 batches (a folder, an .npz, or samples from a generator:
the core of ``python -m eval gen``) against cached reference statistics. ``score_reconstructions``
(the core of ``python -m eval rfid``) passes each batch of validation images through a
``reconstruct`` callable and scores the reconstructions against the statistics of *the same* images,
gathered in the same pass. Both take plain iterators and callables, so they run without checkpoints.

Names: with the standard Inception weights the metrics are "FID" and "KID"; with any other file
"FID(unverified-weights)" and "KID(unverified-weights)", and ``standard_weights`` is False.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from eval.errors import EvalError, ImageInputError
from eval.images import as_uint8_nchw, checked_float, checked_uint8, with_progress
from eval.inception import FEATURE_DIM, InceptionExtractor, metric_name
from eval.reference import KEEP_FEATURES, ReferenceStats, check_protocol
from eval.stats import KID_DEFAULTS, FeatureStats, frechet_distance, kernel_inception_distance, warn_if_few
from eval.swd import SWDAccumulator, SWDConfig, swd_from_accumulators

METRICS = ("fid", "kid", "pr", "swd")
INCEPTION_METRICS = {"fid", "kid", "pr"}  # the ones computed in Inception features


@dataclass
class ScoreResult:
    metrics: dict  # metric name -> float; names carry "(unverified-weights)" when not standard
    standard_weights: bool | None  # None when no Inception metric was computed
    protocol: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # warnings that belong next to the numbers

    def to_dict(self) -> dict:
        return asdict(self)


def _check_metrics(metrics: Iterable[str], extractor: InceptionExtractor | None) -> set[str]:
    metrics = set(metrics)
    if not metrics or metrics - set(METRICS):
        raise EvalError(f"metrics must be a non-empty subset of {METRICS}, got {sorted(metrics)}")
    if metrics & INCEPTION_METRICS and extractor is None:
        raise EvalError("FID/KID/precision/recall need the Inception extractor; only SWD works without weights")
    return metrics


def _inception_metrics(stats: FeatureStats, ref_mu, ref_sigma, ref_count: int, ref_features, metrics: set,
                       extractor: InceptionExtractor, kid_kwargs: dict, notes: list,
                       progress: bool = False) -> tuple[dict, dict]:
    """FID / KID values and their parameters; small-sample warnings go to ``notes`` and warnings.warn."""
    out, params = {}, {}
    for n, what in ((stats.count, "scored images"), (ref_count, "reference")):
        message = warn_if_few(n, what)
        if message:
            notes.append(message)
    if "fid" in metrics:
        out[metric_name("FID", extractor.standard)] = frechet_distance(stats.mu, stats.sigma, ref_mu, ref_sigma)
    if "kid" in metrics:
        if ref_features is None:
            raise EvalError("KID needs reference features; the reference was saved without them (--kid-features 0)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kid = kernel_inception_distance(stats.features(), ref_features, **{**KID_DEFAULTS, **kid_kwargs},
                                            progress=progress)
        for w in caught:
            notes.append(str(w.message))
            warnings.warn(str(w.message), stacklevel=3)
        name = metric_name("KID", extractor.standard)
        out[f"{name}_mean"], out[f"{name}_std"] = kid["mean"], kid["std"]
        params = {k: v for k, v in kid.items() if k not in ("mean", "std")}
        params["features"] = [len(stats.features()), len(ref_features)]
    if "pr" in metrics:
        if ref_features is None:
            raise EvalError("precision/recall need reference features; the reference was saved without them "
                            "(--kid-features 0)")
        pr = precision_recall(stats.features(), ref_features)
        out[metric_name("precision", extractor.standard)] = pr["precision"]
        out[metric_name("recall", extractor.standard)] = pr["recall"]
        params["pr"] = {"neighborhood": PR_NEIGHBORHOOD, "features": [len(stats.features()), len(ref_features)]}
    return out, params


PR_NEIGHBORHOOD = 3  # k of the k-NN radii (Kynkaanniemi et al. 2019; torch-fidelity's default)


def precision_recall(generated, real, k: int = PR_NEIGHBORHOOD) -> dict:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) of generated vs real feature
    rows (n, D): precision = share of generated samples inside some real sample's k-NN ball, recall = share
    of real samples inside some generated sample's ball, computed by torch-fidelity."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g, r = torch.as_tensor(generated, dtype=torch.float32), torch.as_tensor(real, dtype=torch.float32)
    if min(len(g), len(r)) <= k:
        raise EvalError(f"precision/recall need more than {k} feature rows per set, got {len(g)} and {len(r)}")
    precision, recall = calculate_precision_recall_full(g, r, neighborhood=k, batch_size=10000)
    return {"precision": float(precision), "recall": float(recall)}


def _swd_metrics(swd: dict) -> dict:
    out = {f"SWD_x1e3_{res}": v for res, v in swd["levels"].items()}
    out["SWD_x1e3_mean"] = swd["mean"]
    return out


def score_images(batches: Iterable[torch.Tensor], reference: ReferenceStats | None,
                 extractor: InceptionExtractor | None, *, metrics: Iterable[str] = ("fid", "kid"),
                 swd_reference: Iterable[torch.Tensor] | None = None, swd_config: SWDConfig = SWDConfig(),
                 kid_kwargs: dict | None = None, keep_features: int = KEEP_FEATURES, total: int | None = None,
                 progress: bool = False, protocol: dict | None = None) -> ScoreResult:
    """Score uint8 ``(B, 3, R, R)`` batches against ``reference`` (FID/KID) and/or ``swd_reference``.

    ``reference`` must come from the same weights (sha256) and resolution R; ``swd_reference`` is a
    stream of reference *images* (SWD needs pixels, not statistics). ``total``: number of images, for
    the progress bar. ``protocol``: extra fields for the report (sampling settings, checkpoints, ...).
    """
    metrics = _check_metrics(metrics, extractor)
    kid_kwargs = kid_kwargs or {}
    if metrics & INCEPTION_METRICS:
        if reference is None:
            raise EvalError("FID/KID/precision/recall need reference statistics (--ref)")
        check_protocol(reference.protocol, {"weights_sha256": extractor.weights.sha256}, "reference statistics")
    if "swd" in metrics and swd_reference is None:
        raise EvalError("SWD needs reference images (a reference folder/.npz or the reference dataset)")
    need_features = bool(metrics & INCEPTION_METRICS)
    stats = FeatureStats(FEATURE_DIM, keep_features=keep_features if metrics & {"kid", "pr"} else 0)
    swd_samples = None
    resolution = None
    for batch in with_progress(batches, total, "scoring", progress):
        x = as_uint8_nchw(batch, "scored images")
        if resolution is None:
            resolution = x.shape[-1]
            if x.shape[-2] != resolution:
                raise ImageInputError(f"scored images must be square, got {tuple(x.shape[-2:])}")
            if reference is not None:
                check_protocol(reference.protocol, {"resolution": resolution}, "reference statistics")
            if "swd" in metrics:
                swd_samples = SWDAccumulator(resolution, swd_config)
        elif x.shape[-2:] != (resolution, resolution):
            raise ImageInputError(f"scored images change size mid-stream: {tuple(x.shape[-2:])} after {resolution}")
        if need_features:
            stats.update(extractor(x))
        if swd_samples is not None:
            swd_samples.update(x)
            if not need_features and swd_samples.full:
                break
    if resolution is None:
        raise ImageInputError("no images to score")
    notes: list = []
    values, kid_params = {}, {}
    if need_features:
        values, kid_params = _inception_metrics(stats, reference.mu, reference.sigma, reference.count,
                                                reference.features, metrics, extractor, kid_kwargs, notes,
                                                progress)
    swd_info = None
    if swd_samples is not None:
        swd_ref = SWDAccumulator(resolution, swd_config)
        for batch in with_progress(swd_reference, swd_config.max_images, "SWD reference", progress):
            swd_ref.update(batch)
            if swd_ref.full:
                break
        swd_info = swd_from_accumulators(swd_ref, swd_samples)
        values.update(_swd_metrics(swd_info))
    full_protocol = {
        "samples": {"count": stats.count if need_features else swd_samples.count, "resolution": resolution},
        "reference": None if reference is None else {**reference.protocol, "count": reference.count,
                                                     "kid_features": reference.meta.get("kid_features"),
                                                     "preprocessing": reference.meta.get("preprocessing")},
        "extractor": extractor.describe() if need_features else None,
        "kid": kid_params or None,
        "swd": None if swd_info is None else {"images": swd_info["images"], **swd_info["config"]},
        **(protocol or {}),
    }
    return ScoreResult(values, extractor.standard if need_features else None, full_protocol, notes)


def score_reconstructions(batches: Iterable[torch.Tensor],
                          reconstruct: Callable[[torch.Tensor], torch.Tensor],
                          extractor: InceptionExtractor | None, *, metrics: Iterable[str] = ("fid", "kid"),
                          swd_config: SWDConfig = SWDConfig(), kid_kwargs: dict | None = None,
                          keep_features: int = KEEP_FEATURES, total: int | None = None, progress: bool = False,
                          protocol: dict | None = None) -> ScoreResult:
    """Reconstruction FID: reconstructions of the given images vs the statistics of those same images.

    ``batches``: the validation images, uint8 (B, 3, R, R) or float in [-1, 1]. ``reconstruct``
    receives float32 images in [-1, 1] (what a tokenizer consumes; uint8 input is mapped by
    ``checked_float``) and returns float in [-1, 1] or uint8. Originals and reconstructions are both
    quantized by ``checked_uint8``, both go through the same extractor in the same pass, so an identity
    ``reconstruct`` gives 0 up to rounding.
    """
    metrics = _check_metrics(metrics, extractor)
    kid_kwargs = kid_kwargs or {}
    need_features = bool(metrics & INCEPTION_METRICS)
    keep = keep_features if metrics & {"kid", "pr"} else 0
    originals, recons = FeatureStats(FEATURE_DIM, keep), FeatureStats(FEATURE_DIM, keep)
    swd_orig = swd_recon = None
    count = 0
    for batch in with_progress(batches, total, "reconstructing", progress):
        if torch.is_floating_point(batch):
            images, model_input = checked_uint8(batch), batch.float()
        else:
            images = as_uint8_nchw(batch, "validation images")
            model_input = checked_float(images)
        with torch.no_grad():
            out = reconstruct(model_input)
        out = checked_uint8(out) if torch.is_floating_point(out) else as_uint8_nchw(out, "reconstructions")
        out = out.cpu()
        if out.shape != images.shape:
            raise ImageInputError(f"reconstruct changed the shape {tuple(images.shape)} -> {tuple(out.shape)}")
        if "swd" in metrics and swd_orig is None:
            swd_orig, swd_recon = (SWDAccumulator(images.shape[-1], swd_config) for _ in range(2))
        if need_features:
            originals.update(extractor(images))
            recons.update(extractor(out))
        if swd_orig is not None:
            swd_orig.update(images)
            swd_recon.update(out)
        count += len(images)
    if count == 0:
        raise ImageInputError("no images to reconstruct")
    notes: list = []
    values, kid_params = {}, {}
    if need_features:
        values, kid_params = _inception_metrics(recons, originals.mu, originals.sigma, originals.count,
                                                originals.features(), metrics, extractor, kid_kwargs, notes,
                                                progress)
    swd_info = swd_from_accumulators(swd_orig, swd_recon) if swd_orig is not None else None
    if swd_info is not None:
        values.update(_swd_metrics(swd_info))
    full_protocol = {
        "samples": {"count": count, "kind": "reconstructions of the reference images"},
        "reference": {"count": count, "kind": "the same images, statistics gathered in the same pass"},
        "extractor": extractor.describe() if need_features else None,
        "kid": kid_params or None,
        "swd": None if swd_info is None else {"images": swd_info["images"], **swd_info["config"]},
        **(protocol or {}),
    }
    return ScoreResult(values, extractor.standard if need_features else None, full_protocol, notes)
