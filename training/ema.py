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
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - self.decay)
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
