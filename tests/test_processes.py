"""sample.py, pretokenize.py and ``python -m eval gen`` on several processes (core/processes.py): 2 CPU processes (torchrun, gloo)
write byte for byte what 1 process writes."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from core.processes import shard_batches


def _torchrun(port: int, script: str, *args) -> None:
    """``script`` on 2 CPU processes; "-m eval" runs the eval package."""
    target = ["-m", "eval"] if script == "-m eval" else [str(ROOT / script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *target, *map(str, args)]
    # one thread per process, what torchrun sets when OMP_NUM_THREADS is unset, whatever the caller's is
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("n, batch_size, world", [(10, 4, 2), (10, 4, 3), (8, 4, 2), (3, 4, 2), (17, 1, 4)])
def test_shards_are_the_single_process_batches_dealt_round_robin(n, batch_size, world):
    single = shard_batches(n, batch_size)
    shards = [shard_batches(n, batch_size, rank, world) for rank in range(world)]
    assert sorted((b for s in shards for b in s), key=lambda r: r.start) == single
    assert [i for b in single for i in b] == list(range(n))
    assert all(s[i].start == single[rank + i * world].start for rank, s in enumerate(shards) for i in range(len(s)))


def test_per_sample_generators_make_a_sample_independent_of_its_batch_mates():
    from transformer.decoding import maskgit_decode
    from transformer.model import MaskGIT, MaskGITConfig

    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(num_codes=16, grid=(4, 4), dim=32, depth=1, heads=2)).eval()

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a, b = maskgit_decode(model, 3, gens(1, 2, 3), steps=4), maskgit_decode(model, 3, gens(1, 7, 8), steps=4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        maskgit_decode(model, 3, gens(1, 2))


def test_two_processes_sample_the_same_pngs_as_one(tiny_runs, entry, tmp_path):
    args = ["--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"], "--num-images", 7,
            "--batch-size", 2, "--attrs", "smiling=1", "--seed", 3]
    assert entry("sample", *args, "--out-dir", tmp_path / "one")[0] == 0
    _torchrun(29533, "sample.py", *args, "--out-dir", tmp_path / "two")
    one, two = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one == two == [f"{i:06d}.png" for i in range(7)] + ["samples.json"]
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in one)
    pngs = {(tmp_path / "one" / f).read_bytes() for f in one}
    assert len(pngs) == 8  # seven different images (and the record): no image was written twice


def test_two_processes_pretokenize_the_same_codes_as_one(tiny_runs, entry, tmp_path):
    args = ["--tokenizer", tiny_runs["tokenizer"], "--batch-size", 5, "data.flip=true"]
    assert entry("pretokenize", *args, "--out", tmp_path / "one")[0] == 0
    _torchrun(29534, "pretokenize.py", *args, "--out", tmp_path / "two")
    one, two = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one == two and "train.npy" in one and "val.npy" in one
    for name in one:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    assert (tmp_path / "one" / "codes.json").read_text() == (tmp_path / "two" / "codes.json").read_text()
    train = np.load(tmp_path / "one" / "train.npy")
    assert len(train) % 2 == 0 and not np.array_equal(train[: len(train) // 2], train[len(train) // 2 :])  # flips


@pytest.mark.parametrize("cap", [None, 4])
def test_two_processes_score_the_same_generation_as_one(tiny_runs, tmp_path, cap):
    """eval gen on 2 processes: the main process scores every process's batches in one process's order, so
    the report's numbers are the same; with an SWD image cap below --n the main process stops early and
    the other stops with it (no hang)."""
    import json

    from PIL import Image

    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    args = ["gen", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"], "--num-images", 7,
            "--gen-batch-size", 2, "--seed", 3, "--metrics", "swd", "--ref-images", ref, "--ref-resize",
            "--report-dir", tmp_path, *(["--swd-max-images", cap] if cap else [])]
    # one process with one thread, as torchrun starts each of its processes (OMP_NUM_THREADS=1): the score's
    # float sums then run in the same order, and the numbers are equal to the last bit
    one = subprocess.run([sys.executable, "-m", "eval", *map(str, args), "--name", "one"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(29535 + bool(cap), "-m eval", *args, "--name", "two")
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert one["metrics"] == two["metrics"] and one["metrics"]["SWD_x1e3_mean"] > 0
    assert one["protocol"]["samples"] == two["protocol"]["samples"]
    assert one["protocol"]["samples"]["count"] == (cap or 7)
