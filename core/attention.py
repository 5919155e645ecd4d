"""Scaled dot-product attention that keeps its speed under CPU autocast.

PyTorch's fused CPU attention is fast in fp32 but its bf16 backward is not: in a training step of the
tiny MaskGIT under CPU bf16 autocast (4 blocks, batch 64 x 64 tokens, head dim 32) the bf16 backward
took ~110 ms per call against ~8 ms in fp32, so autocast made the whole step slower than fp32. Under
CPU autocast the attention therefore runs in fp32 (the q/k/v projections around it stay in bf16, where
the matmul time is); on a GPU and outside autocast this is ``F.scaled_dot_product_attention`` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Non-causal ``softmax(q k^T / sqrt(d)) v`` over the last two dims; the output has q's dtype."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
