"""Stage two speed, measured side by side in one run (ratios, not absolute seconds).

    python bench/bench_stage_two.py --quick                 # CPU, ~1 min: tiny:tiny and small:tiny
    python bench/bench_stage_two.py --configs celeba64:celeba64   # on a GPU (the default without --quick)

Each config is TOKENIZER_PRESET:MASKGIT_PRESET (64 tokens for tiny, 256 for small and celeba64).
1. MaskGIT training steps/s reading pre-tokenized codes vs encoding the images on the fly with the
   tokenizer's encoder in the loop (why pretokenize.py exists).
2. Sampling images/s: MaskGIT decoding with T = 8 and T = 12 steps against the autoregressive
   baseline users compare with: a causal transformer of the same size (dim, depth, heads, MLP, head;
   bench/ar_baseline.py) decoding one token per step with a KV cache, LlamaGen-style. The three run
   in turns within one loop (alternating repetitions), same batch, same dtype, median of each.
3. The older row, kept for what it is: the same bidirectional MaskGIT run N times, one token per full
   pass (no cache is possible when every position sees every other one); its ratio to MaskGIT is about
   N / T by construction, so it is not an AR baseline.
Models have random weights: speed does not depend on what they learned. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from ar_baseline import CausalTransformer, ar_decode
from bench_train import MaskGITTrainer  # the MaskGIT training step, shared with bench_train.py
from common import write_result

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


def timed_in_turns(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each ``fns[name]()``, the functions run in turns (one warm-up round first), so
    that a change in the machine's load hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def measure(tok_name: str, mg_name: str, bs: int, repeats: int, device: torch.device, precision: str = "fp32") -> dict:
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
    ar = CausalTransformer(model.cfg).to(device).eval()  # same size as the MaskGIT, causal, KV cache
    gen = torch.Generator(device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.no_grad(), autocast:
        seconds = timed_in_turns({
            "maskgit_T8": lambda: maskgit_decode(model, bs, gen.manual_seed(0), steps=8),
            "maskgit_T12": lambda: maskgit_decode(model, bs, gen.manual_seed(0), steps=12),
            "ar_kv_cache": lambda: ar_decode(ar, bs, gen.manual_seed(0))}, repeats)
        # one run of N full passes, after the rounds above warmed the model up
        seconds["bidirectional_n_passes"] = timed(lambda: sequential_decode(model, bs, gen.manual_seed(0)),
                                                  max(1, repeats // 3), warmup=False)
    sampling = {name: bs / s for name, s in seconds.items()}
    for t in ("T8", "T12"):
        sampling[f"speedup_{t}_vs_ar_kv_cache"] = sampling[f"maskgit_{t}"] / sampling["ar_kv_cache"]
        sampling[f"speedup_{t}_vs_bidirectional_n_passes"] = sampling[f"maskgit_{t}"] / sampling["bidirectional_n_passes"]
    return {
        "tokenizer_preset": tok_name, "maskgit_preset": mg_name, "resolution": tok_cfg.resolution,
        "tokens_per_image": tok_cfg.grid[0] * tok_cfg.grid[1], "batch_size": bs,
        "tokenizer_params_M": sum(p.numel() for p in tokenizer.parameters()) / 1e6,
        "maskgit_params_M": model.num_params() / 1e6, "ar_params_M": ar.num_params() / 1e6, "precision": precision,
        "train_steps_per_s": {"from_codes": 1 / t_codes, "encode_on_the_fly": 1 / t_fly, "ratio": t_fly / t_codes},
        "sampling_images_per_s": sampling,
    }


def print_table(header: tuple[str, ...], results: list[dict], cells) -> None:
    """A Markdown table: one row per config, ``cells(result)`` after the config and token columns."""
    print("| " + " | ".join(("tokenizer:MaskGIT", "tokens", *header)) + " |\n|" + "---|" * (len(header) + 2))
    for r in results:
        print("| " + " | ".join((f"{r['tokenizer_preset']}:{r['maskgit_preset']}", str(r["tokens_per_image"]),
                                 *cells(r))) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU presets (tiny:tiny, small:tiny) and few repeats")
    p.add_argument("--configs", nargs="+", metavar="TOK:MASKGIT", default=None,
                   help="tokenizer:MaskGIT preset pairs (default: tiny:tiny small:tiny with --quick, else celeba64:celeba64)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="sampling dtype, the same for every row (bf16: autocast)")
    p.add_argument("--out", default="runs/bench/stage_two.json")
    args = p.parse_args()
    configs = args.configs or (["tiny:tiny", "small:tiny"] if args.quick else ["celeba64:celeba64"])
    bs = args.batch_size or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for config in configs:
        results.append(measure(*parse_config(config), bs, repeats, device, args.precision))

    print(f"stage two on {device}, {torch.get_num_threads()} threads, batch {bs}, random weights")
    print_table(("steps/s codes", "steps/s on the fly", "codes / on the fly"), results, lambda r: (
        f"{r['train_steps_per_s']['from_codes']:.2f}", f"{r['train_steps_per_s']['encode_on_the_fly']:.2f}",
        f"{r['train_steps_per_s']['ratio']:.2f}x"))
    print(f"\nsampling images/s, {args.precision}, median of {repeats} alternating rounds; AR = causal transformer of "
          "the same size with a KV cache, one token per step")
    print_table(("MaskGIT T=8", "MaskGIT T=12", "AR + KV cache", "T=8 / AR", "T=12 / AR"), results, lambda r: (
        *(f"{r['sampling_images_per_s'][k]:.1f}" for k in ("maskgit_T8", "maskgit_T12", "ar_kv_cache")),
        *(f"{r['sampling_images_per_s'][f'speedup_{t}_vs_ar_kv_cache']:.2f}x" for t in ("T8", "T12"))))
    print("\nnot an AR baseline: the same bidirectional MaskGIT, N full passes of one token each (ratio ~N/T by construction)")
    print_table(("img/s N passes", "T=8 / N passes", "T=12 / N passes"), results, lambda r: (
        f"{r['sampling_images_per_s']['bidirectional_n_passes']:.2f}",
        *(f"{r['sampling_images_per_s'][f'speedup_{t}_vs_bidirectional_n_passes']:.1f}x" for t in ("T8", "T12"))))
    flops = {c: flops_per_image(*parse_config(c)) for c in dict.fromkeys([*configs, "celeba64:celeba64"])}
    print("\nFLOPs per image (torch.utils.flop_counter): what encoding on the fly adds to a MaskGIT step")
    print("| tokenizer:MaskGIT | encoder forward GFLOP | MaskGIT train step GFLOP | expected codes / on the fly |")
    print("|---|---|---|---|")
    for c, f in flops.items():
        print(f"| {c} | {f['encoder_forward_gflop']:.3f} | {f['maskgit_train_step_gflop']:.3f} | {f['expected_ratio']:.2f}x |")
    write_result(args.out, {"device": str(device), "threads": torch.get_num_threads(), "precision": args.precision,
                          "results": results,
                          "flops": flops})


if __name__ == "__main__":
    main()
