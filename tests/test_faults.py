"""Faults, round three: flipped bytes in checkpoints and exports, two writers in one run directory,
interrupted runs and their exit status, interrupted sampling. Each test counts the faults it injects in
FAULTS (the note of issue 26 quotes the totals)."""
import argparse
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
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

def _wait_for(path, proc, seconds=600):  # a loaded 2-core machine takes minutes to start a run
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)


def _ctrl_c_as_in_a_terminal():
    """A job started in the background of a shell inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt; a terminal's foreground process has the default handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# --- 4. partial sample folders are never scored as complete ----------------------------------------------

SAMPLE_INTERRUPTS = (1, 5)  # Ctrl-C after this many PNGs (mid-batch, and in the second batch)


def test_interrupted_sampling_is_recognised_refused_by_eval_and_resumed_exactly(entry, tiny_runs, tmp_path,
                                                                                   monkeypatch):
    import eval.__main__ as eval_cli
    import sample

    common = ["sample", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"],
              "--batch-size", "4", "--device", "cpu", "--num-images", "10", "--seed", "3"]
    assert entry(*common, "--out-dir", tmp_path / "straight")[0] == 0
    straight = {p.name: p.read_bytes() for p in (tmp_path / "straight").glob("*.png")}
    real_save = sample.save_image
    for k in SAMPLE_INTERRUPTS:
        out = tmp_path / f"cut{k}"
        written = []

        def save_then_interrupt(img, path, **kw):
            if len(written) == k:
                raise KeyboardInterrupt
            written.append(path)
            real_save(img, path, **kw)

        monkeypatch.setattr(sample, "save_image", save_then_interrupt)
        code, err = entry(*common, "--out-dir", out)
        monkeypatch.setattr(sample, "save_image", real_save)
        assert code == 130 and "Traceback" not in err and f"interrupted: {k} of 10 images in {out}" in err, err
        record = json.loads((out / "samples.json").read_text())
        assert record["complete"] is False and len(list(out.glob("*.png"))) == k
        code = eval_cli.main(["score", str(out), "--metrics", "swd", "--ref-images", str(tmp_path / "straight"),
                              "--run-dir", str(tmp_path / "ev")])
        assert code == 2
        # other settings into the unfinished folder: refused, nothing touched
        code, err = entry(*common, "--out-dir", out, "--temperature", "0.5")
        assert code == 2 and "unfinished sampling with another settings" in err, err
        assert len(list(out.glob("*.png"))) == k
        # the same command again: finishes it, the same PNGs as an uninterrupted run
        assert entry(*common, "--out-dir", out)[0] == 0
        assert json.loads((out / "samples.json").read_text())["complete"] is True
        assert {p.name: p.read_bytes() for p in out.glob("*.png")} == straight and not list(out.glob(".*"))


def test_eval_score_refuses_an_unfinished_folder_and_warns_without_a_record(tmp_path, capsys):
    from PIL import Image

    import eval.__main__ as eval_cli

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i:06d}.png")
    args = ["score", str(folder), "--metrics", "swd", "--ref-images", str(folder), "--run-dir", str(tmp_path / "ev")]
    (folder / "samples.json").write_text(json.dumps({"count": 10, "complete": False}))
    assert eval_cli.main(args) == 2
    assert "unfinished sampling (4 of 10 images" in capsys.readouterr().err
    (folder / "samples.json").unlink()  # a folder sample.py did not write (or an old interrupted one)
    with pytest.warns(UserWarning, match="has no samples.json"):
        assert eval_cli.main(args) == 0


def test_ctrl_c_in_sample_py_is_one_line_and_exit_130(tiny_runs, tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--tokenizer", str(tiny_runs["tokenizer"]),
                             "--maskgit", str(tiny_runs["maskgit"]), "--num-images", "100000", "--batch-size", "2",
                             "--out-dir", str(out), "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    _wait_for(out / "000001.png", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "run the same command again" in err, err[-2000:]
    assert json.loads((out / "samples.json").read_text())["complete"] is False


# --- 6. every CLI validates what the studio validates ------------------------------------------------------

SAMPLE_BAD_INPUTS = [
    (["--steps", "100000"], "--steps must lie in [1, "),
    (["--steps", "0"], "--steps must lie in [1, "),
    (["--temperature", "nan"], "--temperature must lie in [0, 10], got nan"),
    (["--temperature", "inf"], "--temperature must lie in [0, 10], got inf"),
    (["--temperature", "-1"], "--temperature must lie in [0, 10], got -1"),
    (["--choice-temperature", "nan"], "--choice-temperature must lie in [0, 50]"),
    (["--choice-temperature", "-1"], "--choice-temperature must lie in [0, 50]"),
    (["--cfg", "nan", "--attrs", "smiling=1"], "--cfg must lie in [0, 20]"),
    (["--top-k", "0"], "--top-k must lie in [1, "),
    (["--top-k", "100000"], "--top-k must lie in [1, "),
    (["--inpaint", "/nonexistent.png", "--box", "0,0,8,8"], "--inpaint /nonexistent.png: no such file"),
    (["--inpaint", ROOT / "docs/demo.png", "--box", "0,0,8,8", "--mask", ROOT / "docs/demo.png"],
     "--box and --mask both give the region to regenerate: give one of them"),  # two regions: refused, not one ignored
    (["--box", "0,0,8,8"], "--box edits a picture: give it with --inpaint"),  # refused, not silently ignored
    (["--mask", ROOT / "docs/demo.png"], "--mask edits a picture: give it with --inpaint"),
    (["--outpaint"], "--outpaint edits a picture: give it with --inpaint"),
    (["--cfg-power", "0"], "--cfg-power must lie in [0.01, 20], got 0"),
    (["--temperature-end", "nan"], "--temperature-end must lie in [0, 10], got nan"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    *([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []),
]


def _one_line(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err[-2000:]


def test_sample_py_refuses_bad_decoding_settings_with_one_line(entry, tiny_runs, tmp_path):
    grid = tmp_path / "grid.png"
    for extra, fragment in SAMPLE_BAD_INPUTS:
        _one_line(*entry("sample", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"],
                         "--grid", grid, "--grid-size", "1", *extra), fragment)
        assert not grid.exists() and not grid.with_suffix(".json").exists()
    # python -m eval gen shares the check
    code = importlib.import_module("eval.__main__").main(
        ["gen", "--tokenizer", str(tiny_runs["tokenizer"]), "--maskgit", str(tiny_runs["maskgit"]), "--n", "1",
         "--metrics", "swd", "--ref-images", str(tmp_path), "--temperature", "nan", "--run-dir", str(tmp_path / "e")])
    assert code == 2


STUDIO_BAD_INPUTS = [(["--port", "99999"], "--port must lie in [0, 65535]"), (["--port", "-1"], "--port must lie"),
                     (["--device", "nonsense"], "is not a device")]
EVAL_BAD_INPUTS = [(["--swd-max-images", "-3"], "--swd-max-images must be >= 1, got -3"),
                   (["--batch-size", "0"], "--batch-size must be >= 1"), (["--device", "nonsense"], "is not a device")]


def test_studio_and_eval_refuse_bad_flags_with_one_line(entry, tiny_runs, tmp_path, capsys):
    for extra, fragment in STUDIO_BAD_INPUTS:
        _one_line(*entry("studio.__main__", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"],
                         *extra), fragment)
    eval_cli = importlib.import_module("eval.__main__")
    for extra, fragment in EVAL_BAD_INPUTS:
        code = eval_cli.main(["score", str(tmp_path), "--metrics", "swd", "--ref-images", str(tmp_path), *extra])
        _one_line(code, capsys.readouterr().err, fragment)
    # the studio's requests go through the same check: no more steps than the model has tokens
    from studio.api import ModelInfo, RequestError, parse_generate

    info = ModelInfo(resolution=16, grid=(2, 2), num_codes=8, attr_names=())
    with pytest.raises(RequestError, match=r"steps must lie in \[1, 4\]"):
        parse_generate({"steps": 5}, info)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ctrl_c_in_pretokenize_is_one_line_and_keeps_the_codes_it_would_replace(tiny_runs, tmp_path):
    """Ctrl-C while pretokenize is encoding into a folder that holds earlier codes: one line, exit 130, and the
    folder as it was (nothing half-written, nothing lost). 3,000 faces one at a time is seconds of encoding;
    the signal comes once the progress bar counts encoded images, so it lands in the encoding loop."""
    out = tmp_path / "codes"
    shutil.copytree(tiny_runs["codes"], out)
    before = _files(out)
    assert "codes.json" in before
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretokenize.py"), "--tokenizer", str(tiny_runs["tokenizer"]),
                             "--out", str(out), "--batch-size", "1", "data.num_images=3000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not re.search(r"encode train: .*\| *[1-9][0-9]*/[0-9]+ \[", "".join(seen)):  # images encoded: running
        assert proc.poll() is None and time.time() < deadline, "".join(seen)[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=60)
    err = "".join(seen)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
    assert "encode val" not in err  # interrupted while encoding the train split, not after
    assert _files(out) == before and not (tmp_path / ".codes.tmp").exists()


# --- 7. scoring samples against a user's own photos, one command ------------------------------------------

def test_eval_score_against_a_folder_of_photos_of_another_size(tmp_path, capsys):
    from PIL import Image

    eval_cli = importlib.import_module("eval.__main__")
    rng = np.random.default_rng(0)
    samples, photos = tmp_path / "samples", tmp_path / "photos"
    samples.mkdir()
    photos.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(samples / f"{i:06d}.png")
        Image.fromarray(rng.integers(0, 256, (109, 89, 3), dtype=np.uint8)).save(photos / f"{i:06d}.jpg")
    args = ["score", str(samples), "--metrics", "swd", "--ref-images", str(photos), "--run-dir", str(tmp_path / "ev"),
            "--name", "photos"]
    assert eval_cli.main(args) == 2  # without the flag: refused, never resized silently
    assert "89x109, expected 32x32" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no samples.json: scored as it is
        assert eval_cli.main([*args, "--ref-resize"]) == 0
    report = json.loads((tmp_path / "ev" / "photos.json").read_text())
    assert report["protocol"]["reference_resized"] is True and "swd" in json.dumps(report).lower()
    assert report["protocol"]["command"] == ["python", "-m", "eval", *args, "--ref-resize"]  # as the user typed it
    assert "eval score" in (ROOT / "README.md").read_text().split("--ref-resize")[0].rsplit("```bash", 1)[1]


# --- 8. smaller things -------------------------------------------------------------------------------------

def test_exports_are_readable_and_name_no_machine_path(tiny_runs, tmp_path):
    out = tmp_path / "export"
    export_models(str(tiny_runs["tokenizer"]), str(tiny_runs["maskgit"]), str(out))
    for folder in ("tokenizer", "maskgit"):
        for name in ("model.safetensors", "config.json"):
            assert (out / folder / name).stat().st_mode & 0o044 == 0o044, (folder, name)  # group/others read
        assert str(tmp_path.parent) not in (out / folder / "config.json").read_text()
        assert str(tiny_runs["tokenizer"].parent) not in (out / folder / "config.json").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_refuses_a_run_path_with_spaces_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # as from a shell,
    # also when the suite itself runs under `make test` (a sub-make prints "Entering directory" lines)
    out = subprocess.run(["make", "--no-print-directory", "-n", "report", f"RUN={tmp_path / 'my runs'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "must be one path without spaces" in out.stderr and not out.stdout, out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_report_gives_a_reconstruction_swd_its_paired_floor_of_zero(tiny_runs, tmp_path):
    import report

    shutil.copytree(tiny_runs["tok_dir"], tmp_path / "tokenizer")
    (tmp_path / "eval").mkdir()
    swd = {"metrics": {"SWD_x1e3_mean": 12.5}}
    (tmp_path / "eval" / "floor.json").write_text(json.dumps(swd))
    (tmp_path / "eval" / "generation.json").write_text(json.dumps(
        {"metrics": {"SWD_x1e3_mean": 40.0}, "protocol": {"samples": {"count": 8, "kind": "images"}}}))
    (tmp_path / "eval" / "rfid_tok_val.json").write_text(json.dumps(
        {"metrics": {"SWD_x1e3_mean": 5.0}, "protocol": {"samples": {"count": 8, "kind": "reconstructions of the "
                                                                                         "reference images"}}}))
    _, numbers, _, _ = report.build(tmp_path)
    recon = {r.metric: r.context for r in numbers["Evaluation: rfid_tok_val"]}["SWD ×10³"]
    generation = {r.metric: r.context for r in numbers["Evaluation: generation"]}["SWD ×10³"]
    assert "the floor is 0" in recon and "12.5" not in recon
    assert "floor 12.5" in generation
