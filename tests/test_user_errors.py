"""Bad input at every entry point: one line ``error: ...``, exit status 2, checked before the expensive
work, nothing lost. The entry points run in-process through the guard they run under as scripts
(``core.errors.guarded``), so the whole list costs seconds; ``test_guard_as_a_script`` shows the same
line and status from a real process."""
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE, run_script

import eval.__main__ as eval_cli
from core.errors import UserError
from core.files import write_text
from training.run import JsonlLog, RunError

MG_SMALL = ["model.dim=32", "model.depth=1", "model.heads=2", "optim.batch_size=8"]


def _one_line_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A checkpoint whose unpickling would run a command (touch a marker file); the marker must never appear."""
    folder = tmp_path_factory.mktemp("evil")
    torch.save({"format": "straight-maskgit", "kind": "maskgit", "model": _Exploit(folder / "pwned")},
               folder / "checkpoint.pt")
    yield folder / "checkpoint.pt"
    assert not (folder / "pwned").exists()


def test_bad_checkpoints_at_every_entry_point(entry, tiny_runs, evil, tmp_path):
    """Missing, swapped and malicious checkpoints, and a directory without a checkpoint, for eval gen /
    rfid (which used to leak CheckpointError tracebacks), sample.py, pretokenize.py, train_maskgit.py."""
    tok, mg, codes = tiny_runs["tokenizer"], tiny_runs["maskgit"], tiny_runs["codes"]
    empty = tmp_path / "empty"
    empty.mkdir()
    gen = ["--n", "4", "--metrics", "swd", "--ref-images", tmp_path, "--run-dir", tmp_path / "ev"]
    cases = [
        (("eval", "gen", "--tokenizer", tmp_path / "missing.pt", "--maskgit", mg, *gen), "checkpoint not found"),
        (("eval", "gen", "--tokenizer", tok, "--maskgit", tok, *gen), "'tokenizer' checkpoint"),
        (("eval", "gen", "--tokenizer", tok, "--maskgit", evil, *gen), "refused"),
        (("eval", "rfid", "--tokenizer", mg, "--images", tmp_path, "--metrics", "swd"), "'maskgit' checkpoint"),
        (("eval", "rfid", "--tokenizer", evil, "--images", tmp_path, "--metrics", "swd"), "refused"),
        (("eval", "rfid", "--tokenizer", tmp_path / "missing.pt", "--images", tmp_path, "--metrics", "swd"),
         "not found"),
        (("sample", "--tokenizer", empty, "--maskgit", mg, "--grid", tmp_path / "g.png"), "checkpoint not found"),
        (("pretokenize", "--tokenizer", empty, "--out", tmp_path / "c"), "checkpoint not found"),
        (("train_maskgit", "--run-dir", tmp_path / "m", "--codes", codes, "--tokenizer", empty), "checkpoint not found"),
        (("train_maskgit", "--run-dir", tmp_path / "m2", "--codes", codes, "--tokenizer", evil), "refused"),
        (("train_maskgit", "--run-dir", evil.parent, "--resume", "--codes", codes, "--tokenizer", tok), "refused"),
    ]
    for argv, fragment in cases:
        _one_line_error(*entry(*argv), fragment)


def test_bad_arguments_fail_before_the_work(entry, tiny_runs, tmp_path):
    tok, mg, codes = tiny_runs["tokenizer"], tiny_runs["maskgit"], tiny_runs["codes"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    sample = ["sample", "--tokenizer", tok, "--maskgit", mg]
    cases = [
        ((*sample, "--num-images", "-5", "--out-dir", tmp_path / "s"), "--num-images must be >= 0"),
        ((*sample, "--grid", tmp_path / "g.png", "--grid-size", "0"), "--grid-size must be >= 1"),
        ((*sample, "--num-images", "2", "--out-dir", a_file), "not a directory"),
        ((*sample, "--grid", tmp_path / "g.png", "--steps", "0"), "--steps must lie in [1, 64]"),
        ((*sample, "--grid", tmp_path / "g.png", "--cfg", "2"), "--cfg needs a condition"),
        (("eval", "score", tmp_path, "--metrics", "swd", "--ref-images", tmp_path, "--run-dir", a_file),
         "not a directory"),
        (("pretokenize", "--tokenizer", tok, "--out", tmp_path / "c", "--splits", ","), "--splits"),
        (("train_tokenizer", "--run-dir", tmp_path / "t", "optim.grad_clip=nan"), "optim.grad_clip must be finite"),
        (("train_tokenizer", "--run-dir", tmp_path / "t", "optim.lr=inf"), "optim.lr must be finite"),
        (("train_maskgit", "--run-dir", tmp_path / "m", "--codes", codes, "--tokenizer", tok, "model.num_codes=512"),
         "model.num_codes comes from the data"),
    ]
    for argv, fragment in cases:
        _one_line_error(*entry(*argv), fragment)
    assert not (tmp_path / "s").exists() and not (tmp_path / "c" / "codes.json").exists()


def test_resume_refuses_a_different_model_and_a_reset_needs_overwrite(entry, tiny_runs, tmp_path):
    run = tmp_path / "tok"
    shutil.copytree(tiny_runs["tok_dir"], run)
    log = (run / "log.jsonl").read_text()
    _one_line_error(*entry("train_tokenizer", "--run-dir", run, "--resume", "model.vq.num_codes=64", *SMOKE),
                    "model.vq.num_codes", "cannot change on --resume")
    # forgetting --resume used to reset the run and empty its log
    _one_line_error(*entry("train_tokenizer", "--run-dir", run, *SMOKE), "--resume", "--overwrite")
    assert (run / "log.jsonl").read_text() == log and (run / "checkpoint.pt").read_bytes() == \
        tiny_runs["tokenizer"].read_bytes()
    mg = tmp_path / "mg"
    shutil.copytree(tiny_runs["mg_dir"], mg)
    _one_line_error(*entry("train_maskgit", "--run-dir", mg, "--codes", tiny_runs["codes"], "--tokenizer",
                           tiny_runs["tokenizer"], *MG_SMALL), "--resume")


def test_print_config_shows_every_key(monkeypatch, capsys):
    import train_maskgit

    monkeypatch.setattr(sys, "argv", ["train_maskgit.py", "--print-config", "optim.steps=7"])
    with pytest.raises(SystemExit) as stop:
        train_maskgit.main()
    cfg = json.loads(capsys.readouterr().out)
    assert stop.value.code == 0 and cfg["optim"]["steps"] == 7 and set(cfg) == {"model", "masking", "optim", "log"}
    assert "label_smoothing" in cfg["masking"] and "nan_policy" in cfg["optim"]


def test_sample_out_dir_is_never_mixed_and_records_what_was_sampled(entry, tiny_runs, tmp_path):
    """A second, smaller run into the same folder used to leave old PNGs that `make fid` then scored."""
    out = tmp_path / "samples"
    common = ["sample", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"],
              "--out-dir", out, "--batch-size", "4", "--device", "cpu"]
    assert entry(*common, "--num-images", "4")[0] == 0
    _one_line_error(*entry(*common, "--num-images", "2"), "not empty", "--overwrite")
    assert entry(*common, "--num-images", "2", "--overwrite")[0] == 0
    record = json.loads((out / "samples.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"] and record["count"] == 2
    assert record["settings"]["schedule"] == "arccos" and len(record["maskgit_sha256"]) == 16
    (out / "000001.png").unlink()  # the folder no longer holds what the record says: scoring refuses
    code = eval_cli.main(["score", str(out), "--metrics", "swd", "--ref-images", str(out), "--run-dir",
                          str(tmp_path / "ev")])
    assert code == 2


def test_guard_as_a_script(tmp_path):
    out = run_script(ROOT / "sample.py", "--tokenizer", tmp_path, "--maskgit", tmp_path, "--grid", tmp_path / "g.png",
                     check=False)
    _one_line_error(out.returncode, out.stderr, "checkpoint not found")


def test_full_disk_and_torn_logs(tmp_path, monkeypatch):
    # a full disk while writing a small file (replicas.json, config.json, ...): one line, old file intact
    target = tmp_path / "replicas.json"
    write_text(target, "old\n")

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(UserError, match="disk full; the previous file is intact"):
        write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))
    # a last line torn by a kill is dropped on resume; an unreadable line elsewhere names the file
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    JsonlLog(log, resume_step=2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunError, match=f"{log}: line 2"):
        JsonlLog(log, resume_step=2)


def test_resume_accepts_overrides_equal_to_defaults_of_fields_newer_than_the_checkpoint():
    """A checkpoint written before a model field existed resumes when that field is set to its default
    (the ladder sets every VQ option explicitly); a real change is still refused."""
    import pytest

    from core.config import ConfigError, to_dict
    from tokenizer.train_config import PRESETS, TrainTokenizerConfig
    from training.run import resolve_config

    stored = to_dict(PRESETS["tiny"])
    del stored["model"]["vq"]["rotation_trick"]  # as in a checkpoint from before that option
    cfg = resolve_config(TrainTokenizerConfig, PRESETS["tiny"], ["model.vq.rotation_trick=false"], stored)
    assert cfg.model.vq.rotation_trick is False
    with pytest.raises(ConfigError, match="cannot change on --resume"):
        resolve_config(TrainTokenizerConfig, PRESETS["tiny"], ["model.vq.num_codes=64"], stored)


def test_checkpoint_from_an_older_recipe_is_refused_naming_the_file(tmp_path, entry):
    """A tokenizer whose stored options this version refuses (here: residual stages with unit-norm codes,
    accepted by an earlier version) is refused on load and on --resume with one line that names the file
    and says another version wrote it (not a bare config error)."""
    import pytest

    from core.checkpoint import save_checkpoint
    from core.config import ConfigError, to_dict
    from tokenizer import load_tokenizer
    from tokenizer.train_config import PRESETS

    stored = to_dict(PRESETS["tiny"])
    stored["model"]["vq"].update(kind="residual", groups=2, cb_norm="l2")
    path = tmp_path / "old" / "checkpoint.pt"
    save_checkpoint(path, {"kind": "tokenizer", "config": stored, "model": {}, "step": 10})
    with pytest.raises(ConfigError, match=r"checkpoint\.pt: this version refuses .*cb_norm.*another version"):
        load_tokenizer(path)
    code, err = entry("train_tokenizer", "--run-dir", str(path.parent), "--resume")
    assert code == 2 and "another version of the project" in err and len(err.strip().splitlines()) == 1


def test_resolution_is_one_setting():
    """data.resolution and model.resolution: an override of either sets both, two different values are refused."""
    from core.config import ConfigError, apply_overrides
    from tokenizer.train_config import PRESETS, tie_resolution

    for key in ("data.resolution", "model.resolution"):
        cfg = apply_overrides(PRESETS["tiny"], tie_resolution([f"{key}=64"]))
        assert cfg.data.resolution == cfg.model.resolution == 64
    with pytest.raises(ConfigError, match="one setting"):
        tie_resolution(["data.resolution=64", "model.resolution=32"])
    with pytest.raises(ConfigError, match="must equal"):
        apply_overrides(PRESETS["tiny"], ["data.resolution=64"])  # untied: the schema refuses the mismatch
