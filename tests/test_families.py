"""Invariants of the other quantizer families: FSQ, LFQ, SimVQ and the rotation trick (docs/quantizers.md)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_script

from tokenizer import VQ_VARIANTS, VectorQuant, VQConfig, build_quantizer, load_tokenizer
from tokenizer.config import variant_overrides
from tokenizer.fsq import FiniteScalarQuant, fsq_levels
from tokenizer.group_residual import ResidualVectorQuant
from tokenizer.lfq import LookupFreeQuant
from tokenizer.simvq import SimVQ

FAMILIES = ["fsq", "lfq", "rotation", "simvq"]


# ---- FSQ -----------------------------------------------------------------------------------------
def test_fsq_outputs_lie_on_the_level_grid_and_reach_every_level():
    torch.manual_seed(0)
    levels = (8, 5, 4, 3)
    fsq = FiniteScalarQuant(4, levels, dim=1)
    z = torch.randn(16, 4, 8, 8) * 3
    out, info = fsq(z)
    assert torch.equal(out, info["z_q"])  # no projection: the output is the grid point itself
    for i, L in enumerate(levels):
        steps = out[:, i] * (L // 2)  # integers -L//2 .. L - 1 - L//2
        assert torch.equal(steps, steps.round())
        assert set(steps.unique().long().tolist()) == set(range(-(L // 2), L - L // 2))
    assert out.abs().max() <= 1
    assert info["loss"] == 0 and not info["loss"].requires_grad  # no auxiliary loss


def test_fsq_index_code_bijection():
    levels = (8, 6, 5)
    fsq = FiniteScalarQuant(3, levels)
    codes = fsq.get_codebook()  # (K, 3), in index order
    assert codes.shape == (240, 3) and len(torch.unique(codes, dim=0)) == 240  # K distinct grid points
    # inputs whose bound is exactly each grid point: the forward pass must give back index k for code k
    target = codes * fsq._half_width + fsq._offset
    z = torch.atanh(target / fsq._half_l) - fsq._shift
    out, info = fsq(z)
    assert torch.equal(info["q"], torch.arange(240)) and torch.equal(out, codes)
    # mixed radix, first channel least significant (as in the paper and vector-quantize-pytorch)
    assert torch.equal(info["q"][:3], torch.arange(3)) and torch.equal(codes[1] - codes[0], torch.tensor([0.25, 0, 0]))


def test_fsq_straight_through_gradient():
    torch.manual_seed(1)
    levels = torch.tensor([7.0, 4.0])
    fsq = FiniteScalarQuant(2, (7, 4))
    z = torch.randn(64, 2, requires_grad=True)
    out, _ = fsq(z)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # d code / d z = bound'(z) / (L // 2), bound'(z) = half_l * (1 - tanh^2(z + shift)), rounding passed straight
    half_l = (levels - 1) * 1.001 / 2
    shift = torch.atanh(torch.tensor([0.0, 0.5]) / half_l)
    expected = g * half_l * (1 - torch.tanh(z.detach() + shift) ** 2) / (levels // 2)
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_fsq_levels_follow_num_codes():
    assert fsq_levels(128) == (8, 4, 4) and fsq_levels(512) == (8, 8, 8) and fsq_levels(1024) == (8, 8, 4, 4)
    assert fsq_levels(1000) == (8, 5, 5, 5) and fsq_levels(64000) == (8, 8, 8, 5, 5, 5)  # the paper's sets
    for k in (128, 512, 1000, 4375, 15360):
        assert math.prod(fsq_levels(k)) == k
    with pytest.raises(ValueError, match="pass the levels"):
        fsq_levels(127)


# ---- LFQ -----------------------------------------------------------------------------------------
def test_lfq_codes_are_sign_patterns_and_index_is_the_bit_pattern():
    torch.manual_seed(2)
    lfq = LookupFreeQuant(5, 32, dim=1)
    z = torch.randn(4, 5, 6, 6)
    out, info = lfq(z)
    assert torch.equal(out, torch.where(z > 0, 1.0, -1.0))
    bits = (z > 0).long().movedim(1, -1)  # (4, 6, 6, 5), first channel = most significant bit
    assert torch.equal(info["q"], (bits * torch.tensor([16, 8, 4, 2, 1])).sum(-1))
    assert lfq.get_codebook().abs().eq(1).all() and len(torch.unique(lfq.get_codebook(), dim=0)) == 32


def _direct_entropies(z, codes, tau):
    """p(k | z) = softmax(-||z - c_k||^2 / tau) from explicit distances; entropies in float64."""
    d2 = torch.stack([((z - c) ** 2).sum(-1) for c in codes], -1).double()  # (N, K)
    p = torch.softmax(-d2 / tau, -1)
    per_sample = -(p * p.log()).sum(-1).mean()
    mean_p = p.mean(0)
    return per_sample, -(mean_p * mean_p.log()).sum()


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_lfq_entropy_terms_match_direct_computation(tau):
    torch.manual_seed(3)
    lfq = LookupFreeQuant(4, 16, beta=0.75, temperature=tau, sample_entropy_weight=0.3, codebook_entropy_weight=0.2)
    z = torch.randn(50, 4) * 0.7
    _, info = lfq(z)
    sample, codebook = _direct_entropies(z, lfq.get_codebook(), tau)
    assert torch.allclose(info["sample_entropy"].double(), sample, rtol=1e-5)
    assert torch.allclose(info["codebook_entropy"].double(), codebook, rtol=1e-5)
    commitment = ((z - torch.where(z > 0, 1.0, -1.0)) ** 2).mean()
    assert torch.allclose(info["loss"].double(), 0.25 * commitment + 0.3 * sample - 0.2 * codebook, rtol=1e-5)
    assert 0 < sample < codebook <= math.log(16)


def test_lfq_gradients_stay_finite_when_codes_get_no_probability():
    torch.manual_seed(4)
    lfq = LookupFreeQuant(7, 128, dim=1)  # tau = 0.01: most codes get exactly 0 probability
    z = torch.randn(2, 7, 4, 4, requires_grad=True)
    out, info = lfq(z)
    (out.sum() + info["loss"]).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---- rotation trick ------------------------------------------------------------------------------
@pytest.mark.parametrize("nu", [0.0, 0.5])
def test_rotation_trick_forward_is_z_q_and_backward_is_the_closed_form_rotation(nu):
    torch.manual_seed(5)
    vq = VectorQuant(6, 10, rotation_trick=True, sync_nu=nu)
    z = torch.randn(40, 6, requires_grad=True)
    out, info = vq(z)
    assert torch.equal(out, vq.get_codebook().detach()[info["q"]])  # exactly z_q, not just close
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # closed form in float64 with explicit d x d matrices: R = I - 2 r r^T + 2 q e^T, grad = lambda R^T g
    zd, zq = z.detach().double(), info["z_q"].detach().double()
    e, q = F.normalize(zd, dim=-1), F.normalize(zq, dim=-1)
    r = F.normalize(e + q, dim=-1)
    eye = torch.eye(6, dtype=torch.float64)
    rot = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * q[:, :, None] * e[:, None, :]  # (N, 6, 6)
    assert torch.allclose(rot @ e[..., None], q[..., None], atol=1e-12)  # R takes e onto q ...
    assert torch.allclose(rot.transpose(1, 2) @ rot, eye.expand(40, 6, 6), atol=1e-12)  # ... and is a rotation
    lam = zq.norm(dim=-1) / zd.norm(dim=-1)
    expected = lam[:, None] * (rot.transpose(1, 2) @ g.double()[..., None])[..., 0]
    assert torch.allclose(z.grad.double(), expected, atol=1e-5)
    assert not torch.allclose(z.grad, g, atol=1e-3)  # it is not the STE
    # the codes' task gradient is the synchronized STE's, unchanged by the rotation
    sync = torch.zeros(10, 6).index_add_(0, info["q"], g) * nu
    grad = vq.codebook.weight.grad
    assert grad is None if nu == 0 else torch.allclose(grad, sync, atol=1e-6)


def test_rotation_trick_on_the_residual_sum():
    torch.manual_seed(6)
    vq = ResidualVectorQuant(4, 8, groups=2, rotation_trick=True)
    z = torch.randn(30, 4, requires_grad=True)
    out, info = vq(z)
    assert torch.allclose(out, info["z_q"].detach(), atol=1e-6) and torch.allclose(vq.decode(info["q"]), out, atol=1e-6)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(z.grad).all()


# ---- SimVQ ---------------------------------------------------------------------------------------
def test_simvq_codes_follow_the_linear_map():
    torch.manual_seed(7)
    vq = SimVQ(6, 20, dim=1)
    basis = vq.codebook.weight.detach().clone()
    assert torch.equal(vq.get_codebook(), basis)  # W = I at start: the plain VQ codebook
    with torch.no_grad():
        vq.code_map.weight.copy_(torch.randn(6, 6))
    c = vq.get_codebook().detach()
    assert torch.allclose(c, basis @ vq.code_map.weight.detach().t(), atol=1e-6)
    vq.eval()
    z = torch.randn(3, 6, 4, 4)
    out, info = vq(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.equal(info["q"].reshape(-1), torch.cdist(zf, c).argmin(1))
    assert torch.equal(out, c[info["q"]].permute(0, 3, 1, 2)) and torch.equal(vq.decode(info["q"]), out)


def test_simvq_basis_stays_frozen_and_unassigned_codes_still_move():
    torch.manual_seed(8)
    vq = SimVQ(8, 64, sync_nu=0.5)
    basis = vq.codebook.weight.detach().clone()
    opt = torch.optim.AdamW(vq.parameters(), lr=1e-2, weight_decay=0.1)
    before, used = vq.get_codebook().detach().clone(), set()
    for _ in range(10):
        z = torch.randn(4, 8) * 0.1 + 2.0  # few vectors, far away: most codes are never assigned
        out, info = vq(z)
        used |= set(info["q"].tolist())
        opt.zero_grad()
        (info["loss"] + out.square().mean()).backward()
        opt.step()
    assert not vq.codebook.weight.requires_grad and vq.codebook.weight.grad is None
    assert torch.equal(vq.codebook.weight, basis)
    unused = sorted(set(range(64)) - used)
    assert len(unused) > 40
    assert ((vq.get_codebook().detach() - before)[unused].norm(dim=1) > 1e-3).all()


# ---- the shared contract, the config and the presets ---------------------------------------------
def _variant(name, num_codes=128, code_dim=16):
    return VQConfig(num_codes=num_codes, code_dim=code_dim, **VQ_VARIANTS[name])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("num_codes,code_dim", [(128, 16), (512, 16), (64, 6)])
def test_contract_and_decode_equals_z_q(name, num_codes, code_dim):
    torch.manual_seed(9)
    vq = build_quantizer(_variant(name, num_codes, code_dim))  # features on dim 1
    assert vq.num_codes == num_codes  # the implicit codebooks have exactly the configured size
    z = torch.randn(3, code_dim, 4, 4, requires_grad=True)
    out, info = vq(z)
    assert out.shape == z.shape and info["q"].shape == (3, 4, 4) and int(info["q"].max()) < num_codes
    for key in ("loss", "quant_error", "perplexity", "codes_used"):
        assert info[key].dim() == 0 and torch.isfinite(info[key]), key
    assert info["z"].shape == info["z_q"].shape and info["d"].shape == (3, 4, 4)
    (out.square().sum() + info["loss"]).backward()
    assert z.grad.abs().sum() > 0
    vq.eval()
    with torch.no_grad():
        out, info = vq(z)
        assert torch.allclose(vq.decode(info["q"]), out, atol=1e-6)


@pytest.mark.parametrize("opts,match", [
    (dict(kind="fsq", inplace_lr=50.0), "vq.inplace_lr"),
    (dict(kind="fsq", kmeans_init=True, norm="l2"), "set vq.kmeans_init=false vq.norm=none"),
    (dict(kind="fsq", num_codes=128, levels=(8, 8, 8)), "set vq.num_codes=512"),
    (dict(kind="fsq", num_codes=16, levels=(8, 2)), ">= 3"),
    (dict(kind="fsq", num_codes=127), "pass the levels"),
    (dict(kind="lfq", num_codes=100), "2\\^bits"),
    (dict(kind="lfq", rotation_trick=True), "vq.rotation_trick"),
    (dict(kind="simvq", replace_freq=20), "frozen basis"),
    (dict(kind="vector", levels=(8, 4, 4)), "vq.levels"),
    (dict(kind="lfq", entropy_temperature=0.0), "entropy_temperature"),
])
def test_config_refuses_options_a_kind_does_not_use(opts, match):
    with pytest.raises(ValueError, match=match):
        VQConfig(**opts)


# ---- the CLI: train_tokenizer.py with each family, pretokenize.py on one ---------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_train_tokenizer_with_each_family(name, tmp_path):
    run = tmp_path / "tok"
    run_script(ROOT / "train_tokenizer.py", "--preset", "tiny", "--run-dir", run, "optim.steps=1",
               "data.num_images=32", "optim.batch_size=4", "log.val_batches=1", *variant_overrides(name))
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["num_codes"] == 128 and 0 < metrics["codes_used"] <= 1
    model, cfg = load_tokenizer(run / "checkpoint.pt")
    assert cfg.vq.kind == VQ_VARIANTS[name].get("kind", "vector")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, q, _ = model.encode(x)
        assert torch.allclose(model.decode_indices(q), model.decode(z_q), atol=1e-5)
    if name == "fsq":  # MaskGIT's code files from an implicit codebook
        codes = tmp_path / "codes"
        run_script(ROOT / "pretokenize.py", "--tokenizer", run / "checkpoint.pt", "--out", codes, "--splits", "val")
        header = json.loads((codes / "codes.json").read_text())
        assert header["num_codes"] == 128


# ---- exact agreement with vector-quantize-pytorch where the definitions coincide -----------------
@pytest.mark.parametrize("levels,feature_size", [((8, 5, 5, 5), 4), ((8, 6, 5), 3), ((8, 4, 4), 16)])
def test_fsq_agrees_with_vector_quantize_pytorch(levels, feature_size):
    peer_module = pytest.importorskip("vector_quantize_pytorch", reason="the peer is a bench extra (pip install .[bench])")
    torch.manual_seed(10)
    ours = FiniteScalarQuant(feature_size, levels)
    peer = peer_module.FSQ(levels=list(levels), dim=feature_size)
    if feature_size != len(levels):  # same projections: copy ours into the peer
        peer.load_state_dict(ours.state_dict())
    z = torch.randn(2, 100, feature_size) * 2
    out, info = ours(z)
    peer_out, peer_q = peer(z)
    assert torch.equal(info["q"], peer_q.long())  # identical indices (same bound, same index order)
    if feature_size == len(levels):
        assert torch.equal(out, peer_out)  # identical grid points, bit for bit
    else:
        assert torch.allclose(out, peer_out, atol=1e-6)
    assert torch.allclose(ours.decode(info["q"]), peer.indices_to_codes(peer_q), atol=1e-6)


def test_lfq_agrees_with_vector_quantize_pytorch():
    peer_module = pytest.importorskip("vector_quantize_pytorch", reason="the peer is a bench extra (pip install .[bench])")
    torch.manual_seed(11)
    # tau = 1 and small inputs: no probability falls below the peer's 1e-5 clamp inside its log, so the
    # entropies are defined identically (ours are exact everywhere)
    ours = LookupFreeQuant(5, 32, beta=0.75, temperature=1.0, sample_entropy_weight=0.1, codebook_entropy_weight=0.1)
    peer = peer_module.LFQ(dim=5, codebook_size=32, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                           diversity_gamma=1.0)
    z = torch.randn(2, 60, 5) * 0.3
    out, info = ours(z)
    (peer_out, peer_q, peer_loss), breakdown = peer.train()(z, inv_temperature=1.0, return_loss_breakdown=True)
    assert torch.equal(info["q"], peer_q.long())
    assert torch.allclose(out, peer_out, atol=1e-6)  # the peer's STE form z + sg(c - z) rounds in the last bit
    assert torch.allclose(info["sample_entropy"], breakdown.per_sample_entropy, rtol=1e-5)
    assert torch.allclose(info["codebook_entropy"], breakdown.batch_entropy, rtol=1e-5)
    assert torch.allclose(info["loss"], peer_loss, rtol=1e-5)
    assert torch.equal(ours.decode(info["q"]), peer.indices_to_codes(peer_q))


KIND_OPTIONS = {"vector": {}, "group": dict(kind="group", groups=2), "residual": dict(kind="residual", groups=2),
                "fsq": dict(kind="fsq"), "lfq": dict(kind="lfq"), "simvq": dict(kind="simvq")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(KIND_OPTIONS))
def test_low_precision_keeps_fp32_distances_assignments_and_statistics(kind, dtype):
    """Under autocast with a low-precision input, every quantizer kind assigns exactly the codes that fp32
    assigns to the same input, and its distances, loss, entropy terms and codebook statistics are fp32;
    only the output takes the input's dtype."""
    torch.manual_seed(0)
    vq = build_quantizer(VQConfig(num_codes=128, code_dim=16, **KIND_OPTIONS[kind]))
    z = torch.randn(4, 16, 6, 6).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out, info = vq(z)
    _, ref = vq(z.float())
    assert out.dtype == dtype and torch.equal(info["q"], ref["q"])
    for key in ("d", "loss", "quant_error", "perplexity", "codes_used", "sample_entropy", "codebook_entropy",
                "entropy_loss"):
        if key in info:
            assert info[key].dtype == torch.float32, key
            assert torch.allclose(info[key], ref[key]), key
