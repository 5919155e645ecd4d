"""A trained tokenizer's latents on held-out images: EMA against raw weights, and the scale of z and the codes.

    python bench/inspect_tokenizer.py runs/ladder/seed_recipe/seed*/tokenizer/checkpoint.pt --images 400

For each checkpoint, on the first ``--images`` images of its own validation split (the data config stored
in the checkpoint): PSNR of the reconstructions with the EMA weights and with the raw (trained) weights,
the mean norm of the encoder outputs z (before the quantizer's own normalization, if any), their mean
per-dimension standard deviation, the mean norm of the effective codes, and the quantization error
mean ||z - c||^2 relative to mean ||z||^2 (z as the layer compares it: l2-normalized when it
normalizes). A run that reconstructs worse than its siblings can be told
apart here: a bad EMA (raw weights fine), or latents that shrank (a smaller VQ loss at the same relative
error, which an unnormalized layer allows).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from common import ROOT  # noqa: F401  (this checkout's packages first)

from core.checkpoint import load_checkpoint
from core.config import from_dict
from data import DataConfig, build_dataset
from tokenizer import load_tokenizer


@torch.no_grad()
def inspect(path: str, n: int, batch: int = 50) -> dict:
    cfg = from_dict(DataConfig, load_checkpoint(path, kind="tokenizer")["config"]["data"])
    data = build_dataset(cfg, "val", train=False)
    x = torch.stack([data[i]["image"] for i in range(min(n, len(data)))])
    out = {}
    for ema in (True, False):
        model, _ = load_tokenizer(path, ema=ema)
        squared = sum(((model(xb)[0].clamp(-1, 1) - xb) / 2).square().sum().item() for xb in x.split(batch))
        out["psnr_ema" if ema else "psnr_raw"] = 10 * math.log10(x.numel() / squared)  # images in [0, 1]
    z = torch.cat([model.encoder(xb) for xb in x.split(batch)]).movedim(1, -1).reshape(-1, model.cfg.vq.code_dim)
    out.update(z_norm=z.norm(dim=1).mean().item(), z_std=z.std(0).mean().item())
    quantizer = model.quantizer
    if hasattr(quantizer, "get_codebook"):  # a vector quantizer: its codes, and z as the layer compares them
        zq = F.normalize(z, dim=-1) if getattr(quantizer, "norm", None) == "l2" else z
        codes = quantizer.get_codebook()
        err = torch.cdist(zq, codes).min(1).values.square().mean()
        out.update(code_norm=codes.norm(dim=1).mean().item(), rel_error=(err / zq.square().sum(1).mean()).item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--images", type=int, default=400)
    a = p.parse_args()
    print("| checkpoint | PSNR EMA dB | PSNR raw dB | mean norm of z | per-dim std of z | mean code norm "
          "| relative quant. error |")
    print("|---|---|---|---|---|---|---|")
    for path in a.checkpoints:
        r = inspect(path, a.images)
        codes = f"{r['code_norm']:.3f} | {r['rel_error']:.4f}" if "code_norm" in r else "— | —"
        print(f"| {path} | {r['psnr_ema']:.2f} | {r['psnr_raw']:.2f} | {r['z_norm']:.3f} | {r['z_std']:.3f} | {codes} |",
              flush=True)


if __name__ == "__main__":
    main()
