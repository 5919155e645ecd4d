"""Which sampler, at which number of steps: a decoding sweep on one trained tokenizer + MaskGIT.

    python bench/decoding.py --tokenizer RUN/tokenizer/checkpoint.pt --maskgit RUN/maskgit/checkpoint.pt \
        --ref-images FOLDER                                   # `make decoding RUN=...`
    python bench/decoding.py ... --samplers confidence halton --steps 8 --samples 200   # a quick look

For every sampler of ``SAMPLERS`` and every number of steps T, samples are generated with several
sampling seeds and scored by SWD (x1e3), with the wall time per image. (FID/KID are not part of the
sweep: they need the standard Inception weights, which this project's machines do not have; save a
setting's samples with sample.py and score them with ``python -m eval score`` where the weights are.)
Nothing is chosen on the numbers that are reported:

* **selection**: seeds ``--select-seeds`` scored against ``--select-images`` (e.g. real training
  images), or the first half of ``--ref-images`` when not given; the best sampler at each T is the one
  with the lowest mean SWD there;
* **report**: seeds ``--seeds`` (other seeds) scored against ``--ref-images`` (its second half when
  the selection takes the first); these are the numbers in the table and the plot, mean ± standard
  deviation over the seeds.

Outputs in ``--out`` (default runs/decoding): decoding.json, decoding.md, pareto.png (report SWD
against seconds per image; the Pareto front joined). The same sampling seed gives the same images for
every process count and batch size (``transformer.pipeline.generate``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import common  # noqa: F401  (this checkout's packages on the path)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from eval.images import open_folder  # noqa: E402
from eval.swd import SWDAccumulator, SWDConfig, swd_from_accumulators  # noqa: E402
from transformer.pipeline import decode_settings, generate, load_models  # noqa: E402

# Named samplers: keyword arguments of transformer.decoding.maskgit_decode on top of the model's own
# settings (its mask schedule). "confidence" is the product's default (MaskGIT's reference sampler).
SAMPLERS: dict[str, dict] = {
    "confidence": {},
    "confidence, tau0 1": dict(choice_temperature=1.0),
    "confidence, cosine tau": dict(choice_schedule="cosine"),
    "confidence, temp 0.8": dict(temperature=0.8),
    "confidence, temp 1.2->0.8": dict(temperature=1.2, temperature_end=0.8),
    "halton": dict(order="halton"),
    "halton, temp 0.8": dict(order="halton", temperature=0.8),
    "halton, temp 1.2->0.8": dict(order="halton", temperature=1.2, temperature_end=0.8),
}


def run_setting(tokenizer, model, settings: dict, n: int, seed: int, batch_size: int, ref_acc: SWDAccumulator,
                config: SWDConfig) -> tuple[float, float]:
    """(SWD x1e3 of n samples against ``ref_acc``, seconds per image)."""
    acc = SWDAccumulator(tokenizer.cfg.resolution, config)
    t0 = time.perf_counter()
    for batch in generate(tokenizer, model, n, batch_size, seed, progress=False, **settings):
        acc.update(batch)
    seconds = (time.perf_counter() - t0) / n
    return swd_from_accumulators(ref_acc, acc)["mean"], seconds


def references(folder: str, select_folder: str | None, resolution: int,
               config: SWDConfig) -> tuple[SWDAccumulator, SWDAccumulator]:
    """(selection, report) SWD references: ``select_folder`` and ``folder``, or the two halves of ``folder``."""
    images = open_folder(folder, resolution)
    if images.count < (2 if select_folder else 4):
        raise SystemExit(f"decoding: --ref-images {folder} holds {images.count} images; too few")
    half = 0 if select_folder else images.count // 2
    accs = SWDAccumulator(resolution, config), SWDAccumulator(resolution, config)
    seen = 0
    for batch in images.batches(64):
        for x in batch:
            accs[0 if seen < half else 1].update(x[None])
            seen += 1
    if select_folder:
        for batch in open_folder(select_folder, resolution).batches(64):
            accs[0].update(batch)
    return accs


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points (seconds, swd, label) that no other point beats on both (lower is better on both)."""
    front, best = [], float("inf")
    for p in sorted(points):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--maskgit", required=True)
    p.add_argument("--ref-images", required=True, help="held-out real images at the model's resolution (report)")
    p.add_argument("--select-images", help="real images the settings are chosen on (default: half of --ref-images)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8, 12, 16, 32])
    p.add_argument("--samples", type=int, default=500, help="samples per (sampler, T, seed)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampling seeds of the reported numbers")
    p.add_argument("--select-seeds", nargs="+", type=int, default=[100, 101], help="sampling seeds of the selection")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default="runs/decoding")
    a = p.parse_args()
    if min(a.steps) < 1 or a.samples < 2 or set(a.seeds) & set(a.select_seeds):
        raise SystemExit("decoding: --steps >= 1, --samples >= 2, and --seeds disjoint from --select-seeds")
    torch.manual_seed(0)
    tokenizer, model, meta = load_models(a.tokenizer, a.maskgit)
    base = decode_settings(meta["config"])
    config = SWDConfig(max_images=max(a.samples, 4096))
    select_ref, report_ref = references(a.ref_images, a.select_images, tokenizer.cfg.resolution, config)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for steps in a.steps:
        for name in a.samplers:
            settings = {**base, **SAMPLERS[name], "steps": steps}
            sel = [run_setting(tokenizer, model, settings, a.samples, s, a.batch_size, select_ref, config)
                   for s in a.select_seeds]
            rep = [run_setting(tokenizer, model, settings, a.samples, s, a.batch_size, report_ref, config)
                   for s in a.seeds]
            swds = [r[0] for r in rep]
            row = {"sampler": name, "steps": steps, "select_swd": statistics.fmean(r[0] for r in sel),
                   "swd": statistics.fmean(swds), "swd_sd": statistics.stdev(swds) if len(swds) > 1 else 0.0,
                   "swd_per_seed": swds, "s_per_image": statistics.median(r[1] for r in sel + rep)}
            rows.append(row)
            print(f"T={steps:2d} {name:28s} select {row['select_swd']:.2f}  report {row['swd']:.2f} ± "
                  f"{row['swd_sd']:.2f}  {1e3 * row['s_per_image']:.1f} ms/image", file=sys.stderr, flush=True)

    best = {}
    for steps in a.steps:
        cands = [r for r in rows if r["steps"] == steps]
        best[steps] = min(cands, key=lambda r: r["select_swd"])["sampler"]
    default = {steps: next(r for r in rows if r["steps"] == steps and r["sampler"] == "confidence")
               for steps in a.steps if "confidence" in a.samplers}
    lines = ["| T | sampler | generation SWD x1e3 (report) | selection SWD | ms / image | vs confidence |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rel = (f"{100 * (r['swd'] / default[r['steps']]['swd'] - 1):+.1f} %" if r["steps"] in default else "—")
        mark = " (best, chosen on selection)" if best[r["steps"]] == r["sampler"] else ""
        lines.append(f"| {r['steps']} | {r['sampler']}{mark} | {r['swd']:.2f} ± {r['swd_sd']:.2f} | "
                     f"{r['select_swd']:.2f} | {1e3 * r['s_per_image']:.1f} | {rel} |")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(a.samplers):
        pts = [r for r in rows if r["sampler"] == name]
        ax.errorbar([1e3 * r["s_per_image"] for r in pts], [r["swd"] for r in pts], yerr=[r["swd_sd"] for r in pts],
                    fmt="o-", ms=4, lw=0.8, capsize=2, color=f"C{i}", label=name)
        for r in pts:
            ax.annotate(str(r["steps"]), (1e3 * r["s_per_image"], r["swd"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto([(1e3 * r["s_per_image"], r["swd"], r["sampler"]) for r in rows])
    ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=1, label="Pareto front")
    ax.set(xlabel="ms per image (this machine)", ylabel="generation SWD x1e3 (lower is better)", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)

    meta_out = {"command": "python bench/decoding.py " + " ".join(sys.argv[1:]), "tokenizer": a.tokenizer,
                "maskgit": a.maskgit, "ref_images": a.ref_images,
                "select_images": a.select_images or "first half of ref_images", "samples": a.samples, "seeds": a.seeds,
                "select_seeds": a.select_seeds, "base_settings": base, "samplers": {n: SAMPLERS[n] for n in a.samplers},
                "swd": config.describe(), "date": time.strftime("%Y-%m-%d"),
                "metrics": "SWD (FID/KID: not in this sweep)"}
    (out / "decoding.json").write_text(json.dumps({"meta": meta_out, "rows": rows, "best": best}, indent=2) + "\n")
    (out / "decoding.md").write_text("\n".join([f"# Decoding sweep\n\nCommand: `{meta_out['command']}`\n", *lines,
                                                "\n![quality against time](pareto.png)\n"]))
    print("\n".join(lines))
    print(f"-> {out / 'decoding.md'}, {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
