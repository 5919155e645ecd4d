"""Training-side MaskGIT: random masking by the schedule, and the masked-token loss.

MaskGIT (Chang et al., CVPR 2022) sec. 3.2: for each image sample r ~ U(0, 1), replace
ceil(gamma(r) N) uniformly chosen tokens by the mask token, and minimise the negative
log-likelihood of the original tokens at the masked positions only.

Three bugs found in public ports, and how this file avoids each:
* masking the inverted set: `mask` is True exactly at the positions replaced by the mask id, and
  the same tensor selects the loss positions (tested);
* loss on all tokens: the per-token loss is multiplied by `mask`, so (finite) unmasked logits add exactly 0
  to the loss and its gradient (tested);
* feeding unmasked ids: the returned inputs are built from `mask`, not copied from `tokens`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.schedule import num_masked_train


def mask_tokens(
    tokens: Tensor,
    mask_id: int,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    r: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask each sample by the schedule.

    tokens: (B, N) long code ids in [0, mask_id).  mask_id: K, the model's mask token id.
    generator: on tokens' device; None uses torch's global RNG.
    r: optional (B,) mask-ratio inputs in [0, 1] (e.g. fixed ratios for a validation loss);
       default r ~ U(0, 1) per sample.
    Returns (inputs (B, N) with mask_id at masked positions, mask (B, N) bool, True = masked).
    Exactly num_masked_train(r_b, N) = clip(ceil(gamma(r_b) N), 1, N) positions of sample b are
    masked, chosen uniformly at random.
    """
    if tokens.dim() != 2:
        raise ValueError(f"mask_tokens: tokens must be (B, N), got {tuple(tokens.shape)}")
    if tokens.device.type == "cpu" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= mask_id):  # no GPU sync
        raise ValueError(f"mask_tokens: token ids must lie in [0, {mask_id}); the input already holds "
                         "mask ids or ids beyond the codebook")
    b, n = tokens.shape
    device = tokens.device
    if r is None:
        # float64 so ceil(gamma(r) N) is not thrown off by float32 rounding near integers
        r = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
    elif r.shape != (b,):
        raise ValueError(f"mask_tokens: r must have shape ({b},), got {tuple(r.shape)}")
    n_mask = num_masked_train(r.to(device), n, schedule)  # (B,) long, in [1, N]

    # Uniformly random subset of exact size n_mask[b]: rank i.i.d. scores, mask the n_mask lowest.
    scores = torch.rand(b, n, generator=generator, device=device)  # (B, N)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, N), a permutation of 0..N-1 per row
    mask = ranks < n_mask[:, None]  # (B, N) bool
    inputs = torch.where(mask, torch.full_like(tokens, mask_id), tokens)
    return inputs, mask


def masked_ce_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over masked positions only (MaskGIT eq. 1), label smoothing 0.1 as in the
    reference recipe.

    logits: (B, N, K); targets: (B, N) original code ids; mask: (B, N) bool, True = masked.
    Returns (loss, accuracy): the mean over all masked tokens of the batch (each masked token
    weighs the same, as in MaskGIT's reference), and the fraction of masked tokens whose argmax
    equals the target (detached). Computed in fp32 even under autocast.

    No host read and no data-dependent shape: the per-token loss is computed at every position,
    multiplied by the mask (unmasked positions contribute exactly 0, to the value and the gradient)
    and divided by the number of masked tokens, clamped to at least 1. A mask with no masked
    position therefore gives loss 0 and accuracy 0 (nothing to learn) rather than an error: deciding
    to raise would need the mask's value on the host.
    """
    if logits.shape[:2] != targets.shape or mask.shape != targets.shape:
        raise ValueError(f"masked_ce_loss: shapes disagree: logits {tuple(logits.shape)}, "
                         f"targets {tuple(targets.shape)}, mask {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"masked_ce_loss: mask must be bool, got {mask.dtype}")
    logits = logits.float()
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                                label_smoothing=label_smoothing).view_as(targets)  # (B, N)
    weight = mask.float()
    count = weight.sum().clamp_min(1.0)
    loss = (per_token * weight).sum() / count
    with torch.no_grad():
        accuracy = ((logits.argmax(dim=-1) == targets) & mask).float().sum() / count
    return loss, accuracy
