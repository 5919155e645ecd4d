"""Write the visual report of a pipeline run directory: report.md, index.html (images inline), plots.

    python report.py --run runs/demo

Expects the layout `make demo` / `make celeba` produce: tokenizer/, maskgit/, optionally samples_grid.png
and eval/*.json (from `python -m eval`). Every number in the report is also written to
report_metrics.json, so the report can be checked against its sources.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import torch

from core.config import from_dict
from core.errors import main_guard
from core.files import write_json, write_text
from data import DataConfig, build_dataset
from tokenizer import load_tokenizer
from training.plots import plot_curves, plot_pca
from training.run import RunError


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
    p = info["z"].permute(0, 2, 3, 1).reshape(-1, model.cfg.vq.code_dim)  # (N, d), after the input norm
    c = model.quantizer.get_codebook()
    used = torch.zeros(model.num_codes, dtype=torch.bool)
    used[q.unique()] = True
    plot_pca(p, c, used, out, title=f"PCA of P, C and Q ({len(x)} validation images)")
    return {"pca_images": len(x), "pca_codes_used": int(used.sum()), "num_codes": model.num_codes}


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build(run: Path) -> tuple[str, dict]:
    tok_log, mg_log = read_jsonl(run / "tokenizer" / "log.jsonl"), read_jsonl(run / "maskgit" / "log.jsonl")
    tok_val, mg_val = read_json(run / "tokenizer" / "val_metrics.json"), read_json(run / "maskgit" / "train_metrics.json")
    if not tok_log or not tok_val:
        raise RunError(f"{run}/tokenizer has no finished training run (log.jsonl, val_metrics.json)")
    plot_curves([("tokenizer loss", tok_log, "loss"), ("perplexity (batch)", tok_log, "perplexity"),
                 ("codes used (window)", tok_log, "window_codes_used")], run / "curves_tokenizer.png")
    figures = ["samples_grid.png", "tokenizer/recon_latest.png", "curves_tokenizer.png"]
    if mg_log:
        plot_curves([("MaskGIT loss", mg_log, "loss"), ("masked-token accuracy", mg_log, "masked_accuracy")],
                    run / "curves_maskgit.png")
        figures.append("curves_maskgit.png")
    metrics: dict[str, Any] = {"tokenizer": {k: v for k, v in tok_val.items() if k != "usage_counts"}}
    metrics["tokenizer"].update(pca_figure(run, run / "pca.png"))
    figures += ["tokenizer/codebook_usage_val.png", "pca.png"]
    if mg_val:
        metrics["maskgit"] = mg_val
    evals = {p.stem: read_json(p) for p in sorted((run / "eval").glob("*.json"))} if (run / "eval").is_dir() else {}
    metrics["eval"] = evals

    sampled = read_json(run / "samples_grid.json")  # sample.py's record of the grid (transformer.pipeline settings)
    how = (f"{sampled.get('maskgit_weights', 'ema').upper()} weights, {sampled['settings']['steps']} decoding steps, "
           f"{sampled['settings']['schedule']} schedule" if sampled else "settings not recorded")
    captions = {
        "samples_grid.png": f"MaskGIT samples ({how})",
        "tokenizer/recon_latest.png": "validation images (top) and their reconstructions (bottom)",
        "curves_tokenizer.png": "tokenizer training curves",
        "curves_maskgit.png": "MaskGIT training curves",
        "tokenizer/codebook_usage_val.png": "codebook usage over the validation split",
        "pca.png": "index collapse check: encoder outputs P, codebook C, used codes Q (Huh et al. 2023, Fig. 2)",
    }
    lines = [f"# Run report: {run.name}", ""]
    for fig in figures:
        if (run / fig).exists():
            lines += [f"![{captions[fig]}]({fig})", f"*{captions[fig]}*", ""]
    lines += ["## Tokenizer (validation split, EMA weights)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in metrics["tokenizer"].items()]
    lines += ["", "PSNR and MSE on images scaled to [0, 1]; perplexity = exp(entropy) of the code histogram over the split.", ""]
    if mg_val:
        lines += ["## MaskGIT", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in mg_val.items()]
        lines += ["", "val_accuracy: masked-token accuracy on held-out code grids at mask ratios r = 0.25, 0.5, 0.75.", ""]
    for name, result in evals.items():
        lines += [f"## Evaluation: {name}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in result.get("metrics", {}).items()]
        lines += ["", "Protocol:", "", "```json", json.dumps(result.get("protocol", {}), indent=1), "```", ""]
    if not any("fid" in k.lower() for r in evals.values() for k in r.get("metrics", {})):
        lines += ["No FID here: the Inception weights (weights-inception-2015-12-05-6726825d.pth) were not found. "
                  "Put the file where the README says and re-run to get FID; SWD above is a different metric.", ""]
    return "\n".join(lines), metrics


def to_html(markdown: str, run: Path) -> str:
    """A small, dependency-free rendering of the report with the images inlined as data URIs."""
    out, in_code, in_table = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if m := re.match(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((run / m.group(2)).read_bytes()).decode()
            out.append(f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}" style="max-width:100%">')
        elif line.startswith("# ") or line.startswith("## "):
            level = 1 if line.startswith("# ") else 2
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-", " "}:
                continue
            if not in_table:
                out.append("<table border=1 cellpadding=3>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        elif line.startswith("*") and line.endswith("*"):
            out.append(f"<p><em>{html.escape(line.strip('*'))}</em></p>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    head = "<!doctype html><meta charset=utf-8><title>report</title><body style='font-family:sans-serif;max-width:900px'>"
    return head + "\n" + "\n".join(out) + "\n</body>"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="pipeline run directory")
    args = p.parse_args()
    run = Path(args.run)
    markdown, metrics = build(run)
    write_text(run / "report.md", markdown + "\n")
    write_text(run / "index.html", to_html(markdown, run))
    write_json(run / "report_metrics.json", metrics)
    print(f"report: {run / 'report.md'} and {run / 'index.html'}")


if __name__ == "__main__":
    main_guard(main)
