"""Sample images from a trained MaskGIT + tokenizer pair (EMA weights by default).

    python sample.py --tokenizer runs/tok/checkpoint.pt --maskgit runs/mg/checkpoint.pt --grid samples.png
    python sample.py ... --num-images 10000 --out-dir runs/samples          # individual PNGs, e.g. for FID
    python sample.py ... --attrs smiling=1,glasses=0 --cfg 2.0              # conditional model + guidance
    python sample.py ... --inpaint face.png --box 8,8,24,24                 # regenerate the box, keep the rest
    python sample.py ... --inpaint face.png --box 8,8,24,24 --outpaint      # keep the box, regenerate around it

``--cfg w`` is the guidance weight of logits = cond + w (cond - uncond) (0: plain conditional).
A seed reproduces a sample bit for bit on the same device.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

from data import load_rgb, preprocess_uint8, to_float
from tokenizer import VQModel, load_tokenizer
from training.checkpoint import CheckpointError, file_sha256, load_checkpoint
from training.run import main_guard
from transformer import MaskGIT, MaskGITConfig, maskgit_decode


def load_models(tokenizer_path: str, maskgit_path: str, ema: bool = True,
                device: str | torch.device = "cpu") -> tuple[VQModel, MaskGIT, dict]:
    """Both models from their checkpoints; refuses a swapped or mismatched pair with a clear message."""
    try:
        ckpt = load_checkpoint(maskgit_path, kind="maskgit")
    except CheckpointError as e:
        raise CheckpointError(f"--maskgit: {e}") from None
    try:
        tokenizer, tok_cfg = load_tokenizer(tokenizer_path, ema=ema, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    meta = ckpt["config"]
    sha = file_sha256(tokenizer_path)
    if meta["tokenizer_sha256"] != sha:
        raise CheckpointError(f"--maskgit {maskgit_path} was trained on codes of tokenizer sha256 {meta['tokenizer_sha256']} "
                              f"({meta['tokenizer']}), but --tokenizer {tokenizer_path} has sha256 {sha}")
    cfg = MaskGITConfig.from_dict(meta["model"])
    if cfg.num_codes != tok_cfg.vq.num_codes or tuple(cfg.grid) != tuple(tok_cfg.grid):
        raise CheckpointError(f"--maskgit expects {cfg.num_codes} codes on a {tuple(cfg.grid)} grid, --tokenizer "
                              f"has {tok_cfg.vq.num_codes} codes on {tuple(tok_cfg.grid)}")
    model = MaskGIT(cfg)
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return tokenizer, model.to(device).eval(), meta


def parse_attrs(text: str | None, names: list[str], num_attrs: int, n: int, device: torch.device) -> dict | None:
    """'smiling=1,glasses=0' -> {"attrs": (n, A)}; unnamed attributes are 0. Errors on a model without them."""
    if not text:
        return None
    if num_attrs == 0:
        raise ValueError("--attrs given, but this MaskGIT was trained without attribute conditioning")
    values = torch.zeros(num_attrs, dtype=torch.long)
    for item in text.split(","):
        name, _, val = item.partition("=")
        if name.strip() not in names or val.strip() not in ("0", "1"):
            raise ValueError(f"--attrs: expected name=0|1 with name in {names}, got {item!r}")
        values[names.index(name.strip())] = int(val)
    return {"attrs": values.expand(n, -1).to(device)}


def token_mask(tokenizer: VQModel, box: str | None, mask_path: str | None, outpaint: bool) -> torch.Tensor:
    """(h, w) bool, True = regenerate. A token is regenerated when any of its pixels is masked."""
    r, (h, w) = tokenizer.cfg.resolution, tokenizer.grid
    if mask_path:
        pixels = preprocess_uint8(load_rgb(mask_path), r, None).float().mean(0) > 127  # white = regenerate
    elif box:
        try:
            x0, y0, x1, y1 = (int(v) for v in box.split(","))
        except ValueError:
            raise ValueError(f"--box expects x0,y0,x1,y1 in pixels of the {r}x{r} image, got {box!r}") from None
        if not (0 <= x0 < x1 <= r and 0 <= y0 < y1 <= r):
            raise ValueError(f"--box {box} is empty or outside the {r}x{r} image")
        pixels = torch.zeros(r, r, dtype=torch.bool)
        pixels[y0:y1, x0:x1] = True
    else:
        raise ValueError("--inpaint needs --box or --mask")
    if outpaint:
        pixels = ~pixels
    grid = F.adaptive_max_pool2d(pixels[None, None].float(), (h, w))[0, 0] > 0
    if not grid.any():
        raise ValueError("the mask covers no token: nothing to regenerate")
    return grid


@torch.no_grad()
def generate(tokenizer: VQModel, model: MaskGIT, n: int, batch_size: int, seed: int, steps: int = 8,
             cond: dict | None = None, init: torch.Tensor | None = None, init_mask: torch.Tensor | None = None,
             progress: bool = True, **decode_kwargs) -> Iterator[torch.Tensor]:
    """Yield uint8 image batches (B, 3, H, W). One generator seeded once: the stream is reproducible."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    h, w = tokenizer.grid
    done = 0
    with tqdm(total=n, desc="sampling", disable=not progress) as bar:
        while done < n:
            b = min(batch_size, n - done)
            c = {k: v[:b] for k, v in cond.items()} if cond else None
            extra = {}
            if init is not None:
                extra = dict(init_tokens=init.expand(b, -1).to(device), init_mask=init_mask.expand(b, -1).to(device))
            tokens = maskgit_decode(model, b, gen, steps=steps, cond=c, **extra, **decode_kwargs)
            images = tokenizer.decode_indices(tokens.view(b, h, w)).clamp(-1, 1)
            yield ((images + 1) * 127.5).round().to(torch.uint8).cpu()
            done += b
            bar.update(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--maskgit", required=True)
    p.add_argument("--grid", default=None, help="write a grid PNG of --grid-size samples here")
    p.add_argument("--grid-size", type=int, default=16)
    p.add_argument("--num-images", type=int, default=0, help="also write this many individual PNGs to --out-dir")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8, help="decoding steps T")
    p.add_argument("--schedule", default=None, help="mask schedule (default: the one the model was trained with)")
    p.add_argument("--choice-temperature", type=float, default=4.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--cfg", type=float, default=0.0, help="guidance weight w: cond + w (cond - uncond)")
    p.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    p.add_argument("--attrs", default=None, help="conditioning, e.g. smiling=1,glasses=0")
    p.add_argument("--inpaint", default=None, help="image whose tokens are kept outside the masked region")
    p.add_argument("--box", default=None, help="x0,y0,x1,y1 region to regenerate (pixels)")
    p.add_argument("--mask", default=None, help="mask image, white = regenerate")
    p.add_argument("--outpaint", action="store_true", help="invert the region: keep the box, regenerate the rest")
    p.add_argument("--raw-weights", action="store_true", help="use raw instead of EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if not args.grid and not args.num_images:
        p.error("nothing to do: give --grid and/or --num-images with --out-dir")
    if args.num_images and not args.out_dir:
        p.error("--num-images needs --out-dir")

    device = torch.device(args.device)
    tokenizer, model, meta = load_models(args.tokenizer, args.maskgit, ema=not args.raw_weights, device=device)
    schedule = args.schedule or meta["train"]["masking"]["schedule"]
    n_cond = max(args.grid_size, args.batch_size)
    cond = parse_attrs(args.attrs, meta.get("attr_names", []), model.cfg.num_attrs, n_cond, device)
    if args.cfg and not model.cfg.conditional:
        raise ValueError("--cfg needs a conditional model; this MaskGIT was trained unconditionally")
    init = init_mask = None
    if args.inpaint:
        image = to_float(preprocess_uint8(load_rgb(args.inpaint), tokenizer.cfg.resolution, None))[None].to(device)
        init = tokenizer.encode(image)[1].view(1, -1)
        init_mask = token_mask(tokenizer, args.box, args.mask, args.outpaint).view(1, -1)
    kwargs = dict(schedule=schedule, choice_temperature=args.choice_temperature, temperature=args.temperature,
                  top_k=args.top_k, cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule, cond=cond, init=init, init_mask=init_mask)
    if args.grid:
        images = torch.cat(list(generate(tokenizer, model, args.grid_size, args.batch_size, args.seed, args.steps, **kwargs)))
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float() / 255, args.grid, nrow=int(args.grid_size**0.5) or 1)
        print(f"sample: grid of {args.grid_size} -> {args.grid}")
    if args.num_images:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        i = 0
        for batch in generate(tokenizer, model, args.num_images, args.batch_size, args.seed + 1, args.steps, **kwargs):
            for img in batch:
                save_image(img.float() / 255, out / f"{i:06d}.png")
                i += 1
        print(f"sample: {i} images -> {out}")


if __name__ == "__main__":
    main_guard(main)
