"""A small training loop: all VQ fixes together use far more codes than the plain layer."""
import torch
from torch import nn

from tokenizer import VectorQuant


def _train(vq_kwargs, steps=200, num_codes=512, seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    dec = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32))
    vq = VectorQuant(8, num_codes, **vq_kwargs)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *vq.parameters()], lr=1e-3)
    for _ in range(steps):
        x = torch.randn(256, 32)
        z_q, info = vq(enc(x))
        loss = (dec(z_q) - x).square().mean() + info["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    with torch.no_grad():
        x = torch.randn(4096, 32)
        z_q, info = vq(enc(x))
        mse = (dec(z_q) - x).square().mean().item()
    return info["perplexity"].item(), info["codes_used"].item(), mse


def test_all_fixes_use_far_more_codes_than_plain_vq():
    plain = _train({})
    fixed = _train(dict(kmeans_init=True, affine_lr=2.0, sync_nu=0.2, replace_freq=20, beta=1.0,
                        inplace_optimizer=lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)))
    print(f"plain: perplexity {plain[0]:.1f}, used {plain[1]:.3f}, mse {plain[2]:.4f}; "
          f"fixed: perplexity {fixed[0]:.1f}, used {fixed[1]:.3f}, mse {fixed[2]:.4f}")
    assert fixed[0] >= 2.0 * plain[0]
    assert fixed[1] >= 0.9 and fixed[1] >= plain[1] + 0.3
    assert fixed[2] < plain[2]  # and they reconstruct better
