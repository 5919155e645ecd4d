"""Export trained models as portable folders: safetensors weights + config.json, no pickle, no training state.

    python export.py --tokenizer runs/tok/checkpoint.pt --maskgit runs/mg/checkpoint.pt --out exports/celeba64
    python export.py --tokenizer runs/tok/checkpoint.pt --out exports/tok      # the tokenizer alone

Writes OUT/tokenizer/ and OUT/maskgit/, each {model.safetensors, config.json}. Load them with

    from transformer.pipeline import load_pretrained, generate, decode_settings
    tokenizer, maskgit, meta = load_pretrained("exports/celeba64")
    images = next(generate(tokenizer, maskgit, n=16, batch_size=16, seed=0, **decode_settings(meta["config"])))

or one at a time with ``VQModel.from_pretrained(folder)`` / ``MaskGIT.from_pretrained(folder)``; sample.py
and ``python -m eval gen`` take the folders in place of checkpoints.
"""
from __future__ import annotations

import argparse

from core.errors import main_guard
from transformer.pipeline import export_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (or its run directory)")
    p.add_argument("--maskgit", default=None, help="MaskGIT checkpoint trained on that tokenizer's codes (optional)")
    p.add_argument("--out", required=True, help="output folder: OUT/tokenizer and OUT/maskgit")
    p.add_argument("--raw-weights", action="store_true", help="export MaskGIT's raw instead of EMA weights")
    args = p.parse_args()
    for name, folder in export_models(args.tokenizer, args.maskgit, args.out, ema=not args.raw_weights).items():
        print(f"export: {name} -> {folder}")


if __name__ == "__main__":
    main_guard(main)
