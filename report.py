"""Write the report of a pipeline run directory: index.html (one self-contained page), report.md, plots.

    python report.py --run runs/demo

Expects the layout `make demo` / `make celeba` produce: tokenizer/, maskgit/, optionally samples_grid.png
and eval/*.json (from `python -m eval`; eval/floor.json, real images scored like the samples, is the
floor SWD and FID are read against). The page shows pictures first and large (nearest-neighbour
upscaled), then curves, then every number with its context; it inlines its images and styles (no
network), and reads on a laptop and a phone. Every number is also written to report_metrics.json.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.config import from_dict
from core.errors import main_guard
from core.files import FINAL_METRICS, final_metrics_path, write_json, write_text
from data import DataConfig, build_dataset
from tokenizer import load_tokenizer
from training.plots import plot_curves, plot_pca
from training.run import RunError

TARGET_WIDTH = 560  # CSS px a picture is upscaled towards (integer factors: pixels stay sharp)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@torch.no_grad()
def pca_figure(run: Path, out: Path, max_images: int = 256) -> dict[str, Any]:
    """P (encoder outputs on validation images), C (effective codebook), Q (codes those images use)."""
    model, _ = load_tokenizer(run / "tokenizer" / "checkpoint.pt")
    cfg = json.loads((run / "tokenizer" / "config.json").read_text())
    dataset = build_dataset(from_dict(DataConfig, cfg["data"]), "val", train=False)
    x = torch.stack([dataset[i]["image"] for i in range(min(max_images, len(dataset)))])
    _, q, info = model.encode(x)
    p = info["z"].permute(0, 2, 3, 1).flatten(0, 2)  # (N, d), in the quantizer's space (after the input norm)
    c = model.quantizer.get_codebook()
    used = torch.zeros(model.num_codes, dtype=torch.bool)
    used[q.unique()] = True
    plot_pca(p, c, used, out, title=f"PCA of P, C and Q ({len(x)} validation images)")
    return {"pca_images": len(x), "pca_codes_used": int(used.sum()), "num_codes": model.num_codes}


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def wall_time(stage: Path) -> str:
    """Wall time of a stage's last training session (start to final metrics, as the script measured it; for
    runs older than that field, config.json's to the final metrics' modification time), and its precision."""
    start, end = stage / "config.json", final_metrics_path(stage)
    seconds = read_json(end).get("wall_seconds") if end.exists() else None
    if seconds is None and start.exists() and end.exists():
        seconds = end.stat().st_mtime - start.stat().st_mtime
    # a copy that did not keep modification times can put the end before the start: say nothing then
    took = duration(seconds) if seconds is not None and seconds >= 0 else "—"
    precision = read_json(start).get("optim", {}).get("mixed_precision", "no") if start.exists() else "no"
    return f"{took}, {'fp32' if precision == 'no' else precision + ' autocast'}"


def relative(value: Any, run: Path) -> Any:
    """``value`` (nested) with absolute paths under the run directory made relative to it."""
    if isinstance(value, dict):
        return {k: relative(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v, run) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        try:
            return os.path.relpath(value, run.resolve())
        except ValueError:
            return value
    return value


@dataclass
class Figure:
    path: str  # relative to the run directory
    caption: str
    pixel_art: bool  # image grids: nearest-neighbour upscaling; plots: shown at their size


@dataclass
class Row:
    metric: str
    value: str
    context: str


def build(run: Path) -> tuple[list[Figure], dict[str, list[Row]], dict[str, str], dict[str, Any]]:
    """(figures in display order, numbers by section, protocols by evaluation name, report_metrics)."""
    tok_log, mg_log = read_jsonl(run / "tokenizer" / "log.jsonl"), read_jsonl(run / "maskgit" / "log.jsonl")
    tok_val, mg_val = read_json(final_metrics_path(run / "tokenizer")), read_json(final_metrics_path(run / "maskgit"))
    if not tok_log or not tok_val:
        raise RunError(f"{run}/tokenizer has no finished training run (log.jsonl, {FINAL_METRICS})")
    plot_curves([("tokenizer loss", tok_log, "loss"), ("perplexity (batch)", tok_log, "perplexity"),
                 ("codes used (window)", tok_log, "window_codes_used")], run / "curves_tokenizer.png")
    if mg_log:
        plot_curves([("MaskGIT loss", mg_log, "loss"), ("masked-token accuracy", mg_log, "masked_accuracy")],
                    run / "curves_maskgit.png")
    metrics: dict[str, Any] = {"tokenizer": {k: v for k, v in tok_val.items() if k != "usage_counts"}}
    metrics["tokenizer"].update(pca_figure(run, run / "pca.png"))
    mg_cfg = read_json(run / "maskgit" / "config.json")
    masking = mg_cfg.get("masking", {})
    decoding = f"{masking.get('schedule', '?')} mask schedule, {masking.get('sample_steps', '?')} decoding steps"
    evals = {p.stem: read_json(p) for p in sorted((run / "eval").glob("*.json"))} if (run / "eval").is_dir() else {}
    metrics["eval"] = evals

    sampled = read_json(run / "samples_grid.json")  # sample.py's record of the grid (transformer.pipeline settings)
    how = (f"{sampled.get('maskgit_weights', 'ema').upper()} weights, {sampled['settings']['steps']} decoding steps, "
           f"{sampled['settings']['schedule']} schedule" if sampled else "settings not recorded")
    figures = [Figure("samples_grid.png", f"MaskGIT samples ({how})", True),
               Figure("tokenizer/recon_latest.png", "validation images (top) and their reconstructions (bottom)", True),
               Figure("curves_tokenizer.png", "tokenizer training curves", False),
               Figure("curves_maskgit.png", "MaskGIT training curves", False),
               Figure("tokenizer/codebook_usage_val.png", "codebook usage over the validation split", False),
               Figure("pca.png", "index collapse check: encoder outputs P, codebook C, used codes Q "
                                 "(Huh et al. 2023, Fig. 2)", False)]
    figures = [f for f in figures if (run / f.path).exists()]

    k_codes, n_used = tok_val["num_codes"], sum(1 for c in tok_val.get("usage_counts", []) if c > 0)
    tok_steps = tok_log[-1]["step"]
    numbers: dict[str, list[Row]] = {"Tokenizer (validation split, EMA weights)": [
        Row("PSNR", f"{tok_val['psnr']:.2f} dB", f"{tok_val['val_images']} validation images scaled to [0, 1]; "
                                                  f"MSE {fmt(tok_val['mse'])}"),
        Row("codes used", f"{n_used} of {k_codes} ({n_used / k_codes:.0%})", "codes chosen at least once on the split"),
        Row("perplexity", f"{tok_val['perplexity']:.1f} of {k_codes}", "exp(entropy) of the code histogram; "
                                                                        "K = every code equally often"),
        Row("training", f"{tok_steps:,} steps", f"wall time {wall_time(run / 'tokenizer')}"),
    ]}
    if mg_val:
        chance = 1 / k_codes
        rows = [Row("training", f"{mg_val['step']:,} steps", f"wall time {wall_time(run / 'maskgit')}; "
                                                             f"trained with the {decoding} (sampling default)")]
        if "val_accuracy" in mg_val:
            rows.insert(0, Row("masked-token accuracy", f"{mg_val['val_accuracy']:.3f}",
                               f"held-out code grids, mask ratios 0.25/0.5/0.75; chance 1/K = {chance:.3g}"))
            rows.insert(1, Row("masked-token loss", f"{mg_val['val_loss']:.3f}",
                               f"cross-entropy with label smoothing; uniform guess ln K = {torch.tensor(k_codes).log():.2f}"))
        numbers["MaskGIT (EMA weights)"] = rows
    floor = evals.get("floor", {}).get("metrics", {})
    protocols: dict[str, str] = {}
    for name, result in evals.items():
        if name == "floor":
            continue
        rows, m = [], result.get("metrics", {})
        count = result.get("protocol", {}).get("samples", {}).get("count", "?")
        paired = str(result.get("protocol", {}).get("samples", {}).get("kind", "")).startswith("reconstructions")
        for key, label, unit in (("FID", "FID", ""), ("SWD_x1e3_mean", "SWD ×10³", "")):
            if key in m:
                context = ("paired with the very images reconstructed: the floor is 0 (the generation floor does "
                           "not apply)" if paired else
                           f"real-vs-real floor {m_floor:.4g} (real train images scored the same way)"
                           if (m_floor := floor.get(key)) is not None else "no floor measured (eval/floor.json)")
                rows.append(Row(label, f"{m[key]:.4g}{unit}", f"{count} images; {context}; lower is better"))
        for key, value in m.items():
            if key.startswith("KID") or (key.startswith("FID") and key != "FID"):
                rows.append(Row(key, fmt(value), f"{count} images"))
        numbers[f"Evaluation: {name}"] = rows
        protocols[name] = json.dumps(relative(result.get("protocol", {}), run), indent=1)
    if not any("FID" in r.metric for rows in numbers.values() for r in rows):
        first_eval = next((k for k in numbers if k.startswith("Evaluation")), "Evaluation")
        numbers.setdefault(first_eval, []).append(Row(
            "FID", "—", "not computed: the Inception weights (weights-inception-2015-12-05-6726825d.pth) were not found; "
                        "put the file where the README says and re-run. SWD is a different metric."))
    metrics["maskgit"] = mg_val
    return figures, numbers, protocols, metrics


def to_markdown(run: Path, figures: list[Figure], numbers: dict[str, list[Row]], protocols: dict[str, str]) -> str:
    lines = [f"# Run report: {run.resolve().name}", ""]
    for f in figures:
        lines += [f"![{f.caption}]({f.path})", f"*{f.caption}*", ""]
    for section, rows in numbers.items():
        lines += [f"## {section}", "", "| metric | value | context |", "| --- | --- | --- |"]
        lines += [f"| {r.metric} | {r.value} | {r.context} |" for r in rows] + [""]
    for name, text in protocols.items():
        lines += [f"Protocol of {name}:", "", "```json", text, "```", ""]
    return "\n".join(lines)


STYLE = """
:root { color-scheme: light dark; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --card: #f6f8fa; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --muted: #9198a1; --line: #3d444d; --card: #161b22; } }
* { box-sizing: border-box; }
body { margin: 0 auto; padding: 1rem; max-width: 1240px; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); }
h1 { font-size: 1.6rem; margin: .2rem 0 1rem; } h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
img.pixel { image-rendering: pixelated; image-rendering: crisp-edges; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .3rem; max-width: 560px; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0; }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { width: 14rem; white-space: nowrap; }
td.value { width: 11rem; font-weight: 600; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.context { color: var(--muted); font-size: .92rem; overflow-wrap: anywhere; }
details { margin: .6rem 0; background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: .5rem .8rem; }
pre { white-space: pre-wrap; font-size: .8rem; margin: .4rem 0 0; }
pre, figcaption { overflow-wrap: anywhere; }
@media (max-width: 600px) {  /* a phone: metric and value on one line, the context below them */
  body { padding: .6rem; }
  table, tbody { display: block; }
  tr { display: grid; grid-template-columns: auto 1fr; border-bottom: 1px solid var(--line); padding: .3rem 0; }
  th, td, td.value { border: 0; padding: .1rem .3rem; width: auto; }
  td.context { grid-column: 1 / -1; }
}
"""


def figure_html(run: Path, f: Figure) -> str:
    """An inlined PNG at its intended CSS width: image grids upscaled by an integer factor towards TARGET_WIDTH,
    plots at their own size; either shrinks to the screen's width (a phone)."""
    data = (run / f.path).read_bytes()
    w, h = Image.open(run / f.path).size
    scale = max(1, TARGET_WIDTH // w) if f.pixel_art else 1
    width, height = w * scale, h * scale
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    cls = ' class="pixel"' if f.pixel_art else ""
    return (f'<figure><img{cls} src="{src}" width="{width}" height="{height}" alt="{html.escape(f.caption)}" '
            f'data-scale="{scale}"><figcaption>{html.escape(f.caption)}</figcaption></figure>')


def to_html(run: Path, figures: list[Figure], numbers: dict[str, list[Row]], protocols: dict[str, str]) -> str:
    """One self-contained page: images as data URIs, styles inline, no script, nothing fetched."""
    pictures = [f for f in figures if f.pixel_art]
    curves = [f for f in figures if not f.pixel_art]
    esc = html.escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Run report: {esc(run.resolve().name)}</title><style>{STYLE}</style></head><body>",
           f"<h1>Run report: {esc(run.resolve().name)}</h1>",
           '<section class="figures">' + "".join(figure_html(run, f) for f in pictures) + "</section>",
           "<h2>Curves</h2>", '<section class="figures">' + "".join(figure_html(run, f) for f in curves) + "</section>"]
    for section, rows in numbers.items():
        out.append(f"<h2>{esc(section)}</h2><table><tbody>")
        out += [f'<tr><th scope="row">{esc(r.metric)}</th><td class="value">{esc(r.value)}</td>'
                f'<td class="context">{esc(r.context)}</td></tr>' for r in rows]
        out.append("</tbody></table>")
    for name, text in protocols.items():
        out.append(f"<details><summary>Protocol of {esc(name)} (paths relative to the run directory)</summary>"
                   f"<pre>{esc(text)}</pre></details>")
    return "\n".join(out) + "\n</body></html>\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="pipeline run directory")
    args = p.parse_args()
    run = Path(args.run)
    figures, numbers, protocols, metrics = build(run)
    write_text(run / "report.md", to_markdown(run, figures, numbers, protocols) + "\n")
    write_text(run / "index.html", to_html(run, figures, numbers, protocols))
    write_json(run / "report_metrics.json", metrics)
    print(f"report: {run / 'report.md'} and {run / 'index.html'}")


if __name__ == "__main__":
    main_guard(main)
