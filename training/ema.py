"""Exponential moving average of model weights (DiT-style: a frozen copy updated in place)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` for parameters; buffers are copied.

    Buffers (e.g. the quantizer's running statistics and usage counters) are copied rather than
    averaged: they are state, not weights, and averaging integer counters is meaningless.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # One fused call for all parameters (torch._foreach_*: the same lerp per tensor, without a
        # Python round trip and a kernel launch per parameter); buffers are few and copied as they are.
        ema_params = dict(self.model.named_parameters())
        pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
        torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs], 1.0 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Copy ``model`` exactly (e.g. after k-means re-wrote its codebook: averaging the random
        codebook with the fitted one would give codes that belong to neither)."""
        self.model.load_state_dict(model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
