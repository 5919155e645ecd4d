"""Stage two speed, measured side by side in one run (ratios, not absolute seconds).

    python bench/bench_stage_two.py --quick                 # CPU, ~1 min: tiny:tiny and small:tiny
    python bench/bench_stage_two.py --configs celeba64:celeba64   # on a GPU (the default without --quick)

Each config is TOKENIZER_PRESET:MASKGIT_PRESET (64 tokens for tiny, 256 for small and celeba64).
1. MaskGIT training steps/s reading pre-tokenized codes vs encoding the images on the fly with the
   tokenizer's encoder in the loop (why pretokenize.py exists).
2. Sampling images/s: MaskGIT decoding with T = 8 and T = 12 steps vs the sequential baseline (one
   token per step, raster order, same model and batch).
Models have random weights: speed does not depend on what they learned. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_loader import write_json
from bench_train import MaskGITTrainer  # the MaskGIT training step, shared with bench_train.py

from data import DataConfig, build_dataset
from tokenizer import VQModel
from tokenizer import preset as tokenizer_preset
from transformer import build_maskgit, maskgit_decode, sequential_decode


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run if ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def parse_config(config: str) -> tuple[str, str]:
    """'TOK:MASKGIT' (or 'NAME' for both) -> (tokenizer preset, MaskGIT preset)."""
    tok_name, _, mg_name = config.partition(":")
    return tok_name, mg_name or tok_name


def flops_per_image(tok_name: str, mg_name: str) -> dict:
    """GFLOP per image (torch.utils.flop_counter: matmuls, convolutions, attention) of the tokenizer's
    encoder forward (what encoding on the fly adds) and of one MaskGIT training step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    tok_cfg = tokenizer_preset(tok_name)
    tokenizer = VQModel(tok_cfg).eval()
    model = build_maskgit(mg_name, tok_cfg.vq.num_codes, tok_cfg.grid)
    x = torch.zeros(1, 3, tok_cfg.resolution, tok_cfg.resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        tokenizer.encode(x)
    tokens = torch.zeros(1, tok_cfg.grid[0] * tok_cfg.grid[1], dtype=torch.long)
    with FlopCounterMode(display=False) as mg:
        model(tokens).float().sum().backward()
    return {"encoder_forward_gflop": enc.get_total_flops() / 1e9, "maskgit_train_step_gflop": mg.get_total_flops() / 1e9,
            "expected_ratio": 1 + enc.get_total_flops() / mg.get_total_flops()}


def measure(tok_name: str, mg_name: str, bs: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    tok_cfg = tokenizer_preset(tok_name)
    tokenizer = VQModel(tok_cfg).to(device).eval()
    trainer = MaskGITTrainer(mg_name, tok_cfg.vq.num_codes, tok_cfg.grid, device)
    model, train_step = trainer.model, trainer.step
    dataset = build_dataset(DataConfig(source="procedural", resolution=tok_cfg.resolution, num_images=bs * 2), "train")
    images = torch.stack([dataset[i]["image"] for i in range(bs)]).to(device)
    with torch.no_grad():
        codes = tokenizer.encode(images)[1].flatten(1)  # (B, N): what the code file holds

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
        with torch.no_grad():  # sequential: one run of N forwards, after T=8 and T=12 warmed the model up
            sequential = label == "sequential"
            sampling[label] = bs / timed(fn, max(1, repeats // 3) if sequential else repeats, warmup=not sequential)
    return {
        "tokenizer_preset": tok_name, "maskgit_preset": mg_name, "resolution": tok_cfg.resolution,
        "tokens_per_image": tok_cfg.grid[0] * tok_cfg.grid[1], "batch_size": bs,
        "tokenizer_params_M": sum(p.numel() for p in tokenizer.parameters()) / 1e6,
        "maskgit_params_M": model.num_params() / 1e6,
        "train_steps_per_s": {"from_codes": 1 / t_codes, "encode_on_the_fly": 1 / t_fly, "ratio": t_fly / t_codes},
        "sampling_images_per_s": {**sampling, "speedup_T8_vs_sequential": sampling["maskgit_T8"] / sampling["sequential"],
                                  "speedup_T12_vs_sequential": sampling["maskgit_T12"] / sampling["sequential"]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU presets (tiny:tiny, small:tiny) and few repeats")
    p.add_argument("--configs", nargs="+", metavar="TOK:MASKGIT", default=None,
                   help="tokenizer:MaskGIT preset pairs (default: tiny:tiny small:tiny with --quick, else celeba64:celeba64)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="runs/bench/stage_two.json")
    args = p.parse_args()
    configs = args.configs or (["tiny:tiny", "small:tiny"] if args.quick else ["celeba64:celeba64"])
    bs = args.batch_size or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for config in configs:
        results.append(measure(*parse_config(config), bs, repeats, device))

    print(f"stage two on {device}, {torch.get_num_threads()} threads, batch {bs}, random weights")
    header = ("tokenizer:MaskGIT", "tokens", "steps/s codes", "steps/s on the fly", "codes / on the fly",
              "img/s T=8", "img/s T=12", "img/s sequential", "T=8 / seq", "T=12 / seq")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        t, s = r["train_steps_per_s"], r["sampling_images_per_s"]
        print(f"| {r['tokenizer_preset']}:{r['maskgit_preset']} | {r['tokens_per_image']} | {t['from_codes']:.2f} | "
              f"{t['encode_on_the_fly']:.2f} | {t['ratio']:.2f}x | {s['maskgit_T8']:.1f} | {s['maskgit_T12']:.1f} | "
              f"{s['sequential']:.2f} | {s['speedup_T8_vs_sequential']:.1f}x | {s['speedup_T12_vs_sequential']:.1f}x |")
    flops = {c: flops_per_image(*parse_config(c)) for c in dict.fromkeys([*configs, "celeba64:celeba64"])}
    print("\nFLOPs per image (torch.utils.flop_counter): what encoding on the fly adds to a MaskGIT step")
    print("| tokenizer:MaskGIT | encoder forward GFLOP | MaskGIT train step GFLOP | expected codes / on the fly |")
    print("|---|---|---|---|")
    for c, f in flops.items():
        print(f"| {c} | {f['encoder_forward_gflop']:.3f} | {f['maskgit_train_step_gflop']:.3f} | {f['expected_ratio']:.2f}x |")
    write_json(args.out, {"device": str(device), "threads": torch.get_num_threads(), "results": results,
                          "flops": flops})


if __name__ == "__main__":
    main()
