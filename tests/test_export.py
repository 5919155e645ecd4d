"""Exported models (export.py, core.pretrained): safetensors + config.json folders that load strictly and
sample bit-identically to the checkpoints they came from."""
import json
import re
import shutil

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file, save_file

from core.checkpoint import CheckpointError
from core.errors import UserError
from tokenizer import VQModel, load_tokenizer
from transformer import MaskGIT
from transformer.pipeline import decode_settings, export_models, generate, load_models, load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    run_script(ROOT / "export.py", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"], "--out", out)
    return out


def test_export_is_two_plain_folders_with_what_decoding_needs(exported, tiny_runs):
    assert sorted(p.name for p in exported.iterdir()) == ["maskgit", "tokenizer"]
    for folder in exported.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        assert all(isinstance(t, torch.Tensor) for t in load_file(folder / "model.safetensors").values())
    mg = json.loads((exported / "maskgit" / "config.json").read_text())
    assert mg["kind"] == "maskgit" and mg["masking"]["schedule"] == "arccos" and mg["masking"]["sample_steps"] == 5
    assert len(mg["meta"]["attr_names"]) == 5 and "codes" not in mg["meta"] and mg["source"]["weights"] == "ema"
    tok = json.loads((exported / "tokenizer" / "config.json").read_text())
    assert tok["identity"] == {"sha256": mg["meta"]["tokenizer_sha256"], "weights": mg["meta"]["tokenizer_weights"]}
    assert tok["source"]["step"] == 2 and mg["source"]["step"] == 3


def test_exported_models_sample_bit_identically_to_their_checkpoints(exported, tiny_runs):
    ckpt_tok, ckpt_mg, ckpt_meta = load_models(str(tiny_runs["tokenizer"]), str(tiny_runs["maskgit"]))
    tok, mg, meta = load_pretrained(str(exported))
    assert decode_settings(meta["config"]) == decode_settings(ckpt_meta["config"]) == {"steps": 5, "schedule": "arccos"}
    attrs = torch.tensor([1, 0, 1, 0, 1])
    a = torch.cat(list(generate(ckpt_tok, ckpt_mg, 3, 2, seed=5, attrs=attrs, progress=False,
                                **decode_settings(ckpt_meta["config"]))))
    b = torch.cat(list(generate(tok, mg, 3, 2, seed=5, attrs=attrs, progress=False, **decode_settings(meta["config"]))))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    # the same through the one-model loaders, against the checkpoint's EMA weights
    raw_tok, _ = load_tokenizer(tiny_runs["tokenizer"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(VQModel.from_pretrained(exported / "tokenizer")(x)[0], raw_tok(x)[0])
    assert not MaskGIT.from_pretrained(exported / "maskgit").training
    # sample.py takes the folders in place of checkpoints
    run_script(ROOT / "sample.py", "--tokenizer", exported / "tokenizer", "--maskgit", exported / "maskgit",
               "--grid", exported.parent / "grid.png", "--grid-size", "4", "--attrs", "smiling=1")
    assert (exported.parent / "grid.png").stat().st_size > 0


def corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_loading_is_strict_with_one_clear_error(exported, tiny_runs, tmp_path):
    tok = exported / "tokenizer"
    first = next(iter(load_file(tok / "model.safetensors")))
    cases = {
        "missing": (lambda s: s.pop(first), "missing " + first),
        "extra": (lambda s: s.update(stray=torch.zeros(1)), "unexpected stray"),
        "shape": (lambda s: s.update({first: torch.zeros(1)}), f"{first} has shape (1,)"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(CheckpointError, match=re.escape("does not fit its config.json: " + message)):
            VQModel.from_pretrained(corrupt(tok, tmp_path / name, edit))
    # a pickle (the classic exploit vehicle) or any other non-safetensors file under the weights' name
    shutil.copytree(tok, tmp_path / "pickle")
    shutil.copy(tiny_runs["tokenizer"], tmp_path / "pickle" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        VQModel.from_pretrained(tmp_path / "pickle")
    with pytest.raises(CheckpointError, match="holds a 'tokenizer' model, but a 'maskgit' model"):
        MaskGIT.from_pretrained(tok)
    with pytest.raises(CheckpointError, match="not an exported model folder"):
        VQModel.from_pretrained(tmp_path)
    # the CLI: a tokenizer export of other weights than the MaskGIT was trained on -> one line, exit 2
    other = tmp_path / "other"
    shutil.copytree(tok, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "identity": {**cfg["identity"], "weights": "raw"}}))
    out = run_script(ROOT / "sample.py", "--tokenizer", other, "--maskgit", exported / "maskgit", "--grid",
                     tmp_path / "x.png", check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "was trained on codes of tokenizer" in out.stderr
    with pytest.raises(UserError, match="already an export"):
        export_models(str(tok), None, str(tmp_path / "again"))
