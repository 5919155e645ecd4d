"""The ladder's report: statistics over seeds, paired comparisons, tables, figures and pages.

bench/ladder.py runs the rungs and keeps their numbers; this module turns them into what a reader
checks: mean and spread per rung (ladder.md / index.html), every rung paired seed by seed with the rung
it is compared with (Student t interval over the per-seed differences, paired t-test p; "better" or
"worse" only where the interval excludes zero), how the ranking moves with the MaskGIT budget, and the
pictures (samples per rung, every seed's score, codes used during training).
"""
from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import t_interval  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = {"baseline": "baseline", "l2_replace": "+l2 +replace", "affine": "+affine", "opt": "+OPT",
          "opt_affine": "+OPT +affine", "all": "all (+k-means)", "opt_commit": "+OPT, commitment kept",
          "opt_renorm": "+OPT, W renormalized", "seed_recipe": "reference's recommended layer", "fsq": "FSQ",
          "lfq": "LFQ", "rotation": "VQ + rotation trick", "simvq": "SimVQ"}
REFERENCE_RUNG = "l2_replace"  # every rung is compared with this one (at the same MaskGIT budget), seed by seed
# The paper's MaskGIT-on-CelebA generation FID (read off its figure, about +-0.5); other rungs not reported.
PAPER_FID = {"baseline": 90.5, "l2_replace": 79.7, "opt_affine": 74.8}
PAPER_RFID = {"baseline": 93.8, "l2_replace": 86.3, "opt_affine": 74.2}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: dict, b: dict, key: str) -> dict | None:
    """Paired comparison of ``key`` between runs ``a`` and ``b`` (seed -> numbers) on their common seeds:
    the differences a - b, their mean, 95 % confidence interval (Student t, n - 1 degrees of freedom)
    and the paired t-test's two-sided p-value. None with fewer than two common seeds."""
    from scipy import stats

    seeds = sorted(set(a) & set(b), key=lambda k: int(k.removeprefix("seed")))
    diffs = [a[k][key] - b[k][key] for k in seeds if a[k].get(key) is not None and b[k].get(key) is not None]
    if len(diffs) < 2:
        return None
    m, lo, hi = t_interval(diffs)
    sd = statistics.stdev(diffs)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if m != 0 else 1.0)
    return {"n": len(diffs), "diffs": diffs, "mean": m, "ci": [lo, hi], "p": p}


def verdict(c: dict | None, lower_is_better: bool = True) -> str:
    if c is None:
        return "fewer than 2 paired seeds"
    lo, hi = c["ci"]
    if lo <= 0 <= hi:
        return "not separated"
    return "better" if (hi < 0) == lower_is_better else "worse"


COLUMNS = [("psnr", "tokenizer PSNR dB", ".2f"), ("perplexity", "perplexity", ".1f"), ("codes_used", "codes used", ".1%"),
           ("ste_error", "STE error", ".4f"), ("rswd", "reconstruction SWD x1e3", ".2f"),
           ("rfid", "reconstruction FID", ".2f"), ("masked_accuracy", "MaskGIT masked acc.", ".3f"),
           ("swd", "generation SWD x1e3", ".2f"), ("fid", "generation FID", ".2f"), ("kid", "KID", ".4f")]
# The paired comparisons shown: (key, label, lower is better)
COMPARED = [("swd", "generation SWD x1e3", True), ("rswd", "reconstruction SWD x1e3", True),
            ("psnr", "tokenizer PSNR dB", False), ("fid", "generation FID", True)]


def table(results: dict, floors: dict) -> tuple[list[str], list[str]]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for runs in results.values() for r in runs.values())]
    header = ["rung", "seeds", *[c[1] for c in cols], "paper rFID", "paper FID"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rung, runs in results.items():
        cells = [LABELS.get(rung, rung), str(len(runs))]
        for key, _, spec in cols:
            vals = [r[key] for r in runs.values() if r.get(key) is not None]
            if not vals:
                cells.append("n/a")
                continue
            m, sd = mean_sd(vals)
            cells.append(f"{format(m, spec)} ± {format(sd, spec)}" if len(vals) > 1 else format(m, spec))
        cells += [str(PAPER_RFID.get(rung, "—")), str(PAPER_FID.get(rung, "—"))]
        lines.append("| " + " | ".join(cells) + " |")
    # Generation is scored against held-out images, so real train images set its floor; reconstruction
    # SWD is paired (each image against its own reconstruction), so its floor is 0.
    floor_of = {**floors, "rswd": 0.0}
    floor_cells = ["real images (floor)", "—"] + [
        format(floor_of[k], spec) if k in floor_of else "—" for k, _, spec in cols] + ["—", "—"]
    lines.append("| " + " | ".join(floor_cells) + " |")
    return header, lines


def comparisons(results: dict, references: dict[str, str]) -> tuple[dict, list[str]]:
    """Every rung against its reference rung (``references[rung]``), paired by seed; a markdown table and
    the raw numbers."""
    keys = [c for c in COMPARED if any(r.get(c[0]) is not None for runs in results.values() for r in runs.values())]
    header = ["rung", "compared with", "paired seeds", *[f"{label}: difference [95% CI], p" for _, label, _ in keys],
              "verdict (generation SWD)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    raw: dict = {}
    for rung, runs in results.items():
        if rung == references[rung]:
            continue
        ref = results.get(references[rung], {})
        raw[rung] = {key: paired(runs, ref, key) for key, _, _ in keys}
        cells = [LABELS.get(rung, rung), LABELS.get(references[rung], references[rung]), str(len(set(runs) & set(ref)))]
        for key, _, lower in keys:
            c = raw[rung][key]
            if c is not None and not any(c["diffs"]):  # e.g. a MaskGIT variant on the same tokenizers
                cells.append("identical on every seed")
                continue
            cells.append("—" if c is None else f"{c['mean']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}], "
                                               f"p = {c['p']:.3f} ({verdict(c, lower)})")
        raw[rung]["verdict"] = verdict(raw[rung].get("swd"))
        cells.append(raw[rung]["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return raw, lines


def budget_table(results: dict, variant: str, label: str) -> list[str]:
    """How the ranking moves with a MaskGIT budget: every rung that has runs at the setting's budget and at
    ``<rung>@<variant>``, its mean generation SWD and rank at each, and its paired verdict against the
    reference rung at each budget (on the seeds that have both budgets). Empty when no rung has both."""
    rungs = [r for r in results if "@" not in r and results.get(f"{r}@{variant}")]
    if REFERENCE_RUNG not in rungs:
        return []
    # every rung on the same seeds, at both budgets: the seeds that all of them have at both (a rung with an
    # extra seed would otherwise be ranked on another set of seeds than the rest)
    seeds = set.intersection(*(set(results[r + b]) for r in rungs for b in ("", f"@{variant}")))
    runs = {r + b: {k: v for k, v in results[r + b].items() if k in seeds} for r in rungs for b in ("", f"@{variant}")}
    means = {b: {r: statistics.fmean(v["swd"] for v in runs[r + b].values()) for r in rungs} for b in ("", f"@{variant}")}
    ranks = {b: {r: i + 1 for i, r in enumerate(sorted(rungs, key=means[b].get))} for b in means}
    lines = [f"Budget ({label}): the same tokenizers, MaskGIT trained longer, on the seeds every rung has at both budgets; "
             f"rank 1 = lowest generation SWD; verdicts paired against {LABELS[REFERENCE_RUNG]} at the same budget:", "",
             "| rung | seeds | SWD x1e3 | rank | verdict | SWD x1e3, longer | rank, longer | verdict, longer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rungs, key=ranks[f"@{variant}"].get):
        cells = [LABELS.get(r, r), str(len(runs[r]))]
        for b in means:
            cells += [f"{means[b][r]:.2f}", str(ranks[b][r]),
                      "reference" if r == REFERENCE_RUNG else verdict(paired(runs[r + b], runs[REFERENCE_RUNG + b], "swd"))]
        lines.append("| " + " | ".join(cells) + " |")
    return ["", *lines]


def figures(results: dict, out: Path) -> None:
    rungs = [r for r in results if results[r]]
    first = {r: sorted(results[r])[0] for r in rungs}
    fig, axes = plt.subplots(1, len(rungs), figsize=(2.6 * len(rungs), 2.9), squeeze=False)
    for ax, rung in zip(axes[0], rungs):
        grid = Path(out) / rung / first[rung] / "samples_grid.png"
        if grid.exists():
            ax.imshow(Image.open(grid), interpolation="nearest")
        ax.set_title(f"{LABELS.get(rung, rung)}\n({first[rung]})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    # Seed spread: every run's generation SWD, one line per seed across the rungs (the pairs compared); rungs
    # are grouped by variant (the base rungs, then each "@" variant), and a seed's line stays inside its group.
    rungs = sorted(rungs, key=lambda r: ("@" in r, r.partition("@")[2]))
    group = [r.partition("@")[2] for r in rungs]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(rungs)), 4.2))
    seeds = sorted({k for r in rungs for k in results[r]}, key=lambda k: int(k.removeprefix("seed")))
    for j, seed in enumerate(seeds):
        for g in dict.fromkeys(group):
            xs = [i for i, r in enumerate(rungs) if seed in results[r] and group[i] == g]
            ax.plot(xs, [results[rungs[i]][seed]["swd"] for i in xs], "o-", color=f"C{j}", alpha=0.6, ms=4, lw=0.8,
                    label=seed if g == group[0] or not any(group[i] == group[0] and seed in results[r]
                                                           for i, r in enumerate(rungs)) else None)
    for i in range(1, len(rungs)):
        if group[i] != group[i - 1]:
            ax.axvline(i - 0.5, color="grey", lw=0.8, ls=":")
    means = [statistics.fmean(r["swd"] for r in results[rung].values()) for rung in rungs]
    ax.scatter(range(len(rungs)), means, marker="_", s=600, color="black", zorder=3, label="mean")
    ax.set_xticks(range(len(rungs)), [LABELS.get(r, r) for r in rungs], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="generation SWD x1e3 (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for rung in (r for r in rungs if "@" not in r):  # a MaskGIT variant's tokenizer is its base rung's
        for i, (seed, r) in enumerate(sorted(results[rung].items())):
            steps, used = zip(*r["usage_curve"]) if r["usage_curve"] else ((), ())
            ax.plot(steps, used, color=f"C{rungs.index(rung)}", alpha=1.0 if i == 0 else 0.45,
                    label=LABELS.get(rung, rung) if i == 0 else None)
    ax.set(xlabel="tokenizer training step", ylabel="fraction of codes used (log window)", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "codes_used.png", dpi=110)
    plt.close(fig)


def write_pages(out: Path, meta: dict, lines: list[str], paired_lines: list[str], budget_lines: list[str]) -> None:
    md = [f"# Generation ladder ({meta['setting']})", "", f"Command: `{meta['command']}`", "",
          "![samples, one column per rung](samples.png)", "", "Mean ± standard deviation over seeds:", "", *lines, "",
          f"Paired by seed against {LABELS[REFERENCE_RUNG]} at the same MaskGIT budget (rung minus reference; 95 % t "
          "interval; a verdict only where the interval excludes 0):", "", *paired_lines, *budget_lines, "",
          "![generation SWD of every run, one line per seed](seeds.png)", "",
          "![codes used during tokenizer training](codes_used.png)", "", "Protocol:", "",
          "```json", json.dumps({k: v for k, v in meta.items() if k != "command"}, indent=2), "```", ""]
    (out / "ladder.md").write_text("\n".join(md))
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731

    def html_table(md_lines: list[str]) -> str:
        rows = [line.strip("|").split("|") for line in md_lines if not line.startswith("|---")]
        body = "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows[1:])
        return '<div class="wrap"><table><tr>' + cells(rows[0], "th") + "</tr>" + body + "</table></div>"

    budget_html = "" if not budget_lines else (
        f"<h2>Budget</h2><p>{html.escape(budget_lines[1])}</p>" + html_table([x for x in budget_lines[3:] if x]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Generation ladder</title><style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}}
img{{max-width:100%;image-rendering:pixelated}}table{{border-collapse:collapse;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.wrap{{overflow-x:auto}}img.strip{{max-width:none;height:300px}}</style></head><body>
<h1>Generation ladder ({html.escape(meta['setting'])})</h1>
<div class="wrap"><img class="strip" src="samples.png" alt="samples of every rung"></div>
{html_table(lines)}
<p>Mean ± standard deviation over seeds. SWD x1e3 between {meta['samples']} samples and {meta['reference']['val']}
held-out real images; the floor row scores {meta['reference']['train']} real train images the same way (the
reconstruction SWD pairs each image with its own reconstruction: its floor is 0). STE error: mean((z - z_q)^2)
over the tokenizer's last 100 steps.</p>
<h2>Paired by seed against {html.escape(LABELS[REFERENCE_RUNG])}</h2>
<p>Rung minus reference at the same MaskGIT budget, seed by seed (same data order and initial weights); mean
difference, 95 % t interval, paired t-test p. "better" / "worse" only where the interval excludes 0.</p>
{html_table(paired_lines)}
{budget_html}
<p><img src="seeds.png" alt="generation SWD of every run, one line per seed"></p>
<p><img src="codes_used.png" alt="codes used during tokenizer training"></p>
<details><summary>protocol</summary><pre>{html.escape(json.dumps(meta, indent=2))}</pre></details>
</body></html>
"""
    (out / "index.html").write_text(page)
