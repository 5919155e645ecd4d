"""Codebook usage: how often each code is chosen, and the perplexity of that histogram (the quantizers'
``info``, train_tokenizer.py's log and validation)."""
from __future__ import annotations

import torch
from torch import Tensor


def code_histogram(q: Tensor, num_codes: int) -> Tensor:
    """Counts of each code in ``q`` (any shape) -> (K,) float."""
    return torch.bincount(q.reshape(-1), minlength=num_codes).float()


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram: K for uniform use, 1 when one code takes everything."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
