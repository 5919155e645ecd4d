"""Codebook usage: how often each code is chosen, and the perplexity of that histogram (the quantizers'
``info``, train_tokenizer.py's log and validation)."""
from __future__ import annotations

import torch
from torch import Tensor


def code_histogram(q: Tensor, num_codes: int) -> Tensor:
    """Counts of each code in ``q`` (any shape, ids in [0, K)) -> (K,) float. A scatter-add of ones, not
    ``torch.bincount``: on a GPU bincount reads the largest id on the host to size its output (a sync
    per call). Exact: the counts are integers, far below float32's 2**24."""
    q = q.reshape(-1)
    return torch.zeros(num_codes, device=q.device).scatter_add_(0, q, torch.ones(q.shape, device=q.device))


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram: K for uniform use, 1 when one code takes everything."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
