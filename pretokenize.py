"""Run a trained tokenizer (EMA weights) once over the dataset and store the token grids.

    python pretokenize.py --tokenizer runs/tok/checkpoint.pt --out runs/codes
    python pretokenize.py --tokenizer runs/tok/checkpoint.pt --out runs/codes data.source=/data/celeba

    accelerate launch --num_processes 8 pretokenize.py --tokenizer runs/tok/checkpoint.pt --out runs/codes

The dataset is the tokenizer's own (its stored data config), with ``data.*`` overrides. With
``data.flip=true`` the train split also gets horizontally flipped copies (MaskGIT's flip augmentation,
done once here rather than by re-encoding every epoch).

On several processes each encodes every P-th batch of consecutive images (the same batches as one
process makes), the first process gathers the codes and writes the code directory, atomically: the
files are the same whatever the number of processes.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from core.checkpoint import checkpoint_path, file_sha256, load_checkpoint
from core.config import apply_overrides, stored_config, to_dict
from core.errors import main_guard
from core.processes import gather_on_main, process_state, shard_batches
from data import build_dataset
from data.codes import CodeFileError, CodeHeader, code_dtype, write_code_dir
from tokenizer import load_tokenizer
from tokenizer.train_config import TrainTokenizerConfig
from training.run import prepare_run_dir


@torch.no_grad()
def encode_batches(model, dataset, batches: list[range], flip: bool, device: torch.device, desc: str,
                   progress: bool) -> list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]]:
    """(first index, codes, codes of the flipped images or None, attrs) of each batch of dataset indices."""
    indices = [i for idx in batches for i in idx]
    loader = DataLoader(Subset(dataset, indices), batch_sampler=_consecutive(batches),
                        num_workers=dataset.default_num_workers)
    dtype = code_dtype(model.num_codes)
    out = []
    for idx, batch in zip(batches, tqdm(loader, desc=desc, disable=not progress)):
        x = batch["image"].to(device)
        codes = model.encode(x)[1].cpu().numpy().astype(dtype)
        flipped = model.encode(x.flip(-1))[1].cpu().numpy().astype(dtype) if flip else None
        out.append((idx.start, codes, flipped, batch["attrs"].numpy().astype(np.uint8)))
    return out


def _consecutive(batches: list[range]) -> list[list[int]]:
    """Batches of positions in the Subset of the concatenated ranges: the ranges' own batch boundaries."""
    positions, start = [], 0
    for idx in batches:
        positions.append(list(range(start, start + len(idx))))
        start += len(idx)
    return positions


def assemble(parts: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]],
             flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The split's arrays from the batches of every process: originals in index order, then the flipped
    copies in the same order."""
    parts = sorted(parts, key=lambda part: part[0])
    codes = [p[1] for p in parts] + ([p[2] for p in parts] if flip else [])
    attrs = [p[3] for p in parts] * (2 if flip else 1)
    all_attrs = np.concatenate(attrs)
    return np.concatenate(codes), (all_attrs if all_attrs.shape[1] > 0 else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (train_tokenizer.py output)")
    p.add_argument("--out", required=True, help="output directory for the code files")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to encode")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="overrides of the tokenizer's data config")
    args = p.parse_args()
    state = process_state()  # with a launcher: waits here for the other processes

    # everything is checked before the encoder runs (by every process, on the same inputs)
    ckpt = load_checkpoint(args.tokenizer, kind="tokenizer")
    tok_path, tok_sha = checkpoint_path(args.tokenizer), file_sha256(args.tokenizer)
    stored = stored_config(TrainTokenizerConfig, ckpt["config"], str(tok_path))  # the run's config, typed
    if stored.model.vq.kind in ("group", "residual"):
        raise CodeFileError("pretokenize: MaskGIT needs one token per position; this tokenizer uses a "
                            f"{stored.model.vq.kind} quantizer")
    if any(not o.startswith("data.") for o in args.overrides):
        raise CodeFileError(f"pretokenize only takes data.* overrides, got {args.overrides}")
    data_cfg = apply_overrides(stored.data, [o[len("data."):] for o in args.overrides])
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or len(set(splits)) != len(splits):
        raise CodeFileError(f"--splits: expected distinct comma-separated split names, got {args.splits!r}")
    datasets = {s: build_dataset(data_cfg, s, train=False) for s in splits}  # data errors before the model

    if args.batch_size < 1:
        raise CodeFileError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = prepare_run_dir(args.out)
    model, cfg = load_tokenizer(tok_path, ema=not args.raw_weights, device=state.device)
    shard = (state.process_index, state.num_processes)
    parts, counts = {}, {}  # this process's batches; its counts of skipped and upsampled images
    for split, dataset in datasets.items():
        flip = data_cfg.flip and split == "train"
        batches = shard_batches(len(dataset), args.batch_size, *shard)
        parts[split] = encode_batches(model, dataset, batches, flip, state.device, f"encode {split}",
                                      progress=state.is_main_process)
        counts[split] = {"skipped": dataset.num_skipped, "upsampled": len(dataset.upsampled)}
    gathered = gather_on_main((parts, counts), state)
    if not state.is_main_process:
        return
    arrays, description = {}, {}
    for split, dataset in datasets.items():
        arrays[split] = assemble([b for rank_parts, _ in gathered for b in rank_parts[split]],
                                 data_cfg.flip and split == "train")
        description[split] = {**dataset.describe(), **{key: sum(c[split][key] for _, c in gathered)
                                                       for key in ("skipped", "upsampled")}}
    header = CodeHeader(tokenizer=str(tok_path.resolve()), tokenizer_sha256=tok_sha,
                        num_codes=cfg.vq.num_codes, grid=cfg.grid, dtype=str(code_dtype(cfg.vq.num_codes)),
                        flip=data_cfg.flip, attr_names=list(next(iter(datasets.values())).attr_names), splits={},
                        dataset={"config": to_dict(data_cfg), "weights": "raw" if args.raw_weights else "ema",
                                 **description})
    write_code_dir(out, header, arrays)
    counts = header.splits
    print(f"pretokenize: {', '.join(f'{s} {n} grids' for s, n in counts.items())} of {cfg.grid[0]}x{cfg.grid[1]} "
          f"tokens ({header.dtype}) -> {out}")


if __name__ == "__main__":
    main_guard(main)
