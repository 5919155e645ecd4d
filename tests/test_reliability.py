"""Faults: kill -9 and resume, SIGTERM, NaN losses, unwritable/full disks, malicious checkpoints, 2-process DDP."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMOKE, run_script

from core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TOK_ARGS = [*SMOKE, "data.flip=false", "data.num_workers=0", "log.log_every=1",
            "log.image_every=1000", "log.ckpt_every=1", "optim.warmup_steps=2"]


def _tokenizer_cmd(run_dir, steps, resume=True):
    return [sys.executable, str(ROOT / "train_tokenizer.py"), "--run-dir", str(run_dir),
            *(["--resume"] if resume else []), *TOK_ARGS, f"optim.steps={steps}"]


def _maskgit_cmd(run_dir, runs, steps):
    return [sys.executable, str(ROOT / "train_maskgit.py"), "--run-dir", str(run_dir), "--resume", "--codes",
            str(runs["codes"]), "--tokenizer", str(runs["tokenizer"]), "--preset", "tiny", "optim.batch_size=8",
            "model.dim=32", "model.depth=1", "model.heads=2", "log.log_every=1", "log.ckpt_every=1",
            "log.image_every=1000", f"optim.steps={steps}"]


def _kill_and_resume(cmd, run_dir, steps, kills, seed):
    """SIGKILL the run at random moments (while it trains and writes checkpoints), resume each time.
    Returns the number of real kills: a process that had already exited is not counted."""
    rng = random.Random(seed)
    ckpt, last_step, killed = run_dir / "checkpoint.pt", 0, 0
    for _ in range(kills):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not ckpt.exists() or load_checkpoint(ckpt)["step"] <= last_step:  # wait for progress ...
            if proc.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # ... then kill at a random moment
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += alive and proc.returncode == -signal.SIGKILL
        step = load_checkpoint(ckpt)["step"]  # (a) the latest checkpoint always loads
        assert step >= last_step  # (b) never further back than the last completed checkpoint
        last_step = step
        if step >= steps:
            break
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return killed


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if isinstance(wa[k], torch.Tensor) and not torch.equal(wa[k], wb[k])]
    assert not different, f"resumed run differs from uninterrupted run in {different[:5]}"


@pytest.mark.parametrize("steps,kills", [(6, 2), pytest.param(30, 10, marks=pytest.mark.slow)])
def test_tokenizer_survives_sigkill_and_resumes_exactly(tmp_path, steps, kills):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_tokenizer_cmd(straight, steps, resume=False), cwd=ROOT, check=True, capture_output=True, timeout=300)
    kills_done = _kill_and_resume(_tokenizer_cmd(killed, steps), killed, steps, kills=kills, seed=0)
    assert kills_done >= 1  # killed while running, at least once
    assert load_checkpoint(killed / "checkpoint.pt")["step"] == steps
    _assert_same_weights(straight / "checkpoint.pt", killed / "checkpoint.pt")  # (c) bit-identical on CPU


@pytest.mark.parametrize("steps,kills", [(6, 1), pytest.param(30, 10, marks=pytest.mark.slow)])
def test_maskgit_survives_sigkill_and_resumes_exactly(tiny_runs, tmp_path, steps, kills):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_maskgit_cmd(straight, tiny_runs, steps), cwd=ROOT, check=True, capture_output=True, timeout=300)
    kills_done = _kill_and_resume(_maskgit_cmd(killed, tiny_runs, steps), killed, steps, kills=kills, seed=1)
    assert kills_done >= 1
    _assert_same_weights(straight / "checkpoint.pt", killed / "checkpoint.pt")


_KILL_BEFORE_RENAME = """
import os, signal, sys, torch
import core.checkpoint as c
c.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # die after torch.save, before the rename
c.save_checkpoint(sys.argv[1], {"kind": "tokenizer", "step": 2, "model": {"w": torch.zeros(3)}})
"""


def test_kill_between_save_and_rename_leaves_the_old_checkpoint(tmp_path):
    """Fault injection, not chance: SIGKILL exactly between torch.save of the temp file and its rename."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"kind": "tokenizer", "step": 1, "model": {"w": torch.ones(3)}})
    out = subprocess.run([sys.executable, "-c", _KILL_BEFORE_RENAME, str(path)], cwd=ROOT, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint, intact
    leftovers = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the new one was written, not renamed
    from training.run import prepare_run_dir

    prepare_run_dir(tmp_path)  # what every (resumed) run does first
    assert not list(tmp_path.glob(".*.tmp")) and load_checkpoint(path)["step"] == 1


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_tokenizer_cmd(run, 10_000) + ["log.ckpt_every=100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-1000:]  # 128 + SIGTERM: an interrupted run is not a success
    assert "SIGTERM: checkpoint saved" in err + _
    assert load_checkpoint(run / "checkpoint.pt")["step"] >= 1


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    subprocess.run(_tokenizer_cmd(run, 2), cwd=ROOT, check=True, capture_output=True, timeout=300)
    before = (run / "checkpoint.pt").read_bytes()
    # An absurd learning rate makes the weights overflow: the loss (or the quantizer's input) becomes NaN/inf.
    out = subprocess.run(_tokenizer_cmd(run, 6) + ["optim.lr=1e30", "optim.nan_policy=stop", "optim.grad_clip=0",
                                                   "log.ckpt_every=1000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "non-finite" in out.stderr and "Traceback" not in out.stderr
    assert (run / "checkpoint.pt").read_bytes() == before  # the last good checkpoint is untouched


def test_unwritable_run_dir_is_a_clear_error_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run_script(ROOT / "train_tokenizer.py", "--run-dir", blocker / "run", *TOK_ARGS, "optim.steps=1", check=False)
    assert out.returncode == 2 and "not writable" in out.stderr and "Traceback" not in out.stderr


def test_full_disk_at_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"kind": "tokenizer", "step": 1, "model": {"w": torch.ones(3)}})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint is intact"):
        save_checkpoint(path, {"kind": "tokenizer", "step": 2, "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and not list(tmp_path.glob("*.tmp"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_checkpoint_is_refused_without_running(tmp_path, tiny_runs):
    marker, evil = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    torch.save({"format": "straight-maskgit", "kind": "tokenizer", "model": _Exploit(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    for cmd in (["sample.py", "--tokenizer", evil, "--maskgit", tiny_runs["maskgit"], "--grid", tmp_path / "g.png"],
                ["sample.py", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", evil, "--grid", tmp_path / "g.png"],
                ["pretokenize.py", "--tokenizer", evil, "--out", tmp_path / "codes"],
                ["train_tokenizer.py", "--run-dir", tmp_path, "--resume", *TOK_ARGS]):
        out = run_script(ROOT / cmd[0], *cmd[1:], check=False)
        assert out.returncode == 2 and "refused" in out.stderr and "Traceback" not in out.stderr, out.stderr[-500:]
    assert not marker.exists()  # nothing ran


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_runs):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(tiny_runs["tokenizer"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(bad)


def test_two_process_ddp_keeps_replicas_bit_identical(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train_tokenizer.py"), "--run-dir", str(run), *TOK_ARGS, "optim.steps=4", "log.ckpt_every=2",
           "model.vq.replace_freq=2", "data.num_images=128"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas["processes"] == 2 and replicas["step"] == 4
    assert len(set(replicas["checksums"])) == 1  # k-means init, replacement and in-place steps agree
    # ... and they are the weights in the checkpoint, hashed here independently of the run's own checksum
    import hashlib

    h = hashlib.sha256()
    for name, t in load_checkpoint(run / "checkpoint.pt")["model"].items():
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert replicas["checksums"][1] == h.hexdigest()[:16]  # rank 1 holds what rank 0 saved


def test_nan_skip_policy_ends_cleanly_and_every_checkpoint_is_finite(tmp_path):
    """The default policy (skip) used to crash with KeyError 'loss' when a whole log window was skipped."""
    run = tmp_path / "run"
    out = subprocess.run(_tokenizer_cmd(run, 6) + ["optim.lr=1e30", "optim.grad_clip=0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "NaN or inf" in errors[0] or "not finite" in errors[0]  # the final validation of a diverged model
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] >= 1 and "loss" not in records[-1]  # a window of skipped steps only
    ckpt = load_checkpoint(run / "checkpoint.pt")
    tensors = [t for part in ("model", "ema") for t in ckpt[part].values() if isinstance(t, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_non_finite_steps_found_at_a_window_end_train_what_a_check_per_step_did(tmp_path):
    """The guard reads the device once per window (training.state.Rollback): a run that diverges inside a
    5-step window is replayed and ends where checking every step (windows of one step) ends: the same
    skipped steps, the same printed skips, the same finite checkpoint (step 5's: at step 6 the sample
    images of the diverged EMA model stop both runs, before their save)."""
    runs = {}
    for name, every, check in (("per_step", 1, "window"), ("one_window", 5, "window"), ("strict", 5, "step")):
        run = tmp_path / name
        out = subprocess.run(_tokenizer_cmd(run, 6) + ["optim.lr=1e30", "optim.grad_clip=0", f"log.log_every={every}",
                                                       f"log.ckpt_every={every}", f"optim.nan_check={check}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        skips = [line for line in (out.stdout + out.stderr).splitlines() if "step skipped" in line]
        last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
        runs[name] = (skips, last["skipped_steps"], _weights(run / "checkpoint.pt"))
    (skips, skipped, weights), (skips_w, skipped_w, weights_w) = runs["per_step"], runs["one_window"]
    assert skipped >= 1 and skipped_w == skipped and skips_w == skips
    assert load_checkpoint(tmp_path / "one_window" / "checkpoint.pt")["step"] == 5
    assert weights.keys() == weights_w.keys()
    assert all(torch.equal(weights[k], weights_w[k]) for k in weights if isinstance(weights[k], torch.Tensor))
    # optim.nan_check=step (no copy of the state, the host decides every step) trains the same
    skips_s, skipped_s, weights_s = runs["strict"]
    assert skipped_s == skipped and skips_s == skips
    assert all(torch.equal(weights_w[k], weights_s[k]) for k in weights if isinstance(weights[k], torch.Tensor))


def test_skip_policy_limit_and_refusal_of_non_finite_weights(tmp_path):
    from accelerate import Accelerator

    from training.ema import EMA
    from training.run import RunError
    from training.state import NonFiniteGuard, TrainState

    guard, nan, one = NonFiniteGuard("skip", patience=3), torch.tensor(float("nan")), torch.tensor(1.0)
    assert [guard.bad(x) for x in (nan, nan, one, nan, nan)] == [True, True, False, True, True]
    with pytest.raises(RunError, match="3 non-finite step"):
        guard.bad(torch.tensor(float("inf")))  # the third in a row
    with pytest.raises(RunError, match="policy 'stop'"):
        NonFiniteGuard("stop").bad(nan)
    model = torch.nn.Linear(2, 2)
    state = TrainState(model, EMA(model, 0.9), torch.optim.SGD(model.parameters(), lr=0.1))
    state.save(tmp_path, Accelerator(cpu=True), "tokenizer", {}, {})
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(RunError, match="not finite.*last good one"):
        state.save(tmp_path, Accelerator(cpu=True), "tokenizer", {}, {})
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_metric_window_sums_tensors_on_the_device_like_floats():
    """Tensors (summed where they live, read once per window) average to exactly what their floats give;
    a key missing from a step adds nothing to it but the step still counts."""
    from training.run import MetricWindow

    steps = [{"loss": torch.tensor(v, dtype=torch.float32), "acc": torch.tensor(a)} for v, a in
             ((0.1, 0.25), (1 / 3, 0.5), (2.7, 0.125))]
    steps[1]["gan"] = torch.tensor(0.3)
    floats, tensors = MetricWindow(), MetricWindow()
    for values in steps:
        floats.add({k: v.item() for k, v in values.items()}, items=4)
        tensors.add(values, items=4)
    expected, got = floats.averages("rate"), tensors.averages("rate")
    assert {k: v for k, v in got.items() if k != "rate"} == {k: v for k, v in expected.items() if k != "rate"}
    assert all(type(v) is float for v in got.values()) and got["gan"] == pytest.approx(0.1)
    assert tensors.sums == {} and tensors.count == 0  # a new window


def test_logged_averages_after_a_resume_off_a_log_boundary(entry, tiny_runs, tmp_path):
    """Resumed at step 3 with log_every=4, the step-4 record averages one step (it used to divide by 4)."""
    common = ["--codes", tiny_runs["codes"], "--tokenizer", tiny_runs["tokenizer"], "optim.batch_size=8",
              "model.dim=32", "model.depth=1", "model.heads=2", "log.image_every=1000"]
    assert entry("train_maskgit", "--run-dir", tmp_path / "straight", *common, "optim.steps=5", "log.log_every=1")[0] == 0
    assert entry("train_maskgit", "--run-dir", tmp_path / "split", *common, "optim.steps=3", "log.log_every=4")[0] == 0
    assert entry("train_maskgit", "--run-dir", tmp_path / "split", "--resume", *common, "optim.steps=5",
                 "log.log_every=4")[0] == 0
    straight, split = ({r["step"]: r for r in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())}
                       for d in ("straight", "split"))
    assert sorted(split) == [3, 4, 5]
    assert split[4]["loss"] == pytest.approx(straight[4]["loss"], rel=1e-6)  # one step summed, one step divided
    assert split[5]["loss"] == pytest.approx(straight[5]["loss"], rel=1e-6)
    _assert_same_weights(tmp_path / "straight" / "checkpoint.pt", tmp_path / "split" / "checkpoint.pt")  # exact resume


def _agree(rank, world, init, out):
    """One process of the gloo test: rank 1 alone sees a NaN loss, rank 0 alone got SIGTERM."""
    import torch.distributed as dist

    from training.run import StopSignal
    from training.state import NonFiniteGuard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    loss = torch.tensor(float("nan") if rank == 1 else 0.5)
    stop = StopSignal()
    if rank == 0:
        stop.requested = "SIGTERM"
    decisions = [NonFiniteGuard("skip").bad(loss), stop.agreed(torch.device("cpu"), due=False),
                 stop.agreed(torch.device("cpu")), NonFiniteGuard("skip").bad(torch.tensor(0.5))]
    (out / f"rank{rank}.json").write_text(json.dumps(decisions))
    dist.destroy_process_group()


def test_nan_and_stop_decisions_are_taken_by_all_ranks_together(tmp_path):
    """A NaN on one rank skips the step on every rank, a SIGTERM to one rank stops them all: a decision taken
    per rank would leave the others waiting in a collective (a hang). The stop is agreed only at a step
    that is due (logs, images, checkpoint): before it, no rank stops. Two CPU processes, gloo."""
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(2, f"file://{tmp_path / 'rendezvous'}", tmp_path), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[True, False, True, False]] * 2


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_with_one_checkpoint(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           str(ROOT / "train_tokenizer.py"), "--run-dir", str(run), *TOK_ARGS, "optim.steps=100000",
           "log.ckpt_every=100000", "data.num_images=128"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    rank1 = next(int(c) for c in children if b"LOCAL_RANK=1" in open(f"/proc/{c}/environ", "rb").read().split(b"\0"))
    os.kill(rank1, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "checkpoint saved" in out + err, err[-2000:]  # stopped, not finished
    replicas = json.loads((run / "replicas.json").read_text())
    assert len(set(replicas["checksums"])) == 1 and load_checkpoint(run / "checkpoint.pt")["step"] == replicas["step"]
