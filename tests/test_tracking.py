"""Opt-in trackers (log.tracker): TensorBoard receives the logged scalars and the image grids; log.jsonl stays."""
import importlib.util
import json

import pytest
from conftest import ROOT, SMOKE, run_script
from PIL import Image

from core.config import ConfigError
from training.tracking import accelerator_kwargs


def events(run_dir, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tracker" / name), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_scalars_and_images(tiny_runs, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[track]')")
    tok = tmp_path / "tok"
    run_script(ROOT / "train_tokenizer.py", *SMOKE, "--run-dir", tok, "optim.steps=2", "log.log_every=1",
               "log.tracker=tensorboard")
    acc = events(tok, "tokenizer")
    assert {"loss", "perplexity", "val/psnr", "time/wall_seconds"} <= set(acc.Tags()["scalars"])
    assert "val/wall_seconds" not in acc.Tags()["scalars"]  # the run's time is not a validation metric
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    jsonl = [json.loads(line) for line in (tok / "log.jsonl").read_text().splitlines()]
    assert [round(e.value, 4) for e in acc.Scalars("loss")] == [round(r["loss"], 4) for r in jsonl]  # the same numbers
    (image,) = acc.Images("reconstructions")
    assert image.step == 2 and (image.width, image.height) == Image.open(tok / "recon_latest.png").size  # the same grid
    mg = tmp_path / "mg"
    run_script(ROOT / "train_maskgit.py", "--run-dir", mg, "--codes", tiny_runs["codes"], "--tokenizer",
               tiny_runs["tokenizer"], "optim.steps=1", "optim.batch_size=8", "model.dim=32", "model.depth=1",
               "model.heads=2", "log.tracker=tensorboard")
    acc = events(mg, "maskgit")
    assert {"loss", "masked_accuracy", "lr"} <= set(acc.Tags()["scalars"])
    (image,) = acc.Images("samples")
    assert image.step == 1 and (image.width, image.height) == Image.open(mg / "samples_latest.png").size > (4 * 32, 4 * 32)


def test_trackers_are_opt_in(tmp_path):
    assert accelerator_kwargs("none", tmp_path) == {}  # the default needs no tracker package
    for name in ("wandb", "aim"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"needs the {name} package"):
                accelerator_kwargs(name, tmp_path)
    from training.config import LogConfig
    with pytest.raises(ConfigError, match="log.tracker must be"):
        LogConfig(tracker="mlflow")


def test_final_metrics_go_under_val_and_the_wall_time_under_time():
    """No tracker package needed: an object with Accelerate's ``log`` signature records what would be sent."""
    from training.tracking import log_final

    class Recorder:
        def log(self, values, step):
            self.values, self.step = values, step

    rec = Recorder()
    log_final(rec, "tensorboard", {"step": 7, "weights": "ema", "psnr": 21.5, "wall_seconds": 12.3}, 7)
    assert rec.values == {"val/psnr": 21.5, "time/wall_seconds": 12.3} and rec.step == 7
    log_final(rec, "none", {"psnr": 1.0}, 8)
    assert rec.step == 7  # tracker none sends nothing
