"""Tokenizer losses: reconstruction values, LPIPS (random local weights), PatchGAN hinge loss and the
VQGAN adaptive weight, checked against direct computations on tiny examples."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg16

from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import LossConfig, TokenizerLoss, adaptive_weight
from tokenizer.lpips import CHANNELS, LPIPS, MissingWeightsError


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random stand-ins for vgg16-397923af.pth and lpips' vgg.pth, with the real keys and shapes."""
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {f"features.{k}": v.shape for k, v in vgg16(weights=None).features.state_dict().items()}
    vgg_state = {k: torch.randn(s, generator=gen) * (2.0 / s[1:].numel()) ** 0.5 if k.endswith("weight")
                 else 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}  # He init: lively features
    lin_state = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(CHANNELS)}
    root = tmp_path_factory.mktemp("lpips")
    torch.save(vgg_state, root / "vgg16-397923af.pth")
    torch.save(lin_state, root / "vgg.pth")
    return str(root / "vgg16-397923af.pth"), str(root / "vgg.pth")


@pytest.fixture(scope="module")
def lpips_net(lpips_files):
    return LPIPS(*lpips_files)


class TinyAutoencoder(nn.Module):
    """x_rec = dec(enc(x)): ``enc`` stands for the encoder, ``dec.weight`` for the decoder's last layer."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 3, 1, bias=False)

    def forward(self, x):
        h = self.enc(x)
        return self.dec(h), h


def images(b=2, side=32, seed=0):
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("bad, match", [
    (dict(recon="huber"), "recon"), (dict(recon_weight=-1.0), "recon_weight"), (dict(vq_weight=-0.5), "vq_weight"),
    (dict(perceptual_weight=float("nan")), "perceptual_weight"), (dict(adversarial_weight=-1e-3), "adversarial_weight"),
    (dict(adversarial_start=-1), "adversarial_start"), (dict(disc_layers=0), "disc_layers"),
    (dict(disc_channels=2.5), "disc_channels"), (dict(disc_norm="layer"), "disc_norm")])
def test_config_rejects_bad_values(bad, match):
    from core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):  # types checked by from_dict, ranges by __post_init__
        from_dict(LossConfig, bad, prefix="loss.")


@pytest.mark.parametrize("recon", ["l1", "l2"])
def test_reconstruction_and_vq_terms_match_direct_computation(recon):
    x, x_rec, vq = images(seed=0), images(seed=1), torch.tensor(0.37)
    loss_fn = TokenizerLoss(LossConfig(recon=recon, recon_weight=2.0, vq_weight=5.0))
    assert loss_fn.lpips is None and loss_fn.discriminator is None
    total, logs = loss_fn.generator_loss(x, x_rec, vq, step=0, last_layer=None)
    direct = (x - x_rec).abs().mean() if recon == "l1" else (x - x_rec).pow(2).mean()
    assert logs["recon"] == pytest.approx(direct.item(), rel=1e-6)
    assert total.item() == pytest.approx(2.0 * direct.item() + 5.0 * 0.37, rel=1e-6)
    assert logs["vq"] == pytest.approx(0.37) and logs["gan"] == 0.0 and logs["perceptual"] == 0.0
    assert all(isinstance(v, float) for v in logs.values())


@pytest.mark.parametrize("term", ["recon", "vq", "perceptual", "adversarial"])
def test_each_enabled_term_reaches_the_encoder(term, lpips_files):
    """Gradient of the total loss minus that without the term: finite and non-zero on the encoder."""
    vgg, lin = lpips_files
    weights = dict(recon=dict(recon_weight=1.0), vq=dict(vq_weight=1.0),
                   perceptual=dict(recon_weight=0.0, perceptual_weight=1.0),
                   adversarial=dict(adversarial_weight=0.5, disc_channels=8))[term]
    weights = {"vq_weight": 0.0, **weights}
    torch.manual_seed(0)
    model, x = TinyAutoencoder(), images(side=24)

    def encoder_grad(cfg):
        torch.manual_seed(1)  # same discriminator init in both runs
        loss_fn = TokenizerLoss(cfg)
        x_rec, h = model(x)
        total, logs = loss_fn.generator_loss(x, x_rec, h.pow(2).mean(), step=0, last_layer=model.dec.weight)
        assert torch.isfinite(total) and all(v == v for v in logs.values())
        return torch.autograd.grad(total, model.enc.weight)[0]

    with_term = encoder_grad(LossConfig(lpips_vgg_path=vgg, lpips_lin_path=lin, **weights))
    without = encoder_grad(LossConfig(**{**weights, f"{term}_weight": 0.0}))
    assert torch.isfinite(with_term).all() and (with_term - without).abs().max() > 1e-8


def tiny_gan_example(scale=1.0, d_weight=(0.3, -0.2, 0.5)):
    """x_rec = W h with last_layer W; a linear 'discriminator' D(y) = v . y per pixel, so grads are by hand."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 4, 5, 5, generator=gen)
    x = scale * torch.randn(2, 3, 5, 5, generator=gen)
    W = nn.Parameter(torch.randn(3, 4, 1, 1, generator=gen))
    v = torch.tensor(d_weight).view(1, 3, 1, 1)
    r = torch.einsum("oi,bihw->bohw", W[:, :, 0, 0], h) - x  # residual x_rec - x
    n, npix = r.numel(), r.numel() // 3
    g_rec = torch.einsum("bohw,bihw->oi", torch.sign(r), h) / n  # d mean|r| / dW
    g_gan = -v.view(3, 1) * h.sum(dim=(0, 2, 3)).view(1, 4) / npix  # d (-mean D(W h)) / dW
    return h, x, W, v, g_rec.view_as(W), g_gan.view_as(W)


def linear_discriminator(v):
    disc = nn.Conv2d(3, 1, 1, bias=False)
    disc.weight.data.copy_(v)
    return disc


def test_adaptive_weight_matches_hand_formula_and_is_detached():
    h, x, W, v, g_rec, g_gan = tiny_gan_example()
    loss_fn = TokenizerLoss(LossConfig(recon_weight=2.0, adversarial_weight=0.8, vq_weight=0.0))
    loss_fn.discriminator = linear_discriminator(v)
    x_rec = F.conv2d(h, W)
    total, logs = loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), step=0, last_layer=W)
    expected = (2.0 * g_rec.norm() / (g_gan.norm() + 1e-4)).item()  # L_rec = recon_weight * L1
    assert logs["adaptive_weight"] == pytest.approx(expected, rel=1e-5)
    assert logs["gan"] == pytest.approx(-(v * x_rec).sum(1).mean().item(), rel=1e-5)
    # Detached: the total's gradient is 2 g_rec + weight * 0.8 * g_gan, with no term through the weight.
    grad = torch.autograd.grad(total, W)[0]
    torch.testing.assert_close(grad, 2.0 * g_rec + expected * 0.8 * g_gan, rtol=1e-5, atol=1e-7)


def test_adaptive_weight_is_clamped():
    h, x, W, v, g_rec, _ = tiny_gan_example(d_weight=(0.0, 0.0, 0.0))  # no GAN gradient: ratio ||g_rec|| / 1e-4
    rec = 10.0 * F.l1_loss(F.conv2d(h, W), x)
    gan = -F.conv2d(F.conv2d(h, W), v).mean()
    assert 10.0 * g_rec.norm() / 1e-4 > 1e4
    assert adaptive_weight(rec, gan, W).item() == 1e4
    assert adaptive_weight(rec, gan, W, max_weight=50.0).item() == 50.0


def test_generator_gan_term_waits_for_start_and_needs_last_layer():
    x, x_rec = images(side=24), images(side=24, seed=1).requires_grad_(True)
    loss_fn = TokenizerLoss(LossConfig(adversarial_weight=1.0, adversarial_start=10))
    before, logs = loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), step=9, last_layer=None)
    assert logs["gan"] == 0.0 and logs["adaptive_weight"] == 0.0
    assert before.item() == pytest.approx(logs["recon"])
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), step=10, last_layer=None)
    with torch.no_grad():  # evaluation: no adaptive weight, the GAN value is still logged
        _, logs = loss_fn.generator_loss(x, x_rec, torch.tensor(0.0), step=10, last_layer=None)
    assert logs["adaptive_weight"] == 0.0 and logs["gan"] != 0.0


def test_discriminator_hinge_loss_and_start_step():
    torch.manual_seed(0)
    model, x = TinyAutoencoder(), images(side=24)
    loss_fn = TokenizerLoss(LossConfig(adversarial_weight=1.0, adversarial_start=5, disc_layers=2, disc_channels=8))
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    x_rec, _ = model(x)
    zero, logs = loss_fn.discriminator_loss(x, x_rec, step=4)
    assert zero.item() == 0.0 and not zero.requires_grad and not calls and logs["disc_loss"] == 0.0
    loss, logs = loss_fn.discriminator_loss(x, x_rec, step=5)
    with torch.no_grad():
        d_real, d_fake = loss_fn.discriminator(x), loss_fn.discriminator(x_rec)
    expected = 0.5 * (torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean())  # taming's factor 0.5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and logs["disc_loss"] == pytest.approx(loss.item())
    loss.backward()
    assert model.enc.weight.grad is None  # x_rec is detached: only the discriminator learns from this loss
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss_fn.discriminator.parameters())
    no_gan = TokenizerLoss(LossConfig())
    assert no_gan.discriminator_loss(x, x_rec, step=100)[0].item() == 0.0


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_patch_discriminator_shape_and_init(norm):
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=16, n_layers=3, norm=norm)
    assert disc(images(b=2, side=64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 1]
    assert all(abs(c.weight.std().item() - 0.02) < 0.003 for c in convs)  # N(0, 0.02) init
    assert all(c.bias is None or not c.bias.any() for c in convs)
    if norm == "group":  # per-sample normalization: no buffers for DDP, no dependence on the batch
        assert not list(disc.buffers())
        x = images(b=3, side=24)
        torch.testing.assert_close(disc(x)[:1], disc(x[:1]))
    with pytest.raises(ValueError, match="H, W >= 24"):
        disc(images(b=1, side=16))


def test_lpips_identity_symmetry_and_gradients(lpips_net):
    x, y = images(side=16, seed=0).requires_grad_(True), images(side=16, seed=1)
    dist = lpips_net(torch.cat([x, x, y]), torch.cat([x, y, x]))  # one pass: d(x, x), d(x, y), d(y, x)
    d_xx, d_xy, d_yx = dist.chunk(3)
    assert d_xx.abs().max().item() == 0.0
    assert d_xy.shape == (2,) and (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)
    with pytest.raises(ValueError, match="H, W >= 16"):
        lpips_net(x[..., :8, :8], y[..., :8, :8])
    d_xy.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_net.parameters())
    lpips_net.train()
    assert not lpips_net.training


def test_lpips_matches_the_lpips_recipe(lpips_net, lpips_files):
    """Independent walk through torchvision's vgg16().features with the lpips v0.1 formulas."""
    vgg_state = torch.load(lpips_files[0], weights_only=True)
    lin_state = torch.load(lpips_files[1], weights_only=True)
    with torch.device("meta"):
        features = vgg16(weights=None).features
    features.load_state_dict({k[9:]: v for k, v in vgg_state.items()}, assign=True)
    x, y = images(seed=2), images(seed=3)
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)  # lpips' ScalingLayer
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.zeros(2)
        hx, hy, k = (x - shift) / scale, (y - shift) / scale, 0
        for i, layer in enumerate(features):
            hx, hy = layer(hx), layer(hy)
            if i in (3, 8, 15, 22, 29):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                expected += F.conv2d((nx - ny) ** 2, lin_state[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
                k += 1
        torch.testing.assert_close(lpips_net(x, y), expected, rtol=1e-4, atol=1e-6)


def test_lpips_weights_stay_out_of_checkpoints(lpips_files):
    vgg, lin = lpips_files
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=1.0, adversarial_weight=1.0,
                                       lpips_vgg_path=vgg, lpips_lin_path=lin))
    state = loss_fn.state_dict()
    assert state and all(k.startswith("discriminator.") for k in state)
    before = loss_fn.lpips.lins[0].weight.clone()
    loss_fn.load_state_dict(state, strict=True)
    torch.testing.assert_close(loss_fn.lpips.lins[0].weight, before)


def test_lpips_missing_or_wrong_files_give_clear_errors(lpips_files, tmp_path, monkeypatch):
    vgg, lin = lpips_files
    monkeypatch.delenv("LPIPS_VGG_WEIGHTS", raising=False)
    monkeypatch.delenv("LPIPS_LIN_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth") as err:
        TokenizerLoss(LossConfig(perceptual_weight=1.0))
    assert isinstance(err.value, FileNotFoundError) and len(str(err.value).splitlines()) <= 2
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in str(err.value)
    assert "LPIPS_VGG_WEIGHTS" in str(err.value) and "lpips_vgg_path" in str(err.value)
    with pytest.raises(MissingWeightsError, match="lpips/weights/v0.1/vgg.pth") as err:
        LPIPS(vgg, tmp_path / "nowhere.pth")
    assert "LPIPS_LIN_WEIGHTS" in str(err.value) and str(tmp_path / "nowhere.pth") in str(err.value)
    monkeypatch.setenv("LPIPS_VGG_WEIGHTS", vgg)  # env vars are the fallback for missing arguments
    monkeypatch.setenv("LPIPS_LIN_WEIGHTS", lin)
    assert isinstance(LPIPS(), LPIPS)
    bad = torch.load(lin, weights_only=True)
    bad["lin2.model.1.weight"] = -bad["lin2.model.1.weight"]
    torch.save(bad, tmp_path / "negative.pth")
    with pytest.raises(ValueError, match="negative"):
        LPIPS(vgg, tmp_path / "negative.pth")
    bad["lin2.model.1.weight"] = -bad["lin2.model.1.weight"]
    del bad["lin4.model.1.weight"]
    torch.save(bad, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin4.model.1.weight"):
        LPIPS(vgg, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        LPIPS(lin, lin)


def test_unscaled_part_of_the_vq_loss_is_not_multiplied_by_vq_weight():
    """LFQ's entropy terms carry their own weights (0.1 / 0.1): the tokenizer adds them as they are and
    scales only the rest of the quantizer's loss by vq_weight."""
    torch.manual_seed(0)
    loss_fn = TokenizerLoss(LossConfig(vq_weight=5.0))
    x, x_rec = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    commit, entropy = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.7, requires_grad=True)
    total, _ = loss_fn.generator_loss(x, x_rec, commit + entropy, step=0, last_layer=None, vq_unscaled=entropy)
    total.backward()
    assert torch.isclose(total, F.l1_loss(x_rec, x) + 5.0 * 0.3 - 0.7)
    assert commit.grad == 5.0 and entropy.grad == 1.0
