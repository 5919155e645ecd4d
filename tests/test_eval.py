"""The FID tooling (eval/), checked against torch-fidelity itself.

The real Inception weights cannot be downloaded here, so a randomly initialised torch-fidelity
InceptionV3 is saved once per module and used through the "unverified weights" path; every number
it gives must be labelled as not-FID. Image sets are tiny (12 images at 32x32): Inception resizes to
299x299 anyway, so cost is per image, ~0.15 s each on one CPU core, plus ~3 s per 2048-d FID.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval.__main__ as eval_main
from eval.__main__ import main
from eval.errors import EvalError, ImageInputError, ReferenceMismatchError, WeightsError
from eval.images import checked_float, checked_uint8, open_folder, open_images, open_npz
from eval.inception import (
    ENV_WEIGHTS,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    InceptionExtractor,
    find_weights,
    make_random_weights,
    verify_weights,
)
from eval.reference import ReferenceStats, load_reference, save_reference
from eval.score import score_images, score_reconstructions
from eval.stats import FeatureStats, frechet_distance, kernel_inception_distance
from eval.swd import SWDConfig, swd
from transformer.pipeline import DECODE_DEFAULTS

N, RES = 12, 32
KID_FLAGS = {"subsets": 10, "subset_size": 8}
REPO = Path(__file__).resolve().parents[1]


def _smooth_images(n: int, shift: float, seed: int) -> np.ndarray:
    """(n, RES, RES, 3) uint8: bilinear-upsampled 6x6 noise plus a brightness shift."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(RES, RES), mode="bicubic", align_corners=False) + shift
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _openblas_thread_setter():
    """numpy's bundled OpenBLAS ``set_num_threads`` (and getter) via ctypes, or None if not found."""
    import ctypes
    import glob

    libs = glob.glob(str(Path(np.__file__).parents[1] / "numpy.libs" / "libscipy_openblas*.so"))
    try:
        lib = ctypes.CDLL(libs[0])
        return lib.scipy_openblas_set_num_threads64_, lib.scipy_openblas_get_num_threads64_
    except (IndexError, OSError, AttributeError):
        return None


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """One torch and one BLAS thread while this module runs, restored afterwards.

    On a 2-core machine shared with other processes, two threads per library wait on each other at
    every barrier: measured 2-5x slower Inception forwards and 3-6x slower 2048-d eigendecompositions.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    blas = _openblas_thread_setter()
    blas_threads = blas[1]() if blas else None
    if blas:
        blas[0](1)
    yield
    torch.set_num_threads(torch_threads)
    if blas:
        blas[0](blas_threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random_weights(tmp_path_factory.mktemp("weights") / "random-inception.pth", seed=0)


@pytest.fixture(scope="module")
def extractor(weights) -> InceptionExtractor:
    return InceptionExtractor.load(weights, allow_unverified=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of N images; 'a' mixes modes and formats (grey PNG, JPG) as real folders do."""
    root = tmp_path_factory.mktemp("images")
    for name, shift, seed in (("a", 0.0, 1), ("b", 0.2, 2)):
        (root / name).mkdir()
        for i, arr in enumerate(_smooth_images(N, shift, seed)):
            img = Image.fromarray(arr)
            if name == "a" and i == 0:
                img.convert("L").save(root / name / f"{i:03d}.png")
            elif name == "a" and i == 1:
                img.save(root / name / f"{i:03d}.jpg", quality=90)
            else:
                img.save(root / name / f"{i:03d}.png")
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def torch_fidelity_metrics(folders, weights) -> dict:
    import torch_fidelity

    a, b = folders
    return torch_fidelity.calculate_metrics(
        input1=str(b), input2=str(a), cuda=False, fid=True, kid=True, prc=True, feature_extractor="inception-v3-compat",
        feature_layer_prc="2048", feature_extractor_weights_path=str(weights),
        kid_subsets=KID_FLAGS["subsets"], kid_subset_size=KID_FLAGS["subset_size"], cache=False, verbose=False,
        save_cpu_ram=True)


@pytest.fixture(scope="module")
def cli_run(folders, weights, tmp_path_factory) -> dict:
    """`python -m eval ref` on folder a, then `score` of folder b: the report JSON, and the paths."""
    a, b = folders
    out = tmp_path_factory.mktemp("cli")
    flags = ["--weights", str(weights), "--allow-unverified-weights", "--device", "cpu"]
    assert main(["ref", "--images", str(a), "--out", str(out / "ref_a.npz"), *flags]) == 0
    written = (out / "ref_a.npz").stat().st_mtime_ns
    assert main(["ref", "--images", str(a), "--out", str(out / "ref_a.npz"), *flags]) == 0  # cached: reused
    assert (out / "ref_a.npz").stat().st_mtime_ns == written
    assert main(["ref", "--images", str(b), "--out", str(out / "ref_a.npz"), *flags]) == 2  # other protocol
    with pytest.warns(UserWarning, match="2048"):
        assert main(["score", str(b), "--ref", str(out / "ref_a.npz"), "--run-dir", str(out), "--name", "b",
                     "--kid-subsets", str(KID_FLAGS["subsets"]), "--kid-subset-size", str(KID_FLAGS["subset_size"]),
                     "--swd-max-images", str(N), *flags]) == 0
    return {"report": json.loads((out / "b.json").read_text()), "md": (out / "b.md").read_text(),
            "ref": out / "ref_a.npz", "dir": out}


# --------------------------------------------------------------------------- agreement with torch-fidelity
def test_fid_matches_torch_fidelity(cli_run, torch_fidelity_metrics):
    ours = cli_run["report"]["metrics"]["FID(unverified-weights)"]
    theirs = torch_fidelity_metrics["frechet_inception_distance"]
    assert theirs > 1.0  # the two folders differ, so agreement is not agreement on ~0
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_kid_matches_torch_fidelity(cli_run, torch_fidelity_metrics):
    metrics = cli_run["report"]["metrics"]
    assert metrics["KID(unverified-weights)_mean"] == pytest.approx(
        torch_fidelity_metrics["kernel_inception_distance_mean"], rel=1e-4)
    assert metrics["KID(unverified-weights)_std"] == pytest.approx(
        torch_fidelity_metrics["kernel_inception_distance_std"], rel=1e-3)


def test_precision_recall_match_torch_fidelity(cli_run, torch_fidelity_metrics):
    """'auto' adds improved precision/recall when the reference kept its features; the values are
    torch-fidelity's full pipeline's (generated = the scored folder, real = the reference)."""
    metrics = cli_run["report"]["metrics"]
    assert metrics["precision(unverified-weights)"] == pytest.approx(torch_fidelity_metrics["precision"], abs=1e-6)
    assert metrics["recall(unverified-weights)"] == pytest.approx(torch_fidelity_metrics["recall"], abs=1e-6)
    assert not {"precision", "recall"} & set(metrics)  # random weights never get the standard names


def test_precision_recall_by_hand():
    """k-NN radii computed independently: precision = generated points inside some real point's ball of its
    k-th neighbour distance; recall the other way round."""
    from eval.score import precision_recall

    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(0.7, 1.3, size=(30, 5)).astype(np.float32)

    def inside(points, centres, k=3):
        d_cc = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        radius = np.sort(d_cc, axis=1)[:, k]  # k-th neighbour (index 0 is the point itself)
        d = np.linalg.norm(points[:, None] - centres[None], axis=-1)
        return float((d <= radius[None]).any(1).mean())

    pr = precision_recall(gen, real)
    assert pr["precision"] == pytest.approx(inside(gen, real), abs=1e-6)
    assert pr["recall"] == pytest.approx(inside(real, gen), abs=1e-6)
    assert 0 < pr["precision"] < 1 and 0 < pr["recall"] < 1
    with pytest.raises(EvalError, match="more than 3"):
        precision_recall(gen[:3], real)


def test_unverified_weights_are_never_called_fid(cli_run):
    report = cli_run["report"]
    assert report["standard_weights"] is False
    assert report["protocol"]["extractor"]["standard_weights"] is False
    assert not {"FID", "KID_mean", "KID_std"} & set(report["metrics"])
    assert "NOT FID" in cli_run["md"] and "| FID |" not in cli_run["md"]
    sidecar = json.loads(cli_run["ref"].with_suffix(".json").read_text())
    assert sidecar["protocol"]["resolution"] == RES and sidecar["count"] == N
    assert sidecar["extractor"]["standard_weights"] is False
    assert any("2048" in note for note in report["notes"])  # small-sample warning kept with the numbers
    assert set(report["protocol"]["swd"]) >= {"patch_size", "patches_per_image", "dirs_per_repeat", "images"}
    assert report["metrics"]["SWD_x1e3_mean"] > 0


def test_kid_replays_torch_fidelity_subsets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.RandomState(0)
    f1 = rng.rand(40, 64).astype(np.float32)
    f2 = (rng.rand(30, 64) + 0.05).astype(np.float32)
    ours = kernel_inception_distance(f1, f2, subsets=7, subset_size=20)
    theirs = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7,
                                    kid_subset_size=20, verbose=False)
    assert ours["mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)


@pytest.mark.parametrize("n", [20, 200])  # rank-deficient and full-rank covariances
def test_frechet_matches_torch_fidelity_formula(n):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.RandomState(n)
    x, y = rng.randn(n, 64), rng.randn(n, 64) @ rng.randn(64, 64) * 0.3 + 0.1
    stats = [{"mu": z.mean(0), "sigma": np.cov(z, rowvar=False)} for z in (x, y)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    assert ours == pytest.approx(theirs, rel=1e-6)


# ------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_streaming_stats_equal_numpy(batch):
    rng = np.random.RandomState(batch)
    x = rng.randn(150, 32) * rng.rand(32) * 3 + 1e3  # large mean: a naive E[xx^T] - mu mu^T would cancel
    stats = FeatureStats(32, keep_features=100, seed=0)
    for i in range(0, len(x), batch):
        stats.update(x[i:i + batch])
    assert stats.count == 150
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)
    kept = stats.features()
    assert kept.shape == (100, 32) and kept.dtype == np.float32
    rows = {r.tobytes() for r in x.astype(np.float32)}
    assert all(r.tobytes() in rows for r in kept) and len({r.tobytes() for r in kept}) == 100


def test_frechet_closed_form_for_diagonal_gaussians():
    rng = np.random.RandomState(0)
    mu1, mu2 = rng.randn(16), rng.randn(16)
    s1, s2 = rng.rand(16) + 0.1, rng.rand(16) * 2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_refuses_a_non_covariance():
    sigma = np.diag([1.0, 2.0, -0.5])
    with pytest.raises(EvalError, match="not positive"):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------------------------------- SWD
def test_swd_zero_for_identical_sets_and_grows_with_noise():
    base = torch.from_numpy(_smooth_images(24, 0.0, seed=3)).permute(0, 3, 1, 2).contiguous()
    config = SWDConfig(max_images=24, patches_per_image=64, seed=5)
    values = []
    for sigma in (0, 8, 16, 32, 64):
        noise = sigma * torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
        noisy = (base.float() + noise).round().clamp(0, 255).to(torch.uint8)
        values.append(swd([base], [noisy], RES, config)["mean"])
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert swd(base.split(5), base.split(24), RES, config)["mean"] == 0.0  # batching does not matter
    assert all(a < b for a, b in zip(values, values[1:])), values
    again = swd([base], [base.flip(-1)], RES, config)
    assert again == swd([base], [base.flip(-1)], RES, config)  # deterministic for a seed
    assert set(again["levels"]) == {"32", "16"}


# --------------------------------------------------------------------------------- reconstruction FID core
def test_rfid_identity_reconstruction_gives_zero(folders, extractor):
    a, _ = folders
    batches = [checked_float(b) for b in open_folder(a).batches(3)][:2]  # 6 validation images, float [-1, 1]

    def identity(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        return x.clone()

    with pytest.warns(UserWarning, match="2048"):
        result = score_reconstructions(batches, identity, extractor, metrics=("fid", "swd"),
                                       swd_config=SWDConfig(max_images=6))
    fid = result.metrics["FID(unverified-weights)"]
    assert abs(fid) < 1e-6 and result.metrics["SWD_x1e3_mean"] == 0.0
    assert result.protocol["samples"]["count"] == 6 and result.standard_weights is False


# ------------------------------------------------------------------------------------------- bad inputs
def test_missing_weights_cli_error(tmp_path, folders):
    _, b = folders
    env = {**os.environ, ENV_WEIGHTS: str(tmp_path / "nowhere" / WEIGHTS_FILENAME), "HOME": str(tmp_path),
           "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "eval", "score", str(b), "--ref", str(tmp_path / "r.npz")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert WEIGHTS_FILENAME in line and "6726825d" in line and WEIGHTS_URL in line and ENV_WEIGHTS in line


def test_weights_lookup_order_and_verification(tmp_path, monkeypatch, weights):
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="hub/checkpoints"):  # nothing anywhere, no download by default
        find_weights()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes()[: 1 << 20])  # a truncated file under the standard name
    assert find_weights() == cached
    monkeypatch.setenv(ENV_WEIGHTS, str(weights))
    assert find_weights() == weights  # the environment variable wins over the cache
    assert find_weights(cached) == cached  # an explicit path wins over both
    with pytest.raises(WeightsError, match="sha256"):
        verify_weights(cached)  # truncated: refused by hash, whatever its name
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        InceptionExtractor(verify_weights(cached, allow_unverified=True))


def test_reference_at_other_resolution_is_refused(tmp_path, folders, extractor):
    _, b = folders
    ref = ReferenceStats(np.zeros(2048), np.eye(2048), 10, None,
                         {"source": "procedural", "split": "val", "resolution": 64, "crop": 140, "val_fraction": 0.1,
                          "split_seed": 0, "num_images": 100, "weights_sha256": extractor.weights.sha256},
                         {"format": "straight-maskgit reference statistics v1", "count": 10})
    ref.meta["protocol"] = ref.protocol
    path, _ = save_reference(tmp_path / "ref64.npz", ref)
    with pytest.raises(ReferenceMismatchError, match="resolution: reference 64 vs requested 32"):
        load_reference(path, expect={"resolution": 32, "split": "val"})
    batches = open_folder(b).batches(8)
    with pytest.raises(ReferenceMismatchError, match="resolution"):
        score_images(batches, load_reference(path), extractor, metrics=("fid",))
    ref.protocol["weights_sha256"] = "0" * 64
    path, _ = save_reference(tmp_path / "other_weights.npz", ref)
    with pytest.raises(ReferenceMismatchError, match="weights_sha256"):
        score_images(open_folder(b).batches(8), load_reference(path), extractor, metrics=("fid",))


def test_cli_refuses_reference_of_other_resolution(cli_run, tmp_path, weights, capsys):
    big = tmp_path / "big"
    big.mkdir()
    Image.new("RGB", (2 * RES, 2 * RES)).save(big / "0.png")
    rc = main(["score", str(big), "--ref", str(cli_run["ref"]), "--weights", str(weights),
               "--allow-unverified-weights", "--device", "cpu", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and f"expected {RES}x{RES}" in err


def test_cli_swd_only_needs_no_weights(folders, tmp_path, monkeypatch):
    a, b = folders
    monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / "absent.pth"))
    assert main(["score", str(b), "--metrics", "swd", "--ref-images", str(a), "--run-dir", str(tmp_path),
                 "--name", "swd", "--swd-max-images", "8"]) == 0
    report = json.loads((tmp_path / "swd.json").read_text())
    assert set(report["metrics"]) == {"SWD_x1e3_32", "SWD_x1e3_16", "SWD_x1e3_mean"}
    assert report["standard_weights"] is None and report["protocol"]["extractor"] is None


def test_npz_inputs_checked(tmp_path):
    images = _smooth_images(4, 0.0, seed=4)  # (4, H, W, 3)
    np.savez(tmp_path / "nhwc.npz", images=images)
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2))
    a, b = (next(open_npz(tmp_path / f"{k}.npz", RES).batches(4)) for k in ("nhwc", "nchw"))
    assert a.shape == (4, 3, RES, RES) and torch.equal(a, b)
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32) / 255)
    with pytest.raises(ImageInputError, match="dtype float32, expected uint8"):
        open_images(tmp_path / "float.npz")
    np.savez(tmp_path / "grey.npz", images=images[..., 0])
    with pytest.raises(ImageInputError, match="shape"):
        open_images(tmp_path / "grey.npz")
    with pytest.raises(ImageInputError, match="expected 64x64"):
        open_images(tmp_path / "nhwc.npz", resolution=64)


def test_folder_inputs_checked(tmp_path):
    with pytest.raises(ImageInputError, match="holds no"):
        open_images(tmp_path)
    Image.new("RGB", (RES, RES)).save(tmp_path / "0.png")
    Image.new("RGBA", (RES, RES + 1)).save(tmp_path / "1.png")
    with pytest.raises(ImageInputError, match="1.png: image is 32x33"):
        open_images(tmp_path)


def test_uint8_conversion_is_the_data_package_one():
    from data.transforms import to_uint8 as data_to_uint8

    x = torch.linspace(-1.2, 1.2, 10001).reshape(1, 1, 1, -1)
    assert torch.equal(checked_uint8(x), data_to_uint8(x))
    grid = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(checked_uint8(checked_float(grid)), grid)


def test_cli_gen_and_rfid_wiring_with_stand_ins(cli_run, folders, tmp_path, monkeypatch):
    """The gen / rfid subcommands with stand-ins for the sampler and the tokenizer (SWD only, no weights):
    a 'sampler' that yields the reference images, and an identity 'tokenizer', both give SWD 0."""
    import tokenizer

    a, _ = folders
    reference_images = torch.cat(list(open_folder(a).batches(N)))  # (N, 3, RES, RES) uint8

    def load_models(tokenizer_ckpt, maskgit_ckpt, ema, device):
        return f"model:{tokenizer_ckpt}", f"model:{maskgit_ckpt}", {"config": {
            "masking": {"schedule": "arccos", "sample_steps": 5}, "model": {"grid": [4, 4], "num_codes": 16}}}

    def generate(tok, model, n, batch_size, seed, attrs, progress, steps, schedule, **sampler):
        assert (tok, model, n, seed, attrs, steps, schedule) == ("model:tok.pt", "model:mg.pt", N, 3, None, 5, "arccos")
        assert sampler.get("order", "confidence") == DECODE_DEFAULTS["order"]  # the shared default reaches eval gen
        yield from reference_images.split(batch_size)

    class Identity(torch.nn.Module):
        def encode(self, x):
            assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
            return x, None, {}

        def decode(self, z):
            return z

    monkeypatch.setattr(eval_main, "generate", generate)
    monkeypatch.setattr(eval_main, "load_models", load_models)
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path, ema=True: (Identity(), None), raising=False)
    common = ["--metrics", "swd", "--run-dir", str(tmp_path), "--swd-max-images", str(N), "--device", "cpu"]
    assert main(["gen", "--tokenizer", "tok.pt", "--maskgit", "mg.pt", "--n", str(N), "--seed", "3",
                 "--gen-batch-size", "5", "--ref", str(cli_run["ref"]), "--name", "gen", *common]) == 0
    assert main(["rfid", "--tokenizer", "tok.pt", "--images", str(a), "--batch-size", "5", "--name", "rfid",
                 *common]) == 0
    for name in ("gen", "rfid"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["metrics"]["SWD_x1e3_mean"] == 0.0 and report["protocol"]["checkpoints"]["tokenizer"] == "tok.pt"
    assert json.loads((tmp_path / "gen.json").read_text())["protocol"]["sampling"]["seed"] == 3
