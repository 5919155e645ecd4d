"""Evaluation reports: ``<run_dir>/<name>.json`` (machine-readable) and ``<name>.md`` (for people).

Both carry the metric values *and* the protocol they were measured under: tool and mode, extractor
weights file, sha256 and whether they are the standard ones, reference set / split / count,
resolution and preprocessing, number of samples, sampling settings, checkpoints, KID and SWD
parameters, and any small-sample warnings. A number from non-standard weights is never called FID.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from core.files import write_text
from eval.inception import WEIGHTS_FILENAME
from eval.score import ScoreResult

NOT_FID = (f"**NOT FID**: computed with unverified Inception weights (not the standard {WEIGHTS_FILENAME}); "
           f"only comparable with numbers computed from the same weights file.")


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _protocol_lines(protocol: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in protocol.items():
        if isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines.extend(_protocol_lines(value, indent + "  "))
        else:
            lines.append(f"{indent}- {key}: `{json.dumps(value, default=str)}`")
    return lines


def to_markdown(name: str, result: ScoreResult) -> str:
    lines = [f"# {name}", ""]
    if result.standard_weights is False:
        lines += [NOT_FID, ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result.metrics.items()]
    if result.notes:
        lines += ["", "Warnings:", *[f"- {n}" for n in result.notes]]
    lines += ["", "## Protocol", "", *_protocol_lines(result.protocol), ""]
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, name: str, result: ScoreResult) -> tuple[Path, Path]:
    """Write ``<run_dir>/<name>.json`` and ``.md`` (atomically); returns both paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, **result.to_dict(),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    json_path, md_path = run_dir / f"{name}.json", run_dir / f"{name}.md"
    write_text(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    write_text(md_path, to_markdown(name, result))
    return json_path, md_path


def summary_line(result: ScoreResult) -> str:
    """One line for the terminal, e.g. ``FID 12.3 | KID_mean 0.004 | SWD_x1e3_mean 20.1``."""
    parts = [f"{k} {_fmt(v)}" for k, v in result.metrics.items() if not k.endswith("_std")]
    if result.standard_weights is False:
        parts.append("(NOT FID: unverified weights)")
    return " | ".join(parts)
