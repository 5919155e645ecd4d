"""The paper's ablation ladder on real faces: the same small tokenizer trained once per VQ variant.

    python bench/ablation.py --quick                  # CPU: 150 steps, ~1.5 min per variant on 2 idle cores
    python bench/ablation.py --steps 1000             # CPU, ~7 min per variant: reconstruction starts to separate
    python bench/ablation.py --steps 5000             # one GPU: a budget where the ladder can separate
    python bench/ablation.py --quick --variants baseline opt_affine --data /path/to/images

Huh et al. (ICML 2023, Fig. 7 / Table 2): baseline -> +l2 +replace -> +affine -> +OPT -> +OPT +affine,
the variants of ``tokenizer.config.VQ_VARIANTS``. Each variant is a subprocess call of
``train_tokenizer.py --preset small`` (64x64 -> 16x16 tokens, 512 codes of dim 16, channels 16/32/64,
0.57M parameters, batch 32) with the
same seed, steps and data: the seeded 9,000-image train split of the shared 10,000 CelebA images
(70x70 face crop = "crop 140", resized to 64). Every VQ option is set explicitly, starting from
``VQConfig``'s defaults and applying the variant, because the preset itself carries *all* fixes.
k-means++ init belongs to none of the five (``VQ_VARIANTS`` lists it only in "all", which
``--variants all`` adds), so every variant starts from the same random codebook.

Then, for each run: MSE and PSNR (images in [0, 1]), perplexity and the fraction of the codebook used
come from the trainer's own final validation of its EMA weights over all 1,000 validation images
(``final_metrics.json``, train_tokenizer.py's ``evaluate``); one more pass of the EMA weights over them
gives SWD (eval/swd.py, Karras et al. 2018; x1e3, mean over the 64/32/16 levels) between the
reconstructions and the originals. ``runs/ablation/codes_used.png`` plots
``window_codes_used`` from each log.jsonl: the fraction of codes used during the last ``log_every``
steps (``log.image_every`` is set equal to ``log_every``, which is where the trainer resets the window).

Outputs: runs/ablation/<variant>/ (the trainer's run directory), runs/ablation/ablation.json,
runs/ablation/codes_used.png, and a table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import DEFAULT_DATA, ROOT, resolve_image_folder  # noqa: E402

from core.files import final_metrics_path  # noqa: E402
from data import DataConfig, build_dataset, to_uint8  # noqa: E402
from eval.swd import SWDAccumulator, SWDConfig, swd_from_accumulators  # noqa: E402
from tokenizer import VQ_VARIANTS, VQConfig, load_tokenizer  # noqa: E402
from tokenizer.config import variant_overrides  # noqa: E402

LADDER = ["baseline", "l2_replace", "affine", "opt", "opt_affine"]
# Every VQ option but the sizes (which the preset sets), so that a variant of any kind is fully specified.
VQ_KEYS = tuple(f.name for f in dataclasses.fields(VQConfig) if f.name not in ("num_codes", "code_dim"))
# --quick: the budget that keeps one variant (startup, training, evaluation) near 1.5 minutes on 2 idle
# CPU cores (~0.4 s per step of batch 32), so that `make bench` stays under 20 minutes. It is a short
# budget: the EMA decay and warmup are shortened to match it (the preset's 0.99 EMA would still hold
# 22 % of the random init after 150 steps), and SWD uses 32 patches per image and level instead of 128
# (values depend on the patch count, so compare SWD only within one table). Without --quick the
# preset's optimizer settings and eval/swd.py's default SWDConfig are used.
QUICK = dict(steps=150, log_every=10, ema_decay=0.95, warmup_steps=10, swd_patches=32)


def vq_settings(variant: str) -> dict:
    """Every VQ option of ``variant``: VQConfig's defaults (no fix at all) updated with the variant."""
    defaults = {k: getattr(VQConfig(), k) for k in VQ_KEYS}
    unknown = set(VQ_VARIANTS[variant]) - set(VQ_KEYS)
    if unknown:  # a new option in VQ_VARIANTS must be passed on, not silently dropped
        raise SystemExit(f"VQ_VARIANTS[{variant!r}] sets {sorted(unknown)}, which ablation.py does not pass on")
    return {**defaults, **VQ_VARIANTS[variant]}


def overrides(variant: str, folder: Path, a: argparse.Namespace) -> list[str]:
    out = [f"data.source={folder}", "data.resolution=64", "data.crop=140", "data.cache=true", "data.num_workers=0",
           f"optim.steps={a.steps}", f"optim.batch_size={a.batch_size}", f"optim.seed={a.seed}",
           f"log.log_every={a.log_every}", f"log.image_every={a.log_every}", f"log.ckpt_every={a.steps}",
           "log.val_batches=0"]  # the final validation covers the whole split: the table's metrics
    if a.ema_decay is not None:
        out.append(f"optim.ema_decay={a.ema_decay}")
    if a.warmup_steps is not None:
        out.append(f"optim.warmup_steps={a.warmup_steps}")
    out += variant_overrides(variant)
    return out


def train(variant: str, folder: Path, a: argparse.Namespace) -> dict:
    run_dir = Path(a.runs_dir) / variant
    if run_dir.exists() and not a.resume:
        shutil.rmtree(run_dir)  # a fresh run: identical budget, no leftovers from an earlier setting
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train_tokenizer.py", "--preset", a.preset, "--run-dir", str(run_dir.resolve()),
           *(["--resume"] if a.resume else []), *overrides(variant, folder, a)]
    t0 = time.time()
    with open(run_dir / "train_output.log", "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result = {"command": " ".join(cmd), "train_s": time.time() - t0, "returncode": p.returncode}
    if p.returncode != 0:
        tail = (run_dir / "train_output.log").read_text().strip().splitlines()[-1:] or ["no output"]
        result["error"] = tail[0][-300:]
    return result


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def trainer_metrics(run_dir: Path, val_images: int) -> dict:
    """MSE, PSNR, perplexity and codes used from the trainer's final validation (EMA weights, whole split)."""
    path = final_metrics_path(run_dir)
    metrics = {k: v for k, v in json.loads(path.read_text()).items() if k != "usage_counts"} if path.exists() else {}
    if metrics.get("val_images") != val_images:  # e.g. --eval-only on a run trained with log.val_batches > 0
        raise SystemExit(f"{path}: covers {metrics.get('val_images')} validation images, not all {val_images}; "
                         f"re-train this variant (without --eval-only)")
    return metrics


@torch.no_grad()
def reconstruction_swd(run_dir: Path, val_set, reference: SWDAccumulator, device: torch.device,
                       batch_size: int) -> dict:
    """SWD between the run's EMA reconstructions of the validation images and the images themselves."""
    model, _ = load_tokenizer(str(run_dir / "checkpoint.pt"), ema=True, device=device)
    samples = SWDAccumulator(64, reference.config)
    for start in range(0, len(val_set), batch_size):
        x = torch.stack([val_set[i]["image"] for i in range(start, min(start + batch_size, len(val_set)))]).to(device)
        x_rec, _ = model(x)
        samples.update(to_uint8(x_rec.clamp(-1, 1)).cpu())
    swd = swd_from_accumulators(reference, samples)
    return {"swd": swd["mean"], "swd_levels": swd["levels"]}


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant, r in results.items():
        log = r.get("log", [])
        if not log:
            continue
        steps = [rec["step"] for rec in log]
        axes[0].plot(steps, [rec["window_codes_used"] for rec in log], label=variant, marker=".")
        axes[1].plot(steps, [rec["window_perplexity"] for rec in log], label=variant, marker=".")
    n_codes = next((r["metrics"]["num_codes"] for r in results.values() if r.get("metrics")), None)
    axes[0].set_ylabel(f"fraction of the {n_codes} codes used" if n_codes else "fraction of codes used")
    axes[1].set_ylabel("perplexity of code use")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_title("codes used in the last log window (train)", fontsize=10)
    axes[1].set_title("perplexity in the last log window (train)", fontsize=10)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"CPU budget: {QUICK['steps']} steps, EMA {QUICK['ema_decay']}, warmup {QUICK['warmup_steps']}")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (default 5000; --quick: "
                   f"{QUICK['steps']})")
    p.add_argument("--variants", nargs="+", default=LADDER, choices=list(VQ_VARIANTS))
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder, or folder of the shared tarball")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None, help=f"default 50; --quick: {QUICK['log_every']}")
    p.add_argument("--ema-decay", type=float, default=None, help=f"default: the preset's; --quick: {QUICK['ema_decay']}")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"default: the preset's; --quick: {QUICK['warmup_steps']}")
    p.add_argument("--swd-patches", type=int, default=None,
                   help="SWD patches per image and level (default: SWDConfig's 128; --quick: 32)")
    p.add_argument("--runs-dir", default="runs/ablation")
    p.add_argument("--resume", action="store_true", help="pass --resume to the trainer instead of starting fresh")
    p.add_argument("--eval-only", action="store_true", help="skip training, evaluate the existing run directories")
    a = p.parse_args()
    if a.quick:
        a.steps = a.steps or QUICK["steps"]
        a.log_every = a.log_every or QUICK["log_every"]
        a.ema_decay = QUICK["ema_decay"] if a.ema_decay is None else a.ema_decay
        a.warmup_steps = QUICK["warmup_steps"] if a.warmup_steps is None else a.warmup_steps
        a.swd_patches = a.swd_patches or QUICK["swd_patches"]
    a.steps = a.steps or 5000
    a.log_every = a.log_every or 50
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs_dir = Path(a.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    folder = resolve_image_folder(a.data)
    data_cfg = DataConfig(source=str(folder), resolution=64, crop=140, cache=True, num_workers=0)
    val_set = build_dataset(data_cfg, "val", train=False)
    train_set = build_dataset(dataclasses.replace(data_cfg, flip=False), "train", train=False)
    swd_cfg = SWDConfig(patches_per_image=a.swd_patches) if a.swd_patches else SWDConfig()
    reference = SWDAccumulator(64, swd_cfg)
    reference.update(torch.stack([to_uint8(val_set[i]["image"]) for i in range(len(val_set))]))
    # Context for the SWD column: the same statistic between 1,000 *train* images and the validation
    # images (two samples of the same distribution, no model involved).
    train_sample = SWDAccumulator(64, swd_cfg)
    train_sample.update(torch.stack([to_uint8(train_set[i]["image"]) for i in range(len(val_set))]))
    swd_floor = swd_from_accumulators(reference, train_sample)["mean"]
    print(f"data: {len(train_set)} train / {len(val_set)} val images from {folder}; SWD(train sample, val) = "
          f"{fmt(swd_floor, '.2f')}", file=sys.stderr, flush=True)

    results: dict[str, dict] = {}
    for variant in a.variants:
        run_dir = runs_dir / variant
        r = {"vq": vq_settings(variant)}
        t0 = time.time()
        if not a.eval_only:
            print(f"[{variant}] training {a.steps} steps ...", file=sys.stderr, flush=True)
            r.update(train(variant, folder, a))
        if (run_dir / "checkpoint.pt").exists() and r.get("returncode", 0) == 0:
            t1 = time.time()
            r["metrics"] = {**trainer_metrics(run_dir, len(val_set)),
                            **reconstruction_swd(run_dir, val_set, reference, device, a.batch_size)}
            r["eval_s"] = time.time() - t1
            r["log"] = read_log(run_dir)
        r["total_s"] = time.time() - t0
        results[variant] = r
        m = r.get("metrics", {})
        print(f"[{variant}] {r['total_s']:.0f} s: " + (f"MSE {m['mse']:.5f}, PSNR {m['psnr']:.2f}, "
              f"perplexity {m['perplexity']:.1f}, codes used {m['codes_used']:.1%}, SWD {fmt(m['swd'], '.2f')}"
              if m else f"failed: {r.get('error', 'no checkpoint')}"), file=sys.stderr, flush=True)
    plot(results, runs_dir / "codes_used.png")
    elapsed = time.time() - t_start

    header = ("variant", "VQ options", "val MSE", "PSNR dB", "perplexity", "codes used", "SWD x1e3",
              "train codes used (last window)", "wall s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, r in results.items():
        m, log = r.get("metrics"), r.get("log") or [{}]
        opts = ", ".join(f"{k}={v}" for k, v in VQ_VARIANTS[variant].items()) or "none (beta=0.95)"
        if m is None:
            lines.append(f"| {variant} | {opts} | failed: {r.get('error', 'no checkpoint')} |" + " |" * (len(header) - 3))
            continue
        lines.append("| " + " | ".join([
            variant, opts, f"{m['mse']:.5f}", f"{m['psnr']:.2f}", f"{m['perplexity']:.1f}", f"{m['codes_used']:.1%}",
            fmt(m["swd"], ".2f"), fmt(log[-1].get("window_codes_used"), ".1%"), f"{r['total_s']:.0f}"]) + " |")
    meta = {"preset": a.preset, "steps": a.steps, "batch_size": a.batch_size, "seed": a.seed, "quick": a.quick,
            "ema_decay": a.ema_decay, "warmup_steps": a.warmup_steps, "log_every": a.log_every,
            "data": str(folder), "split": {"train": len(train_set), "val": len(val_set)}, "resolution": 64,
            "crop": 140, "device": str(device), "torch": torch.__version__, "weights": "EMA",
            "swd_train_vs_val": swd_floor, "swd_config": swd_cfg.describe(), "elapsed_s": elapsed}
    print(f"ablation ladder: {a.preset} tokenizer, {a.steps} steps x batch {a.batch_size}, seed {a.seed}, "
          f"{len(train_set)} train / {len(val_set)} val CelebA 64x64, EMA weights; SWD with "
          f"{swd_cfg.patches_per_image} patches/image, SWD(1,000 train images vs val) = "
          f"{fmt(swd_floor, '.2f')}")
    print("\n".join(lines))
    print(f"total {elapsed:.0f} s")
    (runs_dir / "ablation.json").write_text(json.dumps(
        {"meta": meta, "results": {v: {k: x for k, x in r.items()} for v, r in results.items()}, "table": lines},
        indent=2) + "\n")
    print(f"-> {runs_dir / 'ablation.json'}, {runs_dir / 'codes_used.png'}")


if __name__ == "__main__":
    main()
