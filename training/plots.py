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


def plot_curves(panels: list[tuple[str, list[dict], str]], path: Path) -> None:
    """One small panel per (title, log records, key) with the key plotted over ``step``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (title, records, key) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pca(p: torch.Tensor, c: torch.Tensor, used: torch.Tensor, path: Path, title: str = "") -> None:
    """2-D PCA (fit on the encoder outputs P) of P, the codebook C and the used codes Q.

    As in Huh et al. (2023), Fig. 2: with index collapse most of C lies away from P and Q is a few
    points; with the fixes C covers P and Q is most of C.
    """
    p, c = p.float().cpu(), c.float().cpu()
    mean = p.mean(0)
    _, _, v = torch.pca_lowrank(p - mean, q=2, center=False)
    pp, cc = (p - mean) @ v, (c - mean) @ v
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(pp[:, 0], pp[:, 1], s=2, alpha=0.25, color="tab:gray", label=f"P: encoder outputs ({len(p)})")
    ax.scatter(cc[~used, 0], cc[~used, 1], s=10, marker="x", color="tab:red", label=f"C unused ({int((~used).sum())})")
    ax.scatter(cc[used, 0], cc[used, 1], s=10, color="tab:blue", label=f"Q: used codes ({int(used.sum())})")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "PCA of encoder outputs and codebook", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
