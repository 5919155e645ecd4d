"""Faults, round three: flipped bytes in checkpoints and exports, two writers in one run directory,
interrupted runs and their exit status, interrupted sampling. Each test counts the faults it injects in
FAULTS (the note of issue 26 quotes the totals)."""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file, save_file
from test_reliability import _tokenizer_cmd

from core.checkpoint import CheckpointError, content_sha256, load_checkpoint, save_checkpoint
from tokenizer import VQModel
from training.run import open_run
from transformer import MaskGIT
from transformer.pipeline import export_models

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip(path, offset, length=1):
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + length, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _same(a, b):
    """Equal content: the same tensors (bit for bit) and plain values."""
    return content_sha256(a) == content_sha256(b)


# --- 1. corruption is detected, never trained on ----------------------------------------------------------

CHECKPOINT_FLIPS = 40  # random single bytes, plus one 4 KiB block in the middle


def test_flipped_bytes_in_a_checkpoint_are_refused_or_harmless(tiny_runs, tmp_path):
    src = tiny_runs["maskgit"]
    original = load_checkpoint(src)
    size = src.stat().st_size
    rng = random.Random(0)
    offsets = [rng.randrange(size) for _ in range(CHECKPOINT_FLIPS)]
    refused = 0
    for i, (offset, length) in enumerate([*((o, 1) for o in offsets), (size // 2, 4096)]):
        bad = tmp_path / f"flip{i}.pt"
        shutil.copy(src, bad)
        _flip(bad, offset, length)
        try:
            loaded = load_checkpoint(bad)
        except CheckpointError as e:
            assert str(bad) in str(e) and "\n" not in str(e)
            refused += 1
            continue
        # a byte that carries nothing (zip padding, a name's spelling) may flip unnoticed: the content is intact
        assert _same(loaded, original), f"flip at byte {offset} loaded different content"
    assert refused >= CHECKPOINT_FLIPS // 2  # most bytes of a checkpoint are its tensors


def test_resume_from_a_corrupt_checkpoint_is_one_line_and_trains_nothing(tiny_runs, tmp_path):
    run = tmp_path / "mg"
    shutil.copytree(tiny_runs["mg_dir"], run)
    ckpt = run / "checkpoint.pt"
    _flip(ckpt, ckpt.stat().st_size // 2, 4096)  # the 4 KiB
    before = ckpt.read_bytes()
    out = run_script(ROOT / "train_maskgit.py", "--run-dir", run, "--resume", "--codes", tiny_runs["codes"],
                     "--tokenizer", tiny_runs["tokenizer"], "--preset", "tiny", "optim.steps=5",
                     "optim.batch_size=8", check=False)
    assert out.returncode == 2 and "corrupt" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and str(ckpt) in out.stderr
    assert ckpt.read_bytes() == before  # nothing written over it
    # the corrupt tokenizer checkpoint is refused by the sampler too
    tok = tmp_path / "tok.pt"
    shutil.copy(tiny_runs["tokenizer"], tok)
    _flip(tok, tok.stat().st_size // 2, 4096)
    out = run_script(ROOT / "sample.py", "--tokenizer", tok, "--maskgit", tiny_runs["maskgit"], "--grid",
                     tmp_path / "g.png", check=False)
    assert out.returncode == 2 and "corrupt" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_non_finite_weights_are_refused_on_load(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"kind": "tokenizer", "step": 1, "model": {"w": torch.tensor([1.0, float("nan")])},
                           "ema": {"w": torch.ones(2)}})  # a valid hash over NaN weights
    with pytest.raises(CheckpointError, match=r"model weights are not finite \(w\)"):
        load_checkpoint(path)


EXPORT_FLIPS = 40


def test_flipped_bytes_in_an_export_are_refused_or_harmless(tiny_runs, tmp_path):
    exported = tmp_path / "export"
    export_models(str(tiny_runs["tokenizer"]), str(tiny_runs["maskgit"]), str(exported))
    rng = random.Random(1)
    refused = 0
    for i in range(EXPORT_FLIPS):
        kind, cls = [("tokenizer", VQModel), ("maskgit", MaskGIT)][i % 2]
        folder = tmp_path / f"{kind}{i}"
        shutil.copytree(exported / kind, folder)
        weights = folder / "model.safetensors"
        original = load_file(weights)
        offset = rng.randrange(weights.stat().st_size)
        _flip(weights, offset)
        try:
            cls.from_pretrained(folder)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(folder) in str(e)
            refused += 1
            continue
        assert _same(dict(sorted(load_file(weights).items())), dict(sorted(original.items()))), offset
    assert refused >= EXPORT_FLIPS // 2
    # sample.py on a corrupt export: one line, exit 2
    folder = tmp_path / "maskgit"
    shutil.copytree(exported / "maskgit", folder)
    weights = folder / "model.safetensors"
    _flip(weights, weights.stat().st_size - 100)  # inside the last tensor
    out = run_script(ROOT / "sample.py", "--tokenizer", exported / "tokenizer", "--maskgit", folder, "--grid",
                     tmp_path / "g.png", "--attrs", "smiling=1", check=False)
    assert out.returncode == 2 and "corrupt" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    # non-finite weights in an export (no hash: an older export, or one written by other code)
    state = load_file(exported / "tokenizer" / "model.safetensors")
    name = next(k for k, t in state.items() if t.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    shutil.copytree(exported / "tokenizer", tmp_path / "inf")
    save_file(state, tmp_path / "inf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not finite"):
        VQModel.from_pretrained(tmp_path / "inf")


# --- 2. one writer per run directory; 3. an interrupted run does not exit 0 --------------------------------

def _wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)


INTRUDERS = 2  # a --resume and an --overwrite into the directory a training is writing


def test_a_second_run_into_a_busy_run_dir_is_refused_and_an_interrupt_exits_130(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_tokenizer_cmd(run, 100_000), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for(run / "checkpoint.pt", first)
        for extra in (["--resume"], ["--overwrite"]):
            cmd = _tokenizer_cmd(run, 100_000, resume=False)
            cmd[4:4] = extra
            cmd.append("optim.seed=7")
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
            assert f"in use by another run (pid {first.pid} " in out.stderr and out.stderr.strip().count("\n") == 0
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-2000:]  # 128 + SIGINT: `train && next` stops here
    assert "SIGINT: checkpoint saved" in out + err and "continue with --resume" in out + err
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one run's rows only
    assert load_checkpoint(run / "checkpoint.pt")["config"]["optim"]["seed"] == 0
    # the lock file is still there, naming a process that is gone: free again (no stale lock to delete)
    assert f"pid {first.pid} " in (run / ".lock").read_text()
    out = subprocess.run(_tokenizer_cmd(run, steps[-1] + 1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == steps[-1] + 1


def test_run_lock_is_exclusive_released_and_ignores_dead_holders(tmp_path):
    from training.run import RunError, RunLock

    (tmp_path / ".lock").write_text("pid 999999999 on elsewhere, started long ago: train_tokenizer.py\n")
    lock = RunLock(tmp_path)  # a lock file whose process is gone is free
    with pytest.raises(RunError, match=f"in use by another run \\(pid {os.getpid()} "):
        RunLock(tmp_path)  # a second open file description of this very process: refused too
    lock.release()
    RunLock(tmp_path).release()
    args = argparse.Namespace(run_dir=str(tmp_path), resume=True, overwrite=False)
    open_run(args, "tokenizer")
    with pytest.raises(RunError, match="in use"):
        open_run(argparse.Namespace(**{**vars(args), "run_lock": None}), "tokenizer")
    del args  # the run's arguments go with its main(): so does the lock
    open_run(argparse.Namespace(run_dir=str(tmp_path), resume=True, overwrite=False), "tokenizer")
