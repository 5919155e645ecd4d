"""The whole pipeline at tiny scale on the built-in procedural faces (no download), then a report.

    python demo.py                      # `make demo`: minutes on 2 CPU cores (BENCHMARKS.md has the time)
    python demo.py --scale smoke        # seconds: the test suite's end-to-end check

Stages (each one a script you can run yourself, each resumable): train_tokenizer.py -> pretokenize.py
-> train_maskgit.py -> sample.py -> python -m eval (FID when the Inception weights are found,
otherwise SWD, labelled as such; the samples, and as many real train images for the real-vs-real floor)
-> report.py. Everything goes to --run (default runs/demo).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Sizes per scale; each scale is also the name of both training scripts' preset (tokenizer/train_config.py,
# transformer/config.py). "demo": BENCHMARKS.md 6c has its time on 2 idle CPU cores.
SCALES = {
    "demo": dict(samples=1000, ref_images=400, eval_batch=100),
    "smoke": dict(samples=16, ref_images=16, eval_batch=16),
}


def stage(name: str, cmd: list[str]) -> None:
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    t = time.time()
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo: stage '{name}' failed (exit {result.returncode}); fix the error above and re-run: "
                 "finished stages resume from their checkpoints")
    print(f"== {name}: done in {time.time() - t:.0f} s", flush=True)


def write_reference_images(tokenizer_run: Path, folder: Path, n: int, split: str = "val") -> None:
    """``n`` images of the tokenizer's ``split`` (same data config) as PNGs: the reference set for SWD / FID
    ("val"), or real images scored against it for the real-vs-real floor ("train")."""
    import json

    from torchvision.utils import save_image

    from core.config import from_dict
    from data import DataConfig, build_dataset

    folder.mkdir(parents=True, exist_ok=True)
    cfg = from_dict(DataConfig, json.loads((tokenizer_run / "config.json").read_text())["data"])
    dataset = build_dataset(cfg, split, train=False)
    for i in range(min(n, len(dataset))):
        save_image((dataset[i]["image"] + 1) / 2, folder / f"{i:05d}.png")


def bf16_pays() -> bool:
    """Whether MaskGIT should train under bf16 autocast here: on CUDA when the GPU supports bf16; on a CPU
    when a bf16 matmul of the tiny model's size runs at least 2x faster than fp32 (CPUs with AMX or
    similar bf16 units; elsewhere bf16 emulation is slower than fp32). Best of 3 timings each, ~0.1 s."""
    import time

    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    best = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        a, b = torch.randn(4096, 128, dtype=dtype), torch.randn(128, 512, dtype=dtype)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        best[dtype] = min(best.get(dtype, float("inf")), time.perf_counter() - t)
    return best[torch.bfloat16] * 2 <= best[torch.float32]


def inception_weights_available() -> bool:
    from eval.errors import WeightsError
    from eval.inception import find_weights

    try:
        find_weights(None)
        return True
    except WeightsError:  # not found (or a bad env path): the demo falls back to SWD and says so
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="output directory")
    p.add_argument("--scale", default="demo", choices=sorted(SCALES))
    p.add_argument("--seed", type=int, default=0,
                   help="training seed of both stages (data order, masks, initial weights) and the sampling seed")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="MaskGIT's training precision; auto: bf16 autocast where it pays (see bf16_pays), else fp32. "
                        "The tokenizer trains in fp32 (bf16 was not faster for its small convolutions on a CPU)")
    args = p.parse_args()
    s, run = SCALES[args.scale], Path(args.run).resolve()
    tok, codes, mg = run / "tokenizer", run / "codes", run / "maskgit"
    t0 = time.time()
    seed = f"optim.seed={args.seed}"
    stage("tokenizer", ["train_tokenizer.py", "--preset", args.scale, "--run-dir", str(tok), "--resume", seed])
    stage("pretokenize", ["pretokenize.py", "--tokenizer", str(tok / "checkpoint.pt"), "--out", str(codes)])
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_pays())
    if args.precision == "auto":
        why = "under bf16 autocast: bf16 matmuls are at least 2x faster" if bf16 else "in fp32: bf16 is not faster"
        print(f"\nMaskGIT trains {why} here (--precision fp32 or bf16 to choose)", flush=True)
    stage("maskgit", ["train_maskgit.py", "--preset", args.scale, "--run-dir", str(mg), "--resume", "--codes", str(codes),
                      "--tokenizer", str(tok / "checkpoint.pt"), f"optim.mixed_precision={'bf16' if bf16 else 'no'}", seed])
    stage("sample", ["sample.py", "--tokenizer", str(tok / "checkpoint.pt"), "--maskgit", str(mg / "checkpoint.pt"),
                     "--grid", str(run / "samples_grid.png"), "--grid-size", "64", "--num-images", str(s["samples"]),
                     "--out-dir", str(run / "samples"), "--overwrite", "--seed", str(args.seed)])
    have_fid = inception_weights_available()
    if not have_fid:
        print("\nNo Inception weights found: evaluating with SWD (sliced Wasserstein distance), not FID. "
              "To get FID, put weights-inception-2015-12-05-6726825d.pth where the README says and re-run.")
    ref_images = run / "eval" / "reference_val"
    write_reference_images(tok, ref_images, s["ref_images"])
    # the floor: as many real train images as samples, scored the same way (what a perfect model would get)
    floor_images = run / "eval" / "real_train"
    write_reference_images(tok, floor_images, s["samples"], split="train")
    for name, images in (("generation", run / "samples"), ("floor", floor_images)):
        score = ["-m", "eval", "score", str(images), "--ref-images", str(ref_images), "--report-dir", str(run / "eval"),
                 "--name", name, "--batch-size", str(s["eval_batch"])]
        if have_fid:
            ref = run / "eval" / "ref_val.npz"
            if not ref.exists():
                stage("fid-ref", ["-m", "eval", "ref", "--images", str(ref_images), "--out", str(ref)])
            stage(f"fid ({name})", [*score, "--ref", str(ref), "--metrics", "auto"])
        else:
            stage(f"swd ({name})", [*score, "--metrics", "swd"])
    stage("report", ["report.py", "--run", str(run)])
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min. Report: {run / 'report.md'} (and {run / 'index.html'})")


if __name__ == "__main__":
    main()
