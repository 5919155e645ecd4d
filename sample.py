"""Sample images from a trained MaskGIT + tokenizer pair (EMA weights by default).

    python sample.py --tokenizer runs/tok/checkpoint.pt --maskgit runs/mg/checkpoint.pt --grid samples.png
    python sample.py ... --num-images 10000 --out-dir runs/samples          # individual PNGs, e.g. for FID
    python sample.py ... --attrs smiling=1,glasses=0 --cfg 2.0              # conditional model + guidance
    python sample.py ... --inpaint face.png --box 8,8,24,24                 # regenerate the box, keep the rest exactly
    python sample.py ... --inpaint face.png --box 8,8,24,24 --outpaint      # keep the box, regenerate around it
    accelerate launch --num_processes 8 sample.py ... --num-images 50000 --out-dir runs/samples  # 8 GPUs

``--cfg w`` is the guidance weight of logits = cond + w (cond - uncond) (0: plain conditional).
A seed reproduces a sample bit for bit on the same device. Image i's randomness depends only on
(seed, i), and images are made in the same fixed batches of consecutive indices whatever the number of
processes, so 1 or 8 processes write the same PNGs (each process takes every P-th batch). Next to the
PNGs, samples.json records what was sampled (checkpoints and their sha256, settings, count), and
`python -m eval score` reports it; a non-empty --out-dir is refused unless --overwrite (old PNGs would
be scored with the new ones). The grid is drawn by the first process alone.

samples.json is written first, with "complete": false, and marked complete once every PNG is (each PNG
is written atomically): a folder an interrupted run left is recognisable (`python -m eval score`
refuses it), and running the same command again continues it, sampling only the batches still missing.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torchvision.utils import save_image

from core.errors import UserError, main_guard
from core.files import write_json
from core.pretrained import weights_sha256
from core.processes import check_device, process_state, shard_batches
from data import BadImageError, load_rgb, preprocess_uint8, to_float
from transformer.pipeline import (
    SAMPLES_RECORD,
    add_decode_flags,
    generate,
    load_models,
    parse_attrs,
    settings_from_args,
    token_mask,
)


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
    add_decode_flags(p)
    p.add_argument("--inpaint", default=None, help="image whose tokens are kept outside the masked region")
    p.add_argument("--box", default=None, help="x0,y0,x1,y1 region to regenerate (pixels)")
    p.add_argument("--mask", default=None, help="mask image, white = regenerate")
    p.add_argument("--outpaint", action="store_true", help="invert the region: keep the box, regenerate the rest")
    p.add_argument("--raw-weights", action="store_true",
                   help="MaskGIT's raw instead of EMA weights (the tokenizer decodes with the weights that made the codes)")
    p.add_argument("--device", default=None, help="default: this process's device (cuda:LOCAL_RANK, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the PNGs of a non-empty --out-dir")
    args = p.parse_args()
    state = process_state()  # with a launcher: waits here for the other processes
    # every argument is checked before the models are loaded or anything is sampled
    if not args.grid and not args.num_images:
        raise UserError("nothing to do: give --grid and/or --num-images with --out-dir")
    for name in ("grid_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_images < 0:
        raise UserError(f"--num-images must be >= 0, got {args.num_images}")
    if args.box and args.mask:
        raise UserError("--box and --mask both give the region to regenerate: give one of them")
    if (args.box or args.mask or args.outpaint) and not args.inpaint:
        flag = "--box" if args.box else "--mask" if args.mask else "--outpaint"
        raise UserError(f"{flag} edits a picture: give it with --inpaint PICTURE (without it {flag} would be ignored)")
    if args.inpaint and not Path(args.inpaint).is_file():
        raise UserError(f"--inpaint {args.inpaint}: no such file")
    if args.mask and not Path(args.mask).is_file():
        raise UserError(f"--mask {args.mask}: no such file")
    device = check_device(args.device) if args.device else None
    if args.grid and Path(args.grid).is_dir():
        raise UserError(f"--grid {args.grid} is a directory; give the path of a .png file")
    out = Path(args.out_dir) if args.out_dir else None
    if args.num_images:
        if out is None:
            raise UserError("--num-images needs --out-dir")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out-dir {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite and _unfinished(out) is None:
            raise UserError(f"--out-dir {out} is not empty: its images would be scored with the new ones; "
                            f"choose an empty folder or add --overwrite")
    state.wait_for_everyone()  # every process has checked the folder before any writes to it

    device = device or state.device
    is_main = state.is_main_process
    tokenizer, model, meta = load_models(args.tokenizer, args.maskgit, ema=not args.raw_weights, device=device)
    settings = settings_from_args(args, meta)
    attrs = parse_attrs(args.attrs, meta, model)
    init = init_mask = keep = None
    if args.inpaint:  # the studio's edit: the same tokens regenerated, the same pixels kept
        try:
            picture = load_rgb(args.inpaint)
        except BadImageError as e:
            raise UserError(f"--inpaint: {e}") from None
        keep = preprocess_uint8(picture, tokenizer.cfg.resolution, None)  # (3, R, R) uint8
        init = tokenizer.encode(to_float(keep)[None].to(device))[1].view(1, -1)
        init_mask = token_mask(tokenizer, args.box, args.mask, args.outpaint).view(1, -1)
    kwargs = dict(attrs=attrs, init=init, init_mask=init_mask, keep=keep, **settings)
    record = {"tokenizer": str(args.tokenizer), "tokenizer_sha256": weights_sha256(args.tokenizer),
              "maskgit": str(args.maskgit), "maskgit_sha256": weights_sha256(args.maskgit),
              "maskgit_weights": "raw" if args.raw_weights else "ema", "attrs": args.attrs,
              "inpaint": args.inpaint, "settings": settings}
    if args.grid and is_main:
        images = torch.cat(list(generate(tokenizer, model, args.grid_size, args.batch_size, args.seed, **kwargs)))
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float() / 255, args.grid, nrow=int(args.grid_size**0.5) or 1)
        write_json(Path(args.grid).with_suffix(".json"), {**record, "count": args.grid_size, "seed": args.seed})
        print(f"sample: grid of {args.grid_size} -> {args.grid}")
    if args.num_images:
        record = {**record, "count": args.num_images, "seed": args.seed + 1,
                  "batch_size": args.batch_size}  # the batches' float rounding
        previous = None if args.overwrite else _unfinished(out)
        if previous is not None and previous != json.loads(json.dumps(record)):
            key = next(k for k in record if previous.get(k) != json.loads(json.dumps(record[k])))
            raise UserError(f"--out-dir {out} holds an unfinished sampling with another {key} ({previous.get(key)!r}): "
                            f"run that command again to finish it, or add --overwrite")
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            stale = [*out.glob(".*.tmp")] if previous else [*out.glob("*.png"), *out.glob(".*.tmp"), out / SAMPLES_RECORD]
            for old in stale:  # --overwrite: nothing old is left to be scored; resuming: torn writes only
                old.unlink(missing_ok=True)
            write_json(out / SAMPLES_RECORD, {**record, "complete": False})
        state.wait_for_everyone()
        shard = (state.process_index, state.num_processes)
        todo = [idx for idx in shard_batches(args.num_images, args.batch_size, *shard)
                if not all((out / f"{i:06d}.png").exists() for i in idx)]
        batches = generate(tokenizer, model, args.num_images, args.batch_size, args.seed + 1, shard=shard,
                           progress=is_main, only=todo.__contains__, **kwargs)
        try:
            for idx, batch in zip(todo, batches):
                for i, img in zip(idx, batch):
                    tmp = out / f".{i:06d}.png.tmp"
                    save_image(img.float() / 255, tmp, format="png")
                    os.replace(tmp, out / f"{i:06d}.png")
        except KeyboardInterrupt:
            done = len(list(out.glob("*.png")))
            raise KeyboardInterrupt(f"{done} of {args.num_images} images in {out}, marked unfinished in "
                                    f"{SAMPLES_RECORD}; run the same command again to finish them") from None
        state.wait_for_everyone()  # the record is marked complete once every image is written
        if is_main:
            write_json(out / SAMPLES_RECORD, {**record, "complete": True})
            print(f"sample: {args.num_images} images -> {out} (what was sampled: {out / SAMPLES_RECORD})")


def _unfinished(out: Path) -> dict | None:
    """The record of an unfinished sampling in ``out`` (without its "complete" flag), else None."""
    try:
        record = json.loads((out / SAMPLES_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.pop("complete", True) is not False:
        return None
    return record


if __name__ == "__main__":
    main_guard(main)
