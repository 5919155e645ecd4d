"""The make targets, dry-run (`make -n`): what each would run, without running it."""
import os
import shutil
import subprocess
import time

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@pytest.fixture
def make(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than pyproject.toml: `make setup` has run

    def run(*args, check=True):
        out = subprocess.run(["make", "-n", f"VENV={venv}", f"RUN={tmp_path / 'run'}", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        return out
    return run


def test_gpu_recipe_needs_data(make):
    for target in ("celeba", "tokenizer", "fid-ref", "rfid"):
        out = make(target, check=False)
        assert out.returncode != 0 and "DATA is not set" in out.stderr and "train_tokenizer.py" not in out.stdout
    assert "data.source=/data/celeba" in make("tokenizer", "DATA=/data/celeba").stdout


def test_maskgit_encodes_the_codes_only_when_the_tokenizer_is_newer(make, tmp_path):
    tok, codes = tmp_path / "run" / "tokenizer" / "checkpoint.pt", tmp_path / "run" / "codes" / "codes.json"
    assert "pretokenize.py" in make("maskgit").stdout  # no codes yet
    for path in (tok, codes):
        path.parent.mkdir(parents=True)
        path.touch()
    os.utime(tok, (time.time() - 60, time.time() - 60))
    out = make("maskgit").stdout
    assert "pretokenize.py" not in out and "train_maskgit.py" in out and "--resume" in out
    os.utime(tok, None)  # a newer tokenizer: its codes are stale
    os.utime(codes, (time.time() - 60, time.time() - 60))
    assert "pretokenize.py" in make("maskgit").stdout


def test_sample_passes_conditioning_and_the_trained_steps(make):
    out = make("sample", "ATTRS=smiling=1", "CFG=2").stdout
    assert "--attrs smiling=1" in out and "--cfg 2" in out and "--steps" not in out
    assert "--steps 12" in make("sample", "STEPS=12").stdout


def test_nproc_splits_sampling_and_pretokenizing_over_processes(make):
    assert "accelerate.commands.launch --num_processes 8 sample.py" in make("sample", "NPROC=8").stdout
    assert "accelerate.commands.launch --num_processes 8 pretokenize.py" in make("maskgit", "NPROC=8").stdout
    assert "launch" not in make("sample").stdout


def test_bench_can_be_pointed_at_data(make):
    out = make("bench", "BENCH_DATA=/data/faces").stdout
    assert out.count("--data /data/faces") == 3  # bench_loader, bench_fid, ablation


def test_make_j_runs_the_stages_one_after_another(tmp_path):
    """`make -j4 celeba` for real, with a stand-in interpreter that logs when each stage starts and ends:
    the stages read each other's files, so they must never overlap."""
    venv, log = tmp_path / "venv", tmp_path / "log"
    venv.mkdir()
    (venv / ".installed").touch()
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/sh\necho "start $1" >> {log}\nsleep 0.2\necho "end $1" >> {log}\n')
    stand_in.chmod(0o755)
    subprocess.run(["make", "-j4", f"PY={stand_in}", f"VENV={venv}", f"RUN={tmp_path / 'run'}", "DATA=/d", "celeba"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    events = log.read_text().split("\n")[:-1]
    assert len(events) == 16 and all(e.startswith("start" if i % 2 == 0 else "end") for i, e in enumerate(events))
