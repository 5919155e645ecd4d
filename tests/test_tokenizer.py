"""The VQGAN-style tokenizer and train_tokenizer.py on tiny CPU settings."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenizer import PRESETS, VQConfig, VQModel, load_tokenizer, preset
from tokenizer.config import ALL_FIXES
from tokenizer.losses import LossConfig, TokenizerLoss

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_and_downsampling(name):
    cfg = preset(name)
    model = VQModel(cfg).eval()
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1
    with torch.no_grad():
        z_q, q, info = model.encode(x)
        x_rec = model.decode(z_q)
    h, w = cfg.grid
    assert cfg.resolution // h == cfg.downsample == 2 ** (len(cfg.channel_mult) - 1)
    assert z_q.shape == (2, cfg.vq.code_dim, h, w) and q.shape == (2, h, w) and x_rec.shape == x.shape
    assert q.max() < cfg.vq.num_codes
    assert torch.allclose(model.decode_indices(q), x_rec, atol=1e-5)


@pytest.mark.parametrize("kind", ["vector", "group", "residual"])
def test_decode_indices_matches_decode_for_every_quantizer_kind(kind):
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.vq = VQConfig(num_codes=cfg.vq.num_codes, code_dim=cfg.vq.code_dim, **ALL_FIXES)  # every part of the layer
    cfg.vq.kind, cfg.vq.groups, cfg.vq.share = kind, (1 if kind == "vector" else 2), False
    if kind == "residual":
        cfg.vq.cb_norm = None  # the residual layer refuses unit-norm codes
    model = VQModel(cfg)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.train()(x)  # k-means init and one in-place step change the codebook
    model.eval()
    with torch.no_grad():
        z_q, q, _ = model.encode(x)
        assert torch.allclose(model.decode_indices(q), model.decode(z_q), atol=1e-5)


@pytest.mark.parametrize("recon", ["l1", "l2"])
def test_losses_are_finite_and_reach_the_encoder(recon):
    torch.manual_seed(1)
    model = VQModel(preset("tiny"))
    loss_fn = TokenizerLoss(LossConfig(recon=recon, adversarial_weight=0.5, disc_channels=8, disc_layers=2))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x_rec, info = model(x)
    loss, logs = loss_fn.generator_loss(x, x_rec, info["loss"], step=10, last_layer=model.last_layer)
    assert torch.isfinite(loss) and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    loss.backward()
    first_conv = model.encoder.net[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    d_loss, _ = loss_fn.discriminator_loss(x, x_rec.detach(), step=10)
    assert torch.isfinite(d_loss)


def test_wrong_image_size_is_a_clear_error():
    model = VQModel(preset("tiny"))
    with pytest.raises(ValueError, match="expects images of shape"):
        model.encode(torch.zeros(1, 3, 64, 64))


def _train(run_dir, *overrides, resume=False):
    cmd = [sys.executable, str(ROOT / "train_tokenizer.py"), "--preset", "tiny", "--run-dir", str(run_dir),
           "data.num_images=64", "optim.batch_size=8", "log.log_every=1", "log.val_batches=1", *overrides]
    if resume:
        cmd.insert(2, "--resume")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_train_tokenizer_runs_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "tok"
    out = _train(run, "optim.steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("checkpoint.pt", "config.json", "data.json", "log.jsonl", "recon_latest.png", "final_metrics.json",
                 "codebook_usage.png"):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["step"] == 2 and 0 < metrics["codes_used"] <= 1
    # PSNR is MSE's on images in [0, 1], and beats 6.02 dB (MSE 0.25), the floor a mid-grey guess never crosses
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1 / metrics["mse"])) and metrics["psnr"] > 6.03
    model, cfg = load_tokenizer(run / "checkpoint.pt")
    assert cfg.resolution == 32 and not model.training

    out = _train(run, "optim.steps=3", resume=True)
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # continued from step 2, did not start over
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3


def test_train_tokenizer_bad_inputs_fail_fast_with_one_line(tmp_path):
    out = _train(tmp_path / "a", "optim.steps=1", "model.vq.betaa=0.5")
    assert out.returncode == 2 and "unknown config key" in out.stderr and "Traceback" not in out.stderr
    out = _train(tmp_path / "b", "optim.steps=1", f"data.source={tmp_path / 'missing'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = _train(tmp_path / "c", "optim.steps=1", "optim.batch_size=two")
    assert out.returncode == 2 and "expected an integer" in out.stderr
