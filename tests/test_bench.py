"""The bench/ scripts run end to end at toy sizes and write what BENCHMARKS.md is built from.

No timing is asserted here (speed is measured by the scripts themselves, never by tests); these
tests keep `make bench` from breaking unnoticed, on a folder of generated face images instead of
the shared CelebA copy.
"""
import collections
import json

import pytest
from conftest import ROOT, run_script
from PIL import Image


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory):
    """100 procedural 64x64 faces written as PNG files: an image folder like the CelebA copy."""
    from data import DataConfig, build_dataset, to_uint8

    folder = tmp_path_factory.mktemp("faces")
    cfg = DataConfig(source="procedural", resolution=64, num_images=100)
    faces = [ds[i]["image"] for split in ("train", "val") for ds in [build_dataset(cfg, split)] for i in range(len(ds))]
    assert len(faces) == 100
    for i, x in enumerate(faces):
        Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def test_stage_two_bench(tmp_path):
    out = tmp_path / "s2.json"
    run_script(ROOT / "bench/bench_stage_two.py", "--configs", "tiny:tiny", "--batch-size", "2", "--repeats", "1",
               "--out", out)
    (r,) = json.loads(out.read_text())["results"]
    assert r["tokens_per_image"] == 64 and r["maskgit_preset"] == "tiny"
    t = r["train_steps_per_s"]  # the ratio is the two measured rates' (no speed is asserted: the machine is shared)
    assert t["ratio"] == pytest.approx(t["from_codes"] / t["encode_on_the_fly"])
    s = r["sampling_images_per_s"]
    assert set(s) >= {"maskgit_T8", "maskgit_T12", "ar_kv_cache", "bidirectional_n_passes"}
    assert s["speedup_T8_vs_ar_kv_cache"] == pytest.approx(s["maskgit_T8"] / s["ar_kv_cache"])
    assert r["ar_params_M"] == pytest.approx(r["maskgit_params_M"])  # the same size


def test_loader_bench(face_folder, tmp_path):
    out = tmp_path / "loader.json"
    run_script(ROOT / "bench/bench_loader.py", "--data", face_folder, "--batch-size", "2", "--rounds", "1",
               "--steps", "1", "--workers", "0", "--out", out)
    result = json.loads(out.read_text())
    assert result["meta"]["images"] == 90  # the seeded 90 / 10 split of the 100 files
    assert [r["mode"] for r in result["rows"]] == ["memory", "files w=0", "cache w=0"]
    assert all(r["loader_only_images_per_s"] > 0 for r in result["rows"][1:])


def test_fid_bench_random_weights(face_folder, tmp_path):
    out = tmp_path / "fid.json"
    run_script(ROOT / "bench/bench_fid.py", "--data", face_folder, "--n", "4", "--batch-size", "4", "--out", out)
    result = json.loads(out.read_text())
    assert result["setup"]["n"] == 4
    assert result["setup"]["weights"]["standard_weights"] is False  # random weights: a speed number, never a FID
    assert all(row["images_per_s"] == pytest.approx(row["images"] / row["seconds"]) for row in result["rows"].values())


def test_ablation_two_variants(face_folder, tmp_path):
    runs = tmp_path / "ablation"
    run_script(ROOT / "bench/ablation.py", "--data", face_folder, "--variants", "baseline", "opt_affine",
               "--steps", "2", "--batch-size", "4", "--log-every", "1", "--swd-patches", "8", "--runs-dir", runs,
               timeout=600)
    result = json.loads((runs / "ablation.json").read_text())
    assert result["meta"]["split"] == {"train": 90, "val": 10}
    for variant in ("baseline", "opt_affine"):
        r = result["results"][variant]
        assert r["returncode"] == 0, r.get("error")
        assert r["metrics"]["val_images"] == 10 and 0 < r["metrics"]["codes_used"] <= 1
        assert r["metrics"]["swd"] is not None and len(r["log"]) == 2
    assert result["results"]["opt_affine"]["vq"]["inplace_lr"] > 0 and result["results"]["baseline"]["vq"]["inplace_lr"] == 0
    assert (runs / "codes_used.png").stat().st_size > 0


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_vq_bench_one_size(tmp_path, precision):
    pytest.importorskip("vector_quantize_pytorch", reason="the peer is a bench-only dependency (make bench installs it)")
    out = tmp_path / "vq.json"
    run_script(ROOT / "bench/bench_vq.py", "--sizes", "256x16x64", "--reps", "1", "--precision", precision, "--out", out)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["n"], row["d"], row["k"]) == (256, 16, 64)
    assert row["ours"]["status"] == "ok" and row["peer"]["status"] == "ok"
    assert ("bf16" in result["meta"]["dtype"]) == (precision == "bf16")  # auto on a CPU: fp32
    # both layers pick the same nearest codes (in bf16 the peer's distances are rounded: a few differ)
    assert row["index_agreement"] > (0.99 if precision == "auto" else 0.9)


def test_vq_bench_precision_sets_the_input_dtype_and_autocast():
    """--precision reaches the measured step (without the peer: our layer alone): bf16 gives a bf16 input
    under autocast, fp32 neither, auto follows the device."""
    import argparse
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_vq

    seen = set()

    def step(impl, vq, z, g, autocast):
        seen.add((z.dtype, autocast))
        return bench_vq.step(impl, vq, z, g, autocast)

    for precision, expected in (("auto", (torch.float32, False)), ("fp32", (torch.float32, False)),
                                ("bf16", (torch.bfloat16, True))):
        seen.clear()
        a = argparse.Namespace(device="cpu", precision=precision, skip=["peer"], reps=1, n=64, d=8, k=16)
        result = bench_vq.worker_time(a, step_fn=step)
        assert result["ours"]["status"] == "ok" and "peer" not in result
        assert seen == {expected}
    assert bench_vq.bf16(argparse.Namespace(device="cuda", precision="auto"))
    assert not bench_vq.bf16(argparse.Namespace(device="cuda", precision="fp32"))


def test_vqtorch_bench_measures_ours_and_the_floor(tmp_path):
    """Without vqtorch (CI) the bench still times our layer and the GEMM floor and records why the vqtorch
    column is empty; with a clone given through VQTORCH_PATH, both layers make the same assignments."""
    import os

    vqtorch = os.environ.get("VQTORCH_PATH")
    out = tmp_path / "vqtorch.json"
    run_script(ROOT / "bench/bench_vqtorch.py", "--sizes", "256x16x64", "--search", "256x16x128", "--reps", "1",
               "--threads", "1", "--clock", "cpu", "--out", out, *(["--vqtorch", vqtorch] if vqtorch else []))
    result = json.loads(out.read_text())
    assert [(r["config"], r["n"], r["d"], r["k"]) for r in result["rows"]] == [
        ("plain", 256, 16, 64), ("trained", 256, 16, 64), ("search", 256, 16, 128)]
    for r in result["rows"]:
        assert r["ours"] > 0 and r["floor"] > 0
        assert r["mmap_threshold"] == str(32 * 2**20)  # the workers ran under the steady allocation policy
        if vqtorch:
            assert r["vqtorch"] > 0 and r["agree"] > 0.99
        else:
            assert "vqtorch" not in r and "minyoungg/vqtorch" in r["vqtorch_missing"]
    assert len(result["table"]) == 2 + 3


def test_train_bench_counts_flops_and_mfu(tmp_path):
    out = tmp_path / "train.json"
    run_script(ROOT / "bench/bench_train.py", "--tokenizer", "tiny", "--maskgit", "tiny", "--batch-size", "2",
               "--steps", "1", "--warmup", "0", "--peak-tflops", "1", "--out", out)
    tok, mg = json.loads(out.read_text())["rows"]
    assert tok["stage"] == "tokenizer (tiny)" and mg["stage"] == "MaskGIT (tiny)"
    for r in (tok, mg):
        assert r["gflop_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(64 * r["images_per_s"])
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
        assert r["peak_memory_gib"] is None  # CPU: no allocator peak to report
        assert r["compile_s"] is None


def test_train_bench_channels_last_converts_the_tokenizer_and_counts_the_same_flops(tmp_path):
    base, nhwc = tmp_path / "base.json", tmp_path / "nhwc.json"
    common = ("--tokenizer", "tiny", "--maskgit", "smoke", "--batch-size", "2", "--steps", "1", "--warmup", "0")
    run_script(ROOT / "bench/bench_train.py", *common, "--out", base)
    run_script(ROOT / "bench/bench_train.py", *common, "--channels-last", "--out", nhwc)
    base, nhwc = (json.loads(p.read_text()) for p in (base, nhwc))
    assert nhwc["meta"]["channels_last"] and not base["meta"]["channels_last"]
    for b, n in zip(base["rows"], nhwc["rows"]):  # the layout changes the kernels, not the work
        assert n["gflop_per_step"] == pytest.approx(b["gflop_per_step"])


def test_train_bench_compiles_after_counting_and_times_the_compiling_step_apart():
    """--compile: the FLOPs are those of the eager step (counted before compiling), the first compiled step
    is reported as compile_s and kept out of the median, and the step really runs the compiled forward."""
    import argparse
    import sys
    from contextlib import nullcontext

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train import measure

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def step(x):
        calls.append("forward" in vars(model))  # compile_forward sets the instance's forward
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def compile_forward():
        model.forward = torch.compile(model.forward, backend="eager")  # dynamo without a C++ compiler: fast

    a = argparse.Namespace(warmup=1, steps=2, batch_size=4, precision="fp32", peak_tflops=None)
    r = measure("toy", step, torch.randn(4, 8), 10, 1, a, torch.device("cpu"), nullcontext, compile_forward)
    assert calls == [False, True, True, True, True]  # counted eager; then the compiling step, warm-up, 2 timed
    per_layer = 2 * 4 * 8 * 16  # one (4 x 8) x (8 x 16) matmul, or its transpose
    # forward: 2 matmuls; backward: both weights' gradients and the second layer's input gradient (x needs none)
    assert r["gflop_per_step"] * 1e9 == pytest.approx(5 * per_layer)
    assert r["compile_s"] > 0 and len(r["step_s_all"]) == 2


def test_generation_ladder_runs_resumes_and_reports(face_folder, tmp_path):
    """One rung, one seed, the smoke budget: every stage runs through the project's CLIs, the table has
    the rung and the real-image floor, and a second call finds every stage done (resume)."""
    runs = tmp_path / "ladder"
    args = ("--setting", "smoke", "--data", face_folder, "--rungs", "opt_affine", "opt_affine@arccos", "--seeds", "0",
            "--runs-dir", runs)
    run_script(ROOT / "bench/ladder.py", *args, timeout=600)
    result = json.loads((runs / "ladder.json").read_text())
    assert set(result["results"]) == {"opt_affine", "opt_affine@arccos"}
    # the MaskGIT variant trains on the same tokenizer and codes (linked), with its own mask schedule
    variant = runs / "opt_affine@arccos" / "seed0"
    assert (variant / "tokenizer").resolve() == (runs / "opt_affine" / "seed0" / "tokenizer").resolve()
    assert "train_tokenizer.py" not in (variant / "output.log").read_text()  # the base rung's stage is not re-run
    assert "pretokenize.py" not in (variant / "output.log").read_text()
    mg_cfg = json.loads((variant / "maskgit" / "config.json").read_text())
    assert mg_cfg["masking"]["schedule"] == "arccos"
    assert result["meta"]["rungs"]["opt_affine@arccos"]["maskgit"]["overrides"] == ["masking.schedule=arccos"]
    for rung in ("opt_affine",):
        r = result["results"][rung]["seed0"]
        assert 0 < r["codes_used"] <= 1 and 1 <= r["perplexity"] <= r["num_codes"] and r["swd"] > 0 and r["rswd"] > 0
        assert json.loads((runs / rung / "seed0" / "stages.json").read_text()) == [
            "tokenizer", "codes", "maskgit", "sample", "score", "recon"]
        assert len(list((runs / rung / "seed0" / "samples").glob("*.png"))) == 8
    assert result["meta"]["floors"]["swd"] > 0 and result["table"][-1].startswith("| real images")
    assert result["meta"]["rungs"]["opt_affine"]["inplace_lr"] > 0
    for name in ("samples.png", "codes_used.png", "seeds.png", "index.html", "ladder.md"):
        assert (runs / name).stat().st_size > 0
    assert result["results"]["opt_affine"]["seed0"]["ste_error"] > 0
    assert "real images (floor)" in result["table"][-1] and "| 0.00 |" in result["table"][-1]  # paired recon SWD
    assert not (ROOT / "bench" / "results" / "ladder_smoke.json").exists()  # the smoke setting keeps no record
    again = run_script(ROOT / "bench/ladder.py", *args, timeout=600)
    assert "training" not in again.stderr and "tokenizer ..." not in again.stderr  # nothing re-run


def test_ladder_paired_statistics_and_verdicts():
    """Paired by seed: the interval is the Student t interval of the per-seed differences, and a verdict
    is given only where it excludes 0 (checked against scipy's paired t-test and a hand computation)."""
    import sys

    from scipy import stats

    sys.path.insert(0, str(ROOT / "bench"))
    from ladder_report import paired, verdict

    ref = {f"seed{i}": {"swd": v} for i, v in enumerate([40.0, 42.0, 41.0, 43.0, 44.0])}
    better = {f"seed{i}": {"swd": v} for i, v in enumerate([38.0, 40.5, 39.0, 41.5, 42.0])}  # ~ -1.8 each
    noisy = {f"seed{i}": {"swd": v} for i, v in enumerate([43.0, 40.0, 42.0, 41.0, 45.0])}
    c = paired(better, ref, "swd")
    diffs = [-2.0, -1.5, -2.0, -1.5, -2.0]
    assert c["n"] == 5 and c["diffs"] == diffs and c["mean"] == pytest.approx(-1.8)
    half = stats.t.ppf(0.975, 4) * stats.tstd(diffs) / 5**0.5
    assert c["ci"] == pytest.approx([-1.8 - half, -1.8 + half])
    assert c["p"] == pytest.approx(stats.ttest_rel([v["swd"] for v in better.values()],
                                                   [v["swd"] for v in ref.values()]).pvalue)
    assert verdict(c) == "better" and verdict(c, lower_is_better=False) == "worse"
    assert verdict(paired(noisy, ref, "swd")) == "not separated"
    assert paired({"seed0": {"swd": 1.0}}, ref, "swd") is None  # one common seed: no interval
    assert verdict(None).startswith("fewer than 2")
    # only the seeds both rungs have are paired
    assert paired({**better, "seed9": {"swd": 0.0}}, ref, "swd")["n"] == 5


def test_ladder_budget_variant_pairs_within_its_budget_and_ranks_both():
    """A MaskGIT budget variant (<rung>@mg4x) is compared with the reference rung at the same budget, and
    the budget table ranks the rungs at both budgets on the seeds run at both (here the ranking flips)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from ladder import MG_VARIANTS, reference_of
    from ladder_report import budget_table, comparisons

    assert MG_VARIANTS["mg4x"]["mg_steps"] == 4
    assert reference_of("baseline@mg4x") == "l2_replace@mg4x" and reference_of("baseline@arccos") == "l2_replace"
    assert reference_of("baseline") == "l2_replace"
    runs = lambda *v: {f"seed{i}": {"swd": x} for i, x in enumerate(v)}  # noqa: E731
    results = {"l2_replace": runs(40.0, 41.0, 42.0, 43.0), "baseline": runs(45.0, 47.0, 46.0, 48.0),
               "l2_replace@mg4x": runs(30.0, 31.0, 32.0), "baseline@mg4x": runs(28.0, 29.5, 30.0)}
    raw, lines = comparisons(results, {r: reference_of(r) for r in results})
    assert raw["baseline"]["verdict"] == "worse" and raw["baseline@mg4x"]["verdict"] == "better"
    assert raw["baseline@mg4x"]["swd"]["diffs"] == [-2.0, -1.5, -2.0]  # against l2_replace@mg4x, not l2_replace
    table = budget_table(results, "mg4x", "4x MaskGIT steps")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table if line.startswith("| ")}
    # the setting's budget on the three seeds both have: baseline 46.0 (rank 2, worse), l2 41.0 (rank 1)
    assert rows["baseline"] == ["3", "46.00", "2", "worse", "29.17", "1", "better"]
    assert rows["+l2 +replace"] == ["3", "41.00", "1", "reference", "31.00", "2", "reference"]
    assert budget_table({"l2_replace": results["l2_replace"]}, "mg4x", "x") == []  # nothing at the longer budget
    # a rung with a seed more than the others at the longer budget is ranked on the common seeds only
    extra = {**results, "baseline@mg4x": runs(28.0, 29.5, 30.0, 10.0)}  # seed3 at both budgets, for baseline only
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in budget_table(extra, "mg4x", "x") if line.startswith("| ")}
    assert rows["baseline"][:2] == ["3", "46.00"] and rows["baseline"][4] == "29.17"
    # a MaskGIT variant on the same tokenizers: their columns are identical, said so (not "p = 1.000")
    same = {"l2_replace": {"seed0": {"swd": 40.0, "psnr": 22.0}, "seed1": {"swd": 41.0, "psnr": 21.0}},
            "l2_replace@arccos": {"seed0": {"swd": 38.0, "psnr": 22.0}, "seed1": {"swd": 38.5, "psnr": 21.0}}}
    _, lines = comparisons(same, {r: reference_of(r) for r in same})
    assert "identical on every seed" in lines[-1] and "p = 1.000" not in lines[-1]


def test_ladder_record_merges_runs_of_several_processes(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from ladder import add_to_record, load_record

    path = tmp_path / "ladder_cpu.json"
    mine, theirs = load_record(path, "cpu", "/x/faces"), load_record(path, "cpu", "/x/faces")
    add_to_record(path, mine, "baseline", "seed0", {"swd": 1.0})
    add_to_record(path, theirs, "l2_replace", "seed0", {"swd": 2.0})  # loaded before the first write
    runs = json.loads(path.read_text())["runs"]
    assert runs == {"baseline": {"seed0": {"swd": 1.0}}, "l2_replace": {"seed0": {"swd": 2.0}}}
    assert load_record(path, "cpu", "/y/faces")["runs"] == runs  # the folder's name identifies the data
    with pytest.raises(SystemExit, match="record"):
        load_record(path, "cpu_long", "/x/faces")


def test_ladder_processes_share_runs_through_locks(tmp_path):
    """A run directory locked by a live process is skipped; one left by a dead process is taken over."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from ladder import claim

    assert claim(tmp_path) and not claim(tmp_path)  # this (live) process holds it now
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(str(dead.pid))
    assert claim(tmp_path) and (tmp_path / ".lock").read_text() == str(__import__("os").getpid())


def test_ladder_copies_started_together_write_the_reference_images_once(face_folder, tmp_path):
    """Two ladder copies that start at the same moment both write the held-out and train reference sets
    (each in its own folder, renamed into place): both succeed, no set is left half-written or deleted
    under the other, and a set of another size is replaced."""
    import subprocess
    import sys

    out = tmp_path / "reference"
    (out / "val").mkdir(parents=True)
    (out / "val" / ".done").write_text("3")  # an older, smaller set
    code = ("import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from ladder import write_references; "
            f"print(write_references({str(face_folder)!r}, {{'resolution': 32, 'reference': 8}}, Path({str(out)!r})))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-500:] for r in results]
    for split in ("val", "train"):
        assert (out / split / ".done").read_text() == "8"
        assert sorted(f.name for f in (out / split).glob("*.png")) == [f"{i:05d}.png" for i in range(8)]
    assert sorted(f.name for f in out.iterdir()) == ["train", "val"]  # no folder of either copy left behind


def test_families_bench_one_size(tmp_path):
    pytest.importorskip("vector_quantize_pytorch", reason="the peer is a bench-only dependency (make bench installs it)")
    out = tmp_path / "families.json"
    run_script(ROOT / "bench/bench_families.py", "--cases", "simvq:256x16x64", "--reps", "1", "--out", out)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["family"], row["n"], row["d"], row["k"]) == ("simvq", 256, 16, 64)
    assert row["ours"]["status"] == "ok" and row["peer"]["status"] == "ok"
    assert row["index_agreement"] > 0.99  # the peer's basis and map were made ours: same assignments


def test_kmeans_bench_toy_size(tmp_path):
    out = tmp_path / "kmeans.json"
    run_script(ROOT / "bench/bench_kmeans.py", "--sizes", "64", "--points-per-code", "4", "--iters", "1", "--out", out)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["k"], row["n"]) == (64, 256)
    for method in ("one_at_a_time", "batched"):
        r = row[method]
        assert r["complete"] and 0 < r["error_lloyd"] <= r["error_seeded"]  # a Lloyd step never raises the error


def test_ar_baseline_cache_gives_the_uncached_causal_logits():
    """The AR bench baseline: decoding with the KV cache (one token at a time, or a chunk after a prefix)
    gives the logits of the uncached causal forward pass, and a later token never changes an earlier logit."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from ar_baseline import CausalTransformer, ar_decode

    from transformer import MaskGITConfig

    torch.manual_seed(0)
    model = CausalTransformer(MaskGITConfig(num_codes=16, grid=(3, 4), dim=32, depth=2, heads=2)).eval()
    inputs = torch.cat([torch.full((2, 1), model.start_id), torch.randint(0, 16, (2, 11))], dim=1)  # (B, N)
    with torch.no_grad():
        full = model(inputs)  # (2, 12, 16)
        cache = model.new_cache(2)
        stepwise = torch.cat([model(inputs[:, i:i + 1], cache, start=i) for i in range(12)], dim=1)
        cache = model.new_cache(2)
        chunked = torch.cat([model(inputs[:, :5], cache), model(inputs[:, 5:9], cache, start=5),
                             model(inputs[:, 9:], cache, start=9)], dim=1)
        changed = inputs.clone()
        changed[:, 7] = (changed[:, 7] + 1) % 16
        later = model(changed)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(later[:, :7], full[:, :7]) and not torch.allclose(later[:, 7:], full[:, 7:])
    gen = torch.Generator()
    a, b = ar_decode(model, 3, gen.manual_seed(1)), ar_decode(model, 3, gen.manual_seed(1))
    assert a.shape == (3, 12) and torch.equal(a, b) and 0 <= a.min() and a.max() < 16


def test_cuda_search_bench_refuses_clearly_without_cuda():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the bench would run")
    out = subprocess.run([sys.executable, str(ROOT / "bench/bench_search_cuda.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.strip().startswith("error: bench_search_cuda.py needs a CUDA GPU")


def test_gpu_rows_script_refuses_clearly_without_cuda(tmp_path):
    """bench/gpu_rows.sh is the one command for the GPU rows; without CUDA it says so and exits 2, writing nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable, "OUT": str(tmp_path / "gpu")}
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_rows.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: bench/gpu_rows.sh needs a CUDA GPU")
    assert not (tmp_path / "gpu").exists()


def test_profile_step_profiles_both_training_loops(tmp_path):
    """bench/profile_step.py runs each training script's loop under the profiler: an op table per stage
    whose shares add up to at most 1, and the matmul / convolution ops among the top ones."""
    out = tmp_path / "profile.json"
    run_script(ROOT / "bench/profile_step.py", "--smoke", "--skip", "1", "--steps", "2", "--top", "40", "--out", out)
    tok, mg = json.loads(out.read_text())["rows"]
    assert (tok["stage"], mg["stage"]) == ("tokenizer", "maskgit")
    for r, op in ((tok, "aten::mkldnn_convolution"), (mg, "aten::addmm")):
        assert r["steps_per_s"] > 0 and 0 < sum(e["share"] for e in r["top"]) <= 1 + 1e-9
        assert op in [e["op"] for e in r["top"]]


def test_decoding_sweep_selects_on_one_half_and_reports_the_other(tiny_runs, tmp_path):
    """The sweep runs every (sampler, T) with its seeds, picks the best per T on the selection half and
    seeds, reports the other half and seeds, and draws the quality-vs-time plot."""
    import numpy as np

    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = tmp_path / "sweep"
    run_script(ROOT / "bench/decoding.py", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"],
               "--ref-images", ref, "--samplers", "confidence", "halton", "--steps", "1", "3", "--samples", "4",
               "--seeds", "0", "1", "--select-seeds", "7", "--batch-size", "3", "--out", out, timeout=600)
    result = json.loads((out / "decoding.json").read_text())
    assert {(r["sampler"], r["steps"]) for r in result["rows"]} == {(s, t) for s in ("confidence", "halton") for t in (1, 3)}
    for r in result["rows"]:
        assert len(r["swd_per_seed"]) == 2 and r["swd"] > 0 and r["s_per_image"] > 0
    for t in ("1", "3"):  # the best is the lowest selection SWD, not the lowest reported one
        rows = [r for r in result["rows"] if r["steps"] == int(t)]
        assert result["best"][t] == min(rows, key=lambda r: r["select_swd"])["sampler"]
    assert (out / "pareto.png").stat().st_size > 0 and "(best, chosen on selection)" in (out / "decoding.md").read_text()
    bad = run_script(ROOT / "bench/decoding.py", "--tokenizer", tiny_runs["tokenizer"], "--maskgit",
                     tiny_runs["maskgit"], "--ref-images", ref, "--seeds", "0", "--select-seeds", "0", check=False)
    assert bad.returncode != 0 and "disjoint" in bad.stderr


def test_precision_bench_pairs_bf16_with_fp32_by_seed(tmp_path):
    out = tmp_path / "precision"
    run_script(ROOT / "bench/bench_precision.py", "--kinds", "fsq", "--seeds", "0", "--steps", "1", "--out", out, "--jobs", "2",
               "--floor-kinds", "fsq", "--", "data.num_images=16", "optim.batch_size=4", timeout=600)
    rows = json.loads((out / "precision.json").read_text())["rows"]
    assert {r["metric"] for r in rows} == {"codes_used", "perplexity", "psnr"}
    for r in rows:
        assert len(r["fp32"]) == len(r["bf16"]) == 1 and r["diff"] == pytest.approx(r["bf16"][0] - r["fp32"][0]
                                                                                   if r["metric"] == "psnr" else
                                                                                   (r["bf16"][0] - r["fp32"][0]) / r["fp32"][0])
    for precision in ("no", "bf16"):  # the two runs differ in their precision only
        cfg = json.loads((out / "fsq" / precision / "seed0" / "config.json").read_text())
        assert cfg["optim"]["mixed_precision"] == precision and cfg["optim"]["seed"] == 0
    # the noise floor: the fp32 run again, with another thread count
    (floor_run,) = (out / "fsq").glob("no_threads*/seed0")
    assert json.loads((floor_run / "config.json").read_text())["optim"]["mixed_precision"] == "no"
    fp32 = json.loads((out / "fsq/no/seed0/final_metrics.json").read_text())
    floor = json.loads((floor_run / "final_metrics.json").read_text())
    psnr = next(r for r in rows if r["metric"] == "psnr")
    assert psnr["floor"] == [pytest.approx(floor["psnr"] - fp32["psnr"])]


def test_host_read_counter_sees_every_kind_of_read():
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from count_syncs import count_host_reads

    x = torch.arange(6.0)
    with count_host_reads() as counts:
        x.sum().item()
        bool(x.max() > 2)
        x.tolist()
        torch.nonzero(x)
        x[x > 2]  # boolean-mask indexing: a data-dependent shape
        x[1:3] + x[torch.tensor([0, 1])]  # plain and integer indexing: no read
        float(x[0])
    kinds = collections.Counter(kind for kind, _ in counts.elements())
    assert kinds == {"item": 1, "__bool__": 1, "tolist": 1, "torch.nonzero": 1, "boolean index": 1, "__float__": 1}
    assert all(where.startswith("tests/test_bench.py:") for _, where in counts)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and torch.Tensor.item.__name__ == "item"  # restored


def test_inspect_tokenizer_reports_both_weights_and_the_latents_scale(tiny_runs):
    import math
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from inspect_tokenizer import inspect

    from core.config import from_dict
    from data import DataConfig, build_dataset
    from tokenizer import load_tokenizer

    r = inspect(str(tiny_runs["tokenizer"]), n=6)
    # PSNR with the EMA weights, computed here independently on the same 6 validation images
    model, _ = load_tokenizer(tiny_runs["tokenizer"])
    cfg = torch.load(tiny_runs["tokenizer"], weights_only=True)["config"]["data"]
    x = torch.stack([build_dataset(from_dict(DataConfig, cfg), "val", train=False)[i]["image"] for i in range(6)])
    with torch.no_grad():
        mse = ((model(x)[0].clamp(-1, 1) - x) / 2).square().mean().item()
    assert r["psnr_ema"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert r["psnr_raw"] != r["psnr_ema"]  # a 3-step run: the EMA is not the trained weights
    assert r["z_norm"] > 0 and r["code_norm"] == pytest.approx(1.0, rel=1e-4)  # the tiny preset l2-normalizes its codes
    assert 0 <= r["rel_error"] < 4


def test_demo_pipeline_bench_pairs_two_checkouts_by_seed(tmp_path):
    """--pipeline runs demo.py --seed of both checkouts; with the same code on both sides every pair is the same
    run (so a difference between sides can only come from the code), and the seed reaches the training."""
    out = tmp_path / "pipeline"
    run_script(ROOT / "bench/bench_demo.py", "--pipeline", "--before", ROOT, "--scale", "smoke", "--seeds", "0", "1",
               "--jobs", "2", "--out", out, timeout=900)
    res = json.loads((out / "bench_demo_pipeline.json").read_text())
    rows = {r["metric"]: r for r in res["rows"]}
    assert set(rows) == {"swd", "psnr", "val_accuracy", "tokenizer_s", "maskgit_s", "total_s"}
    for metric in ("swd", "psnr", "val_accuracy"):
        assert rows[metric]["before"] == rows[metric]["after"], metric
        assert rows[metric]["diff"] == 0 and rows[metric]["verdict"].startswith("no worse"), metric
    for metric in ("swd", "psnr"):
        assert rows[metric]["before"][0] != rows[metric]["before"][1], metric
    for side in ("before", "after"):
        for seed in (0, 1):
            for stage in ("tokenizer", "maskgit"):
                cfg = json.loads((out / side / f"seed{seed}" / stage / "config.json").read_text())
                assert cfg["optim"]["seed"] == seed
            # the samples are drawn with seed + 1 (the grid with seed): sample.py's record
            assert json.loads((out / side / f"seed{seed}" / "samples/samples.json").read_text())["seed"] == seed + 1


def test_demo_pipeline_verdicts_use_the_before_seeds_spread():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_demo import pipeline_table

    before = [{"swd": v, "psnr": 22.0 + i / 10, "val_accuracy": 0.25, "tokenizer_s": 100.0, "maskgit_s": 200.0,
               "total_s": 400.0} for i, v in enumerate([50.0, 52.0, 54.0])]  # swd spread (std) 2.0
    within = [{**r, "swd": r["swd"] + 1.5, "psnr": r["psnr"] - 1.0, "total_s": 200.0} for r in before]
    _, rows = pipeline_table(before, within, [0, 1, 2])
    rows = {r["metric"]: r for r in rows}
    assert rows["swd"]["diff"] == pytest.approx(1.5) and rows["swd"]["verdict"].startswith("no worse")
    assert rows["psnr"]["verdict"] == "worse"  # psnr: higher is better, 1 dB lower against a spread of 0.1
    assert rows["total_s"]["verdict"] == "0.50x the time"
    worse = [{**r, "swd": r["swd"] + 2.5} for r in before]
    assert {r["metric"]: r for r in pipeline_table(before, worse, [0, 1, 2])[1]}["swd"]["verdict"] == "worse"


def test_demo_pipeline_shares_a_tokenizer_only_when_this_checkout_would_train_the_same_one(tmp_path):
    import sys

    from core.config import apply_overrides, to_dict
    from tokenizer.train_config import PRESETS

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_demo import share_tokenizer

    cfg = to_dict(apply_overrides(PRESETS["smoke"], ["optim.seed=1"]))
    before = tmp_path / "before" / "seed1"
    (before / "tokenizer").mkdir(parents=True)
    (before / "tokenizer" / "checkpoint.pt").write_bytes(b"weights")
    (before / "tokenizer" / "config.json").write_text(json.dumps(cfg))
    share_tokenizer(before, tmp_path / "after" / "seed1", "smoke", 1)
    assert (tmp_path / "after/seed1/tokenizer/checkpoint.pt").read_bytes() == b"weights"
    with pytest.raises(SystemExit, match=r"train different tokenizers \(optim.seed: 1 before, 2 here\)"):
        share_tokenizer(before, tmp_path / "after" / "seed2", "smoke", 2)
    cfg["optim"]["steps"] += 1
    (before / "tokenizer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=r"optim.steps"):
        share_tokenizer(before, tmp_path / "other" / "seed1", "smoke", 1)
    assert not (tmp_path / "other").exists()
