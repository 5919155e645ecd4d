"""Stage two: MaskGIT (Chang et al., CVPR 2022) over the tokenizer's code grid.

schedule.py  the mask schedule gamma, shared by training and decoding
model.py     MaskGITConfig, presets, the bidirectional transformer
masking.py   training-side masking and the masked-token loss
decoding.py  iterative parallel decoding (+ inpainting, CFG) and the sequential baseline
"""

from transformer.decoding import maskgit_decode, sequential_decode
from transformer.masking import mask_tokens, masked_ce_loss
from transformer.model import PRESETS, MaskGIT, MaskGITConfig, build_maskgit
from transformer.schedule import SCHEDULES, gamma, num_masked_decode, num_masked_train

__all__ = [
    "MaskGIT",
    "MaskGITConfig",
    "PRESETS",
    "SCHEDULES",
    "build_maskgit",
    "gamma",
    "mask_tokens",
    "masked_ce_loss",
    "maskgit_decode",
    "num_masked_decode",
    "num_masked_train",
    "sequential_decode",
]
