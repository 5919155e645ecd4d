"""Run a trained tokenizer (EMA weights) once over the dataset and store the token grids.

    python pretokenize.py --tokenizer runs/tok/checkpoint.pt --out runs/codes
    python pretokenize.py --tokenizer runs/tok/checkpoint.pt --out runs/codes data.source=/data/celeba

The dataset is the tokenizer's own (its stored data config), with ``data.*`` overrides. With
``data.flip=true`` the train split also gets horizontally flipped copies (MaskGIT's flip augmentation,
done once here rather than by re-encoding every epoch).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.checkpoint import checkpoint_path, file_sha256, load_checkpoint
from core.config import apply_overrides, from_dict, to_dict
from core.errors import main_guard
from data import DataConfig, build_dataset
from data.codes import CodeFileError, CodeHeader, code_dtype, write_code_dir
from tokenizer import load_tokenizer
from training.run import prepare_run_dir


@torch.no_grad()
def encode_split(model, dataset, batch_size: int, flip: bool, device: torch.device,
                 desc: str) -> tuple[np.ndarray, np.ndarray | None]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=dataset.default_num_workers)
    dtype = code_dtype(model.num_codes)
    codes, flipped, attrs = [], [], []
    for batch in tqdm(loader, desc=desc):
        x = batch["image"].to(device)
        codes.append(model.encode(x)[1].cpu().numpy().astype(dtype))
        if flip:
            flipped.append(model.encode(x.flip(-1))[1].cpu().numpy().astype(dtype))
        attrs.append(batch["attrs"].numpy().astype(np.uint8))
    all_codes = np.concatenate(codes + flipped)
    all_attrs = np.concatenate(attrs + (attrs if flip else []))
    return all_codes, (all_attrs if all_attrs.shape[1] > 0 else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (train_tokenizer.py output)")
    p.add_argument("--out", required=True, help="output directory for the code files")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to encode")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="overrides of the tokenizer's data config")
    args = p.parse_args()

    # everything is checked before the encoder runs
    ckpt = load_checkpoint(args.tokenizer, kind="tokenizer")
    tok_path, tok_sha = checkpoint_path(args.tokenizer), file_sha256(args.tokenizer)
    if ckpt["config"]["model"]["vq"]["kind"] in ("group", "residual"):
        raise CodeFileError("pretokenize: MaskGIT needs one token per position; this tokenizer uses a "
                            f"{ckpt['config']['model']['vq']['kind']} quantizer")
    if any(not o.startswith("data.") for o in args.overrides):
        raise CodeFileError(f"pretokenize only takes data.* overrides, got {args.overrides}")
    data_cfg = apply_overrides(from_dict(DataConfig, ckpt["config"]["data"]), [o[len("data."):] for o in args.overrides])
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or len(set(splits)) != len(splits):
        raise CodeFileError(f"--splits: expected distinct comma-separated split names, got {args.splits!r}")
    datasets = {s: build_dataset(data_cfg, s, train=False) for s in splits}  # data errors before the model

    out = prepare_run_dir(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_tokenizer(tok_path, ema=not args.raw_weights, device=device)
    arrays = {}
    for split, dataset in datasets.items():
        flip = data_cfg.flip and split == "train"
        arrays[split] = encode_split(model, dataset, args.batch_size, flip, device, f"encode {split}")
    header = CodeHeader(tokenizer=str(tok_path.resolve()), tokenizer_sha256=tok_sha,
                        num_codes=cfg.vq.num_codes, grid=cfg.grid, dtype=str(code_dtype(cfg.vq.num_codes)),
                        flip=data_cfg.flip, attr_names=list(next(iter(datasets.values())).attr_names), splits={},
                        dataset={"config": to_dict(data_cfg), "weights": "raw" if args.raw_weights else "ema",
                                 **{s: d.describe() for s, d in datasets.items()}})
    write_code_dir(out, header, arrays)
    counts = header.splits
    print(f"pretokenize: {', '.join(f'{s} {n} grids' for s, n in counts.items())} of {cfg.grid[0]}x{cfg.grid[1]} "
          f"tokens ({header.dtype}) -> {out}")


if __name__ == "__main__":
    main_guard(main)
