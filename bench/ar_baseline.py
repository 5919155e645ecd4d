"""The autoregressive baseline for the sampling bench: a causal transformer of MaskGIT's size that
decodes one token per step with a KV cache (LlamaGen-style raster order). Used only by
bench_stage_two.py; nothing in the product trains or samples with it.

The network is the project's MaskGIT (transformer/model.py) with its attention made causal: same
embeddings, pre-LN blocks, MLP and tied output head, so the parameter count and the FLOPs per token
are MaskGIT's. Input row K of the embedding (MaskGIT's mask token) serves as the start token:
position i sees [start, t_0, ..., t_{i-1}] and predicts t_i. With a cache each step runs the
blocks on one new position and attends to the keys and values of the earlier ones, so N steps cost
about one full forward pass of FLOPs (plus attention to the cache), against T full passes for
MaskGIT. Sampling uses MaskGIT's own rule (Gumbel-max with temperature and top-k).
"""
from __future__ import annotations

import common  # noqa: F401  (this checkout's packages on sys.path)
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from transformer.decoding import _sample  # the sampling rule MaskGIT decoding uses
from transformer.model import Attention, Block, MaskGIT, MaskGITConfig

Cache = list[tuple[Tensor, Tensor]]  # per block: keys and values (B, H, N, Dh), filled up to the current position


class CausalAttention(Attention):
    """MaskGIT's attention (same projections) with causal masking and an optional KV cache."""

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        """x (B, L, D) holds positions start .. start + L - 1; ``cache`` (keys, values) receives their
        keys and values and supplies those of positions 0 .. start - 1. No cache: start must be 0."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        length = x.shape[1]
        if cache is not None:
            keys, values = cache
            keys[:, :, start:start + length] = k
            values[:, :, start:start + length] = v
            k, v = keys[:, :, :start + length], values[:, :, :start + length]
        elif start:
            raise ValueError("CausalAttention: start > 0 needs a cache holding the earlier positions")
        if start == 0 or length == 1:  # no mask needed for one new query, which sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0 and length > 1)
        else:  # a chunk after a prefix: query i (absolute start + i) sees keys 0 .. start + i
            allowed = torch.ones(length, start + length, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))


class CausalBlock(Block):
    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__(cfg)
        self.attn = CausalAttention(cfg.dim, cfg.heads, 0.0, 0.0)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, start)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(MaskGIT):
    """MaskGIT's network with causal attention: inputs (B, L) = [start, t_0, ..., t_{L-2}] at positions
    0 .. L - 1 -> logits (B, L, K) for t_0 .. t_{L-1}. Unconditional; for speed measurements."""

    def __init__(self, cfg: MaskGITConfig) -> None:
        if cfg.conditional:
            raise ValueError("CausalTransformer: the AR baseline is unconditional")
        super().__init__(cfg)
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.depth))
        self.blocks.apply(self._init_weights)

    @property
    def start_id(self) -> int:
        return self.cfg.num_codes  # MaskGIT's mask row of the embedding

    def new_cache(self, batch_size: int) -> Cache:
        """Empty keys and values for a whole sequence, one pair per block, in the dtype the attention
        computes in (autocast's when it is on, so that no step converts the whole cache)."""
        device = self.pos_emb.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.pos_emb.dtype
        shape = (batch_size, self.cfg.heads, self.cfg.seq_len, self.cfg.dim // self.cfg.heads)
        return [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                for _ in self.blocks]

    def forward(self, tokens: Tensor, cache: Cache | None = None, start: int = 0) -> Tensor:  # type: ignore[override]
        """tokens (B, L): the inputs at positions start .. start + L - 1 (start 0 is the start token)."""
        length = tokens.shape[1]
        if start + length > self.cfg.seq_len:
            raise ValueError(f"CausalTransformer: positions up to {start + length} exceed {self.cfg.seq_len}")
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:, start:start + length])
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i], start)
        x = self.head_transform(self.norm(x))
        if self.cfg.tied_head:
            return x @ self.tok_emb.weight[: self.cfg.num_codes].t() + self.head_bias
        return self.head(x)


@torch.no_grad()
def ar_decode(model: CausalTransformer, batch_size: int, generator: torch.Generator,
              temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """N steps of one token each, raster order, with a KV cache: (B, N) long code ids."""
    if model.training:
        raise ValueError("ar_decode: call model.eval() first")
    device = model.pos_emb.device
    cache = model.new_cache(batch_size)
    tokens = torch.empty(batch_size, model.seq_len, dtype=torch.long, device=device)
    inputs = torch.full((batch_size, 1), model.start_id, dtype=torch.long, device=device)
    for i in range(model.seq_len):
        logits = model(inputs, cache, start=i).float()  # (B, 1, K)
        ids, _ = _sample(logits[:, 0], temperature, top_k, generator)  # (B,)
        tokens[:, i] = ids
        inputs = ids[:, None]
    return tokens
