"""Shared fixtures: a tiny tokenizer + code files + MaskGIT, trained for a few steps on CPU, once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Headless Chromium as the browser tests launch it (the system's, e.g. Debian's `chromium` package).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the named preset the tests train with (3 steps, 64 images, a 1-block MaskGIT: tokenizer/train_config.py and
# transformer/config.py); a test that needs more steps says so with an optim.steps override
SMOKE = ["--preset", "smoke"]


def chromium() -> str:
    """The system Chromium's path; skips the calling test when there is none (Playwright's own download is never used)."""
    import shutil

    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium browser (Debian: apt-get install chromium)")


def run_script(*args, check=True, timeout=300):
    """Run one of the project's entry points in a subprocess (as a user would)."""
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine thread contention
    makes their tests several times slower. The scripts a test starts run at one thread too
    (OMP_NUM_THREADS), so a result computed in this process and one computed by a script sum their
    matmuls in the same order. Both restored afterwards."""
    import torch

    n, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Paths of a 2-step tokenizer, its code files and a 3-step MaskGIT (attribute-conditional, trained with
    the arccos schedule and 5 sample steps, so a sampler that ignores the stored settings shows)."""
    root = tmp_path_factory.mktemp("tiny_runs")
    tok, codes, mg = root / "tok", root / "codes", root / "mg"
    run_script(ROOT / "train_tokenizer.py", "--preset", "smoke", "--run-dir", tok, "optim.steps=2")
    run_script(ROOT / "pretokenize.py", "--tokenizer", tok / "checkpoint.pt", "--out", codes, "--batch-size", "16")
    run_script(ROOT / "train_maskgit.py", "--preset", "smoke", "--run-dir", mg, "--codes", codes,
               "--tokenizer", tok / "checkpoint.pt", "log.log_every=1", "masking.condition=attrs",
               "masking.schedule=arccos", "masking.sample_steps=5")
    return {"tokenizer": tok / "checkpoint.pt", "tok_dir": tok, "codes": codes, "maskgit": mg / "checkpoint.pt", "mg_dir": mg}


@pytest.fixture
def entry(monkeypatch, capsys):
    """entry(script, *argv) -> (exit status, stderr) of ``python script.py argv``, run in-process under the
    guard the script runs under (``core.errors.guarded``); ``entry("eval", ...)`` is ``python -m eval``.
    Signal handlers a training script installs are restored afterwards."""
    import importlib
    import signal

    from core.errors import guarded

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def run(script, *argv):
        if script == "eval":
            code = importlib.import_module("eval.__main__").main([str(a) for a in argv])
        else:
            monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
            code = guarded(importlib.import_module(script).main)
        return code, capsys.readouterr().err
    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
