"""Lookup-free quantization (Yu et al., ICLR 2024, "Language Model Beats Diffusion -- Tokenizer is Key
to Visual Generation" (MAGVIT-v2), arXiv 2310.05737, section 3.1): each of b channels is quantized to
its sign, the codebook is the implicit set {-1, 1}^b of K = 2^b codes, and an entropy penalty keeps
every sample's assignment confident and the batch's use of the codebook spread out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizer.scalar import GridQuant


class LookupFreeQuant(GridQuant):
    """LFQ with K = ``num_codes`` = 2^b codes on b channels.

    * Code: ``c = sign(z)`` per channel (z > 0 -> +1, else -1); gradient straight through to z.
    * Index: the bits ``c_i > 0`` read as a binary number with the *first* channel most significant
      (``q = sum_i [c_i > 0] 2^(b-1-i)``), as vector-quantize-pytorch does; ``grid_codes`` inverts it.
    * Soft assignment for the entropy terms: ``p(k | z) = softmax_k(-||z - c_k||^2 / tau)``, which equals
      ``softmax_k(2 z.c_k / tau)`` because every ||c_k||^2 = b, and factorizes over the bits
      (``entropies``). tau = ``temperature``.
    * ``loss = (1 - beta) * mean((z - sg(c))^2) + sample_entropy_weight * mean_n H(p(. | z_n))
      - codebook_entropy_weight * H(mean_n p(. | z_n))``, MAGVIT-v2's entropy penalty
      ``E[H(q(z))] - gamma H(E[q(z)])`` with gamma = codebook_entropy_weight / sample_entropy_weight.
      ``beta`` is VectorQuant's trade-off: the codes are fixed, so the codebook term (weight beta) has
      nothing to train and only the commitment term (weight 1 - beta) remains; beta = 0.75 is VQ-VAE's
      commitment weight 0.25.

    Entropies are exact (log-softmax, 0 log 0 = 0) where vector-quantize-pytorch clamps probabilities at
    1e-5 inside the log; both agree wherever no probability is that small. The mean assignment needs
    an (N, K) matrix: memory O(N K), fine for the K <= 2^14 this project trains, not for MAGVIT-v2's
    2^18 (which would need a sampled or chunked estimate). Under data parallelism the codebook entropy is that of each
    replica's batch (not all-reduced).
    """

    def __init__(self, feature_size: int, num_codes: int, beta: float = 0.95, temperature: float = 0.01,
                 sample_entropy_weight: float = 0.1, codebook_entropy_weight: float = 0.1, dim: int = -1) -> None:
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 2 or num_codes & (num_codes - 1):
            raise ValueError(f"LFQ: num_codes must be a power of 2 (K = 2^bits), got {num_codes!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (LFQ's commitment weight is 1 - beta), got {beta}")
        if temperature <= 0 or sample_entropy_weight < 0 or codebook_entropy_weight < 0:
            raise ValueError(f"LFQ needs temperature > 0 and entropy weights >= 0, got temperature={temperature}, "
                             f"sample_entropy_weight={sample_entropy_weight}, codebook_entropy_weight={codebook_entropy_weight}")
        bits = int(math.log2(num_codes))
        super().__init__(feature_size, bits, num_codes, dim)
        self.beta, self.temperature = float(beta), float(temperature)
        self.sample_entropy_weight, self.codebook_entropy_weight = float(sample_entropy_weight), float(codebook_entropy_weight)
        self.register_buffer("_bit_values", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)  # (b,)

    def _grid(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        positive = z.detach() > 0  # (N, b)
        codes = torch.where(positive, 1.0, -1.0)
        return z, codes, (positive.long() * self._bit_values).sum(-1)

    def grid_codes(self, indices: Tensor) -> Tensor:
        bits = (indices.unsqueeze(-1) & self._bit_values) != 0  # (..., b)
        return torch.where(bits, 1.0, -1.0)

    def entropies(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy, entropy of the mean assignment) of p(k | z) for z (N, b), in nats.

        softmax_k(2 z.c_k / tau) over c in {-1, 1}^b factorizes over the bits: bit i is +1 with
        probability sigmoid(4 z_i / tau), independently. So the per-sample entropy is a sum of b binary
        entropies (O(N b)), and log p(k | z) = sum_i log sigmoid(+-4 z_i / tau) is one matmul with the
        bit patterns; only the mean assignment needs the (N, K) matrix.
        """
        a = z * (4 / self.temperature)  # (N, b)
        log_pos, log_neg = F.logsigmoid(a), F.logsigmoid(-a)
        sample = -(log_pos.exp() * log_pos + log_neg.exp() * log_neg).sum(-1).mean()
        bits = (self.get_codebook() > 0).float()  # (K, b)
        mean_p = (log_pos @ bits.t() + log_neg @ (1 - bits).t()).exp().mean(0)  # (K,)
        # 0 log 0 = 0 with a finite gradient: codes no sample reaches underflow to exactly 0 (xlogy's
        # gradient there is log 0 = -inf, which turns the whole backward pass into NaN)
        return sample, -(mean_p * mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny).log()).sum()

    def _losses(self, z: Tensor, z_b: Tensor, codes: Tensor) -> dict[str, Tensor]:
        commitment = F.mse_loss(z, codes)
        sample, codebook = self.entropies(z)
        entropy = self.sample_entropy_weight * sample - self.codebook_entropy_weight * codebook
        return {"loss": (1 - self.beta) * commitment + entropy, "entropy_loss": entropy, "sample_entropy": sample.detach(),
                "codebook_entropy": codebook.detach()}

    def extra_repr(self) -> str:
        return (f"feature_size={self.feature_size}, bits={self.channels}, num_codes={self.num_codes}, beta={self.beta}, "
                f"temperature={self.temperature}, sample_entropy_weight={self.sample_entropy_weight}, "
                f"codebook_entropy_weight={self.codebook_entropy_weight}")
