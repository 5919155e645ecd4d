"""The one sampling path: tokenizer + MaskGIT rebuilt from their checkpoints, decoded with the
settings stored in them. ``sample.py``, ``python -m eval gen`` and the grids ``train_maskgit.py``
writes during training all go through ``generate`` here.

    tokenizer, model, meta = load_models("runs/tok/checkpoint.pt", "runs/mg/checkpoint.pt")
    tokenizer, model, meta = load_pretrained("exports/celeba64")  # or the folders export.py writes
    settings = decode_settings(meta["config"], steps=12)  # the trained mask schedule, T = 12
    for images in generate(tokenizer, model, n=100, batch_size=50, seed=0, **settings): ...

The tokenizer decodes with the weights (raw or EMA) that encoded the codes MaskGIT learned from
(recorded in the MaskGIT checkpoint); ``ema`` chooses MaskGIT's weights only.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.checkpoint import CheckpointError, file_sha256, load_checkpoint
from core.config import stored_config, to_dict
from core.errors import UserError
from core.pretrained import is_export, read_config
from core.processes import shard_batches
from data import load_rgb, preprocess_uint8, to_uint8
from tokenizer import VQModel, load_tokenizer
from transformer.config import MaskingConfig, TrainMaskGITConfig
from transformer.decoding import CFG_SCHEDULES, CHOICE_SCHEDULES, ORDERS, maskgit_decode
from transformer.model import MaskGIT
from transformer.schedule import SCHEDULES

SAMPLES_RECORD = "samples.json"  # next to a folder of samples: what made them (sample.py writes, eval reads)


def load_models(tokenizer_path: str, maskgit_path: str, ema: bool = True,
                device: str | torch.device = "cpu") -> tuple[VQModel, MaskGIT, dict[str, Any]]:
    """Both models, in eval mode, from their checkpoints or exported folders (export.py; either may be
    either); refuses a swapped or mismatched pair.

    Returns (tokenizer, maskgit, meta): meta is the MaskGIT's provenance (tokenizer sha256 and weights,
    attribute names) and, under "config", its training config (an export: its model and masking parts)."""
    if is_export(maskgit_path):
        if not ema:
            raise UserError(f"--maskgit {maskgit_path} is an export: it holds one set of weights (raw/EMA is chosen "
                            "when exporting)")
        config = read_config(maskgit_path, "maskgit")
        model = MaskGIT.from_pretrained(maskgit_path, device=device)
        masking = stored_config(MaskingConfig, config["masking"], f"{maskgit_path}/config.json")
        meta = {**config["meta"], "config": {"model": to_dict(model.cfg), "masking": to_dict(masking)}}
    else:
        try:
            ckpt = load_checkpoint(maskgit_path, kind="maskgit")
        except CheckpointError as e:
            raise CheckpointError(f"--maskgit: {e}") from None
        cfg = stored_config(TrainMaskGITConfig, ckpt["config"], str(maskgit_path))  # the run's config, typed
        meta = {**ckpt["meta"], "config": to_dict(cfg)}
        model = MaskGIT(cfg.model)
        model.load_state_dict(ckpt["ema" if ema else "model"])
        model = model.to(device).eval()
    identity = {"sha256": meta["tokenizer_sha256"], "weights": meta.get("tokenizer_weights", "ema")}
    tokenizer, tok_identity = load_tokenizer_as(tokenizer_path, identity["weights"], device)
    if tok_identity != identity:
        raise CheckpointError(f"--maskgit {maskgit_path} was trained on codes of tokenizer sha256 {identity['sha256']} "
                              f"({identity['weights']} weights, {meta['tokenizer']}), but --tokenizer {tokenizer_path} "
                              f"is sha256 {tok_identity['sha256']} ({tok_identity['weights']} weights)")
    cfg, tok_cfg = model.cfg, tokenizer.cfg
    if cfg.num_codes != tok_cfg.vq.num_codes or tuple(cfg.grid) != tuple(tok_cfg.grid):
        raise CheckpointError(f"--maskgit expects {cfg.num_codes} codes on a {tuple(cfg.grid)} grid, --tokenizer "
                              f"has {tok_cfg.vq.num_codes} codes on {tuple(tok_cfg.grid)}")
    return tokenizer, model, meta


def load_tokenizer_as(path: str, weights: str, device: str | torch.device = "cpu") -> tuple[VQModel, dict[str, str]]:
    """A tokenizer from a checkpoint (its ``weights``, "ema" or "raw") or an export, and its identity
    {"sha256": of the checkpoint the weights come from, "weights"}: what a MaskGIT records of its tokenizer."""
    if is_export(path):
        tokenizer = VQModel.from_pretrained(path, device=device)
        return tokenizer, read_config(path, "tokenizer")["identity"]
    try:
        tokenizer, _ = load_tokenizer(path, ema=weights == "ema", device=device)
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    return tokenizer, {"sha256": file_sha256(path), "weights": weights}


def load_pretrained(folder: str, device: str | torch.device = "cpu") -> tuple[VQModel, MaskGIT, dict[str, Any]]:
    """``load_models`` for the folder export.py writes: FOLDER/tokenizer and FOLDER/maskgit."""
    return load_models(str(Path(folder) / "tokenizer"), str(Path(folder) / "maskgit"), device=device)


def export_models(tokenizer_path: str, maskgit_path: str | None, out: str, ema: bool = True) -> dict[str, Path]:
    """Write the exported folders OUT/tokenizer (and OUT/maskgit): safetensors weights + config.json.

    MaskGIT: its EMA weights (raw with ``ema=False``), model config, masking config (schedule, default
    steps), attribute names and its tokenizer's identity. Tokenizer: the weights that encoded MaskGIT's
    training codes (EMA without a MaskGIT) and its identity, so that a mismatched pair is refused."""
    for path in (tokenizer_path, maskgit_path):
        if path is not None and is_export(path):
            raise UserError(f"{path} is already an export; export from the training checkpoints")
    out_dir = Path(out)
    written: dict[str, Path] = {}
    if maskgit_path is not None:
        tokenizer, model, meta = load_models(tokenizer_path, maskgit_path, ema=ema)
        identity = {"sha256": meta["tokenizer_sha256"], "weights": meta.get("tokenizer_weights", "ema")}
        provenance = {k: v for k, v in meta.items() if k not in ("config", "codes")}  # no local data paths
        tok = Path(provenance.get("tokenizer", ""))
        provenance["tokenizer"] = str(Path(tok.parent.name) / tok.name)  # its name, not the machine's layout
        written["maskgit"] = model.save_pretrained(
            out_dir / "maskgit", masking=meta["config"]["masking"], meta=provenance,
            source={"step": load_checkpoint(maskgit_path)["step"], "weights": "ema" if ema else "raw",
                    "checkpoint_sha256": file_sha256(maskgit_path)})
    else:
        tokenizer, identity = load_tokenizer_as(tokenizer_path, "ema")
    written["tokenizer"] = tokenizer.save_pretrained(out_dir / "tokenizer", identity=identity,
                                                     source={"step": load_checkpoint(tokenizer_path)["step"]})
    return written


def decode_settings(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``generate`` from a MaskGIT training config: the mask schedule the model was
    trained with and its sample-grid step count, replaced by every override that is not None."""
    masking = config["masking"]
    settings: dict[str, Any] = {"steps": masking["sample_steps"], "schedule": masking["schedule"]}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


# What every sampling front-end (sample.py, python -m eval gen, the studio) decodes with where the user sets
# nothing; steps and schedule are the checkpoint's (decode_settings). One definition, so they change together.
# order "halton": chosen by `make decoding` on the recipe ladder's models (BENCHMARKS.md, "the sampler, chosen
# by measurement": at 8 steps about 18 % lower generation SWD than confidence order on the same model).
DECODE_DEFAULTS: dict[str, Any] = {"order": "halton", "temperature": 1.0, "temperature_end": None,
                                   "choice_temperature": 4.5, "choice_schedule": "linear", "top_k": None,
                                   "cfg_scale": 0.0, "cfg_schedule": "constant", "cfg_power": 3.0}


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    """The decoding flags of every sampling entry point (None = the checkpoint's steps and schedule, and
    DECODE_DEFAULTS for the rest)."""
    d = DECODE_DEFAULTS
    g = p.add_argument_group("decoding (unset: the steps and mask schedule the MaskGIT checkpoint was trained with)")
    g.add_argument("--steps", type=int, default=None, help="decoding steps T")
    g.add_argument("--schedule", default=None, choices=sorted(SCHEDULES), help="mask schedule")
    g.add_argument("--choice-temperature", type=float, default=None,
                   help=f"tau_0 of the confidence noise ({d['choice_temperature']})")
    g.add_argument("--temperature", type=float, default=None, help=f"token sampling temperature ({d['temperature']})")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--cfg", dest="cfg_scale", type=float, default=None,
                   help="guidance weight w: logits = cond + w (cond - uncond); needs --attrs")
    g.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=None, help=argparse.SUPPRESS)  # old name of --cfg
    g.add_argument("--cfg-schedule", default=None, choices=sorted(CFG_SCHEDULES),
                   help=f"guidance over the steps: constant, linear, or pow-cosine (0 -> w, MaskBit's ramp) "
                        f"({d['cfg_schedule']})")
    g.add_argument("--cfg-power", type=float, default=None, help=f"power of the pow-cosine ramp ({d['cfg_power']:g})")
    g.add_argument("--order", default=None, choices=ORDERS,
                   help="which positions each step reveals: confidence (MaskGIT) or halton (a low-discrepancy "
                        f"order over the grid, Besnier et al. 2025) ({d['order']})")
    g.add_argument("--temperature-end", type=float, default=None,
                   help="sampling temperature at the last step (linear from --temperature); unset: constant")
    g.add_argument("--choice-schedule", default=None, choices=CHOICE_SCHEDULES,
                   help="decay of the confidence noise from --choice-temperature: linear (reference), cosine, constant "
                        f"({d['choice_schedule']})")
    g.add_argument("--attrs", default=None, help="conditioning of an attribute model, e.g. smiling=1,glasses=0")


# What every front-end accepts (sample.py, python -m eval gen, the studio): one definition of the ranges.
DECODE_RANGES = {"temperature": (0.0, 10.0), "temperature_end": (0.0, 10.0), "choice_temperature": (0.0, 50.0),
                 "cfg_scale": (0.0, 20.0), "cfg_power": (0.01, 20.0)}
DECODE_CHOICES = {"schedule": SCHEDULES, "order": ORDERS, "choice_schedule": CHOICE_SCHEDULES,
                  "cfg_schedule": CFG_SCHEDULES}


def check_decode_settings(settings: dict[str, Any], grid: tuple[int, int] | list[int], num_codes: int,
                          flag: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")) -> dict[str, Any]:
    """Refuse, with one line naming the setting (``flag(name)``: how this front-end spells it), decoding
    settings outside what a model of this ``grid`` and ``num_codes`` can use: steps in [1, tokens] (each
    step fixes at least one token, so more only repeat the model's work), finite temperatures and guidance
    within DECODE_RANGES, top_k in [1, num_codes], named choices (order, schedules) among DECODE_CHOICES.
    Returns ``settings``."""
    tokens = int(np.prod(grid))
    steps = settings.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= tokens:
        raise UserError(f"{flag('steps')} must lie in [1, {tokens}] (this model's {grid[0]}x{grid[1]} tokens; each "
                        f"step fixes at least one), got {steps}")
    for name, (lo, hi) in DECODE_RANGES.items():
        value = settings.get(name)
        if value is not None and not (isinstance(value, (int, float)) and lo <= value <= hi):  # NaN fails too
            raise UserError(f"{flag(name)} must lie in [{lo:g}, {hi:g}], got {value}")
    for name, options in DECODE_CHOICES.items():
        value = settings.get(name)
        if value is not None and value not in options:
            raise UserError(f"{flag(name)} must be one of {', '.join(options)}, got {value!r}")
    top_k = settings.get("top_k")
    if top_k is not None and not 1 <= top_k <= num_codes:
        raise UserError(f"{flag('top_k')} must lie in [1, {num_codes}] (the codebook size), got {top_k}")
    return settings


def settings_from_args(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """decode_settings from the flags of add_decode_flags (DECODE_DEFAULTS where unset), checked before any sampling."""
    given = {name: getattr(args, name) for name in ("steps", "schedule", *DECODE_DEFAULTS)}
    settings = decode_settings(meta["config"], **{**DECODE_DEFAULTS, **{k: v for k, v in given.items() if v is not None}})
    model = meta["config"]["model"]
    check_decode_settings(settings, model["grid"], model["num_codes"], flag=lambda name: {
        "cfg_scale": "--cfg"}.get(name, "--" + name.replace("_", "-")))
    if settings.get("cfg_scale") and not args.attrs:
        raise UserError("--cfg needs a condition: give --attrs (guidance moves samples towards a condition)")
    return settings


def parse_attrs(text: str | None, meta: dict[str, Any], model: MaskGIT) -> torch.Tensor | None:
    """'smiling=1,glasses=0' -> (A,) long attribute vector; unnamed attributes are 0. None without text."""
    if not text:
        return None
    names = meta.get("attr_names", [])
    if model.cfg.num_attrs == 0:
        raise UserError("--attrs given, but this MaskGIT was trained without attribute conditioning")
    values = torch.zeros(model.cfg.num_attrs, dtype=torch.long)
    for item in text.split(","):
        name, _, val = item.partition("=")
        if name.strip() not in names or val.strip() not in ("0", "1"):
            raise UserError(f"--attrs: expected name=0|1 with name in {names}, got {item!r}")
        values[names.index(name.strip())] = int(val)
    return values


def token_mask(tokenizer: VQModel, box: str | None, mask_path: str | None, outpaint: bool) -> torch.Tensor:
    """sample.py's --box / --mask -> (h, w) bool tokens to regenerate (``region_tokens``)."""
    r = tokenizer.cfg.resolution
    if mask_path:
        pixels = preprocess_uint8(load_rgb(mask_path), r, None).float().mean(0) > 127  # white = the region
    elif box:
        try:
            x0, y0, x1, y1 = (int(v) for v in box.split(","))
        except ValueError:
            raise UserError(f"--box expects x0,y0,x1,y1 in pixels of the {r}x{r} image, got {box!r}") from None
        if not (0 <= x0 < x1 <= r and 0 <= y0 < y1 <= r):
            raise UserError(f"--box {box} is empty or outside the {r}x{r} image")
        pixels = torch.zeros(r, r, dtype=torch.bool)
        pixels[y0:y1, x0:x1] = True
    else:
        raise UserError("--inpaint needs --box or --mask")
    return region_tokens(pixels, tokenizer.grid, outpaint)


def region_tokens(region: torch.Tensor, grid: tuple[int, int], outpaint: bool) -> torch.Tensor:
    """(R, R) bool region as drawn -> (h, w) bool, True = regenerate: a token is regenerated when any of its
    pixels is in the region (inpainting), or out of it (outpainting). Inpainting in sample.py and the studio."""
    area = ~region if outpaint else region
    tokens = F.adaptive_max_pool2d(area[None, None].float(), tuple(grid))[0, 0] > 0
    if not tokens.any():
        raise UserError("the region covers no token: nothing to regenerate")
    if tokens.all():
        raise UserError("the region covers every token: nothing is kept (sample without inpainting)")
    return tokens


def keep_outside(images: torch.Tensor, original: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Decoded (B, 3, R, R) uint8 images with every pixel outside the regenerated ``tokens`` (h, w) taken
    exactly from ``original`` (3, R, R) uint8: the decoder spreads each token over its neighbours, so the
    decoded picture alone would change the kept pixels slightly."""
    (h, w), r = tokens.shape, original.shape[-1]
    pixels = tokens.repeat_interleave(r // h, 0).repeat_interleave(r // w, 1).to(images.device)  # (R, R)
    return torch.where(pixels, images, original.to(images.device))


def image_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of image ``index`` of a run seeded ``seed``: its seed is a hash of (seed, index)
    (numpy's SeedSequence), so neighbouring seeds or indices draw unrelated streams."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


@torch.no_grad()
def generate(tokenizer: VQModel, model: MaskGIT, n: int, batch_size: int, seed: int, steps: int = 8,
             attrs: torch.Tensor | None = None, init: torch.Tensor | None = None,
             init_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None, progress: bool = True,
             shard: tuple[int, int] = (0, 1), only: Callable[[range], bool] | None = None,
             **decode_kwargs: Any) -> Iterator[torch.Tensor]:
    """Yield uint8 image batches (B, 3, H, W) of images 0..n-1, in batches [0, B), [B, 2B), ...

    Image i draws its random numbers from its own generator, ``image_generator(seed, i)``, so it is the
    same image whichever images share its batch. shard=(rank, world): only the batches
    ``core.processes.shard_batches`` gives that process (sample.py on several processes), the same
    batches as with one process. attrs: (A,) one condition for every sample, or (n, A) one per sample.
    init / init_mask: (1, N) tokens to keep and positions to regenerate (inpainting); keep: (3, R, R) uint8,
    the picture whose pixels outside the regenerated tokens are returned unchanged (``keep_outside``).
    decode_kwargs go to maskgit_decode. only: keep the batches it is True for (sample.py resuming: the
    batches not yet written); each batch is the same as without it."""
    device = next(model.parameters()).device
    h, w = tokenizer.grid
    batches = [idx for idx in shard_batches(n, batch_size, *shard) if only is None or only(idx)]
    with tqdm(total=sum(map(len, batches)), desc="sampling", disable=not progress) as bar:
        for idx in batches:
            b = len(idx)
            cond = None
            if attrs is not None:
                rows = attrs.expand(b, -1) if attrs.dim() == 1 else attrs[idx.start : idx.stop]
                cond = {"attrs": rows.to(device)}
            extra = {}
            if init is not None:
                extra = dict(init_tokens=init.expand(b, -1).to(device), init_mask=init_mask.expand(b, -1).to(device))
            generators = [image_generator(seed, i, device) for i in idx]
            tokens = maskgit_decode(model, b, generators, steps=steps, cond=cond, **extra, **decode_kwargs)
            images = to_uint8(tokenizer.decode_indices(tokens.view(b, h, w))).cpu()
            yield images if keep is None else keep_outside(images, keep, init_mask.view(h, w).cpu())
            bar.update(b)
