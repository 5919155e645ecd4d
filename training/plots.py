"""Plots written into run directories (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_usage(counts: torch.Tensor, path: Path, title: str = "codebook usage") -> None:
    """Histogram of code counts, sorted: a collapsed codebook shows as a few tall bars and a flat tail."""
    counts = counts.float().cpu()
    order = counts.sort(descending=True).values
    used = int((counts > 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(order)), order.numpy(), width=1.0, color="tab:blue")
    ax.set_xlabel(f"codes, most used first ({used} of {len(order)} used)")
    ax.set_ylabel("assignments")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
