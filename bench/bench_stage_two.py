"""Stage two speed, measured side by side in one run (ratios, not absolute seconds).

    python bench/bench_stage_two.py --quick            # CPU minutes
    python bench/bench_stage_two.py --preset celeba64  # on a GPU

1. MaskGIT training steps/s reading pre-tokenized codes vs encoding the images on the fly with the
   tokenizer's encoder in the loop (why pretokenize.py exists).
2. Sampling images/s: MaskGIT decoding with T = 8 and T = 12 steps vs the sequential baseline (one
   token per step, raster order, same model and batch).
Models have random weights: speed does not depend on what they learned. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from data import DataConfig, build_dataset
from tokenizer import VQModel, preset as tokenizer_preset
from transformer import build_maskgit, mask_tokens, masked_ce_loss, maskgit_decode, sequential_decode


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny presets and few repeats (CPU)")
    p.add_argument("--preset", default=None, help="tokenizer + MaskGIT preset (default: tiny with --quick, else celeba64)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="runs/bench/stage_two.json")
    args = p.parse_args()
    name = args.preset or ("tiny" if args.quick else "celeba64")
    bs = args.batch_size or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    tok_cfg = tokenizer_preset(name)
    tokenizer = VQModel(tok_cfg).to(device).eval()
    model = build_maskgit(name, tok_cfg.vq.num_codes, tok_cfg.grid).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dataset = build_dataset(DataConfig(source="procedural", resolution=tok_cfg.resolution, num_images=bs * 2), "train")
    images = torch.stack([dataset[i]["image"] for i in range(bs)]).to(device)
    with torch.no_grad():
        codes = tokenizer.encode(images)[1].flatten(1)  # (B, N): what the code file holds

    def train_step(tokens: torch.Tensor) -> None:
        inputs, mask = mask_tokens(tokens, model.mask_id)
        loss, _ = masked_ce_loss(model(inputs), tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def from_codes() -> None:
        train_step(codes)

    def on_the_fly() -> None:
        with torch.no_grad():
            tokens = tokenizer.encode(images)[1].flatten(1)
        train_step(tokens)

    model.train()
    t_codes, t_fly = timed(from_codes, repeats), timed(on_the_fly, repeats)
    model.eval()
    gen = torch.Generator(device=device)
    sampling = {}
    for label, fn in (("maskgit_T8", lambda: maskgit_decode(model, bs, gen.manual_seed(0), steps=8)),
                      ("maskgit_T12", lambda: maskgit_decode(model, bs, gen.manual_seed(0), steps=12)),
                      ("sequential", lambda: sequential_decode(model, bs, gen.manual_seed(0)))):
        with torch.no_grad():
            sampling[label] = bs / timed(fn, max(1, repeats // (3 if label == "sequential" else 1)))

    n_tokens = tok_cfg.grid[0] * tok_cfg.grid[1]
    result = {
        "preset": name, "device": str(device), "batch_size": bs, "tokens_per_image": n_tokens,
        "threads": torch.get_num_threads(), "maskgit_params_M": model.num_params() / 1e6,
        "train_steps_per_s": {"from_codes": 1 / t_codes, "encode_on_the_fly": 1 / t_fly, "ratio": t_fly / t_codes},
        "sampling_images_per_s": {**sampling, "speedup_T8_vs_sequential": sampling["maskgit_T8"] / sampling["sequential"],
                                  "speedup_T12_vs_sequential": sampling["maskgit_T12"] / sampling["sequential"]},
    }
    print(f"stage two, preset {name}, {device}, batch {bs}, {n_tokens} tokens/image")
    print(f"{'training':<28}{'steps/s':>10}")
    print(f"{'  from pre-tokenized codes':<28}{1 / t_codes:>10.2f}")
    print(f"{'  encoding on the fly':<28}{1 / t_fly:>10.2f}   codes are {t_fly / t_codes:.2f}x faster")
    print(f"{'sampling':<28}{'images/s':>10}")
    for label, v in sampling.items():
        print(f"{'  ' + label:<28}{v:>10.2f}")
    print(f"  MaskGIT T=8 is {result['sampling_images_per_s']['speedup_T8_vs_sequential']:.1f}x, T=12 "
          f"{result['sampling_images_per_s']['speedup_T12_vs_sequential']:.1f}x faster than sequential ({n_tokens} steps)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
