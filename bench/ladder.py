"""The paper's claim, rung by rung: the whole pipeline once per VQ variant and seed, scored on generation.

    python bench/ladder.py                          # CPU budget, shared CelebA copy, 32x32, seeds 0-4 (`make ladder`)
    python bench/ladder.py --setting cpu_long --rungs baseline l2_replace all --seeds 0 1 2  # 2x / 4x the steps
    python bench/ladder.py & python bench/ladder.py # two copies share the runs (per-run locks)
    python bench/ladder.py --setting gpu64          # one GPU: 64x64, the celeba64 presets (not run here)
    python bench/ladder.py --data /path/to/images --rungs baseline opt_affine --seeds 0
    python bench/ladder.py --report-only            # rebuild the table and pages from what is on disk
    python bench/ladder.py --rungs l2_replace l2_replace@arccos --seeds 0 1 2  # MaskGIT's mask schedule, paired
    python bench/ladder.py --rungs l2_replace baseline l2_replace@mg4x baseline@mg4x --seeds 0 1 2  # 4x MaskGIT steps

Huh et al. (ICML 2023) report MaskGIT generation FID on CelebA of 90.5 (baseline VQ) -> 79.7 (+l2
+replace) -> 74.8 (+OPT +affine). For every rung of ``tokenizer.config.VQ_VARIANTS`` and every seed
this runs the project's own command-line tools, exactly as a user would:

    train_tokenizer.py -> pretokenize.py -> train_maskgit.py -> sample.py -> python -m eval score

with the same data, split, budgets and decoding settings for every rung; only the VQ options (every
one of them set explicitly, starting from ``VQConfig``'s defaults) and the seed change. The tokenizer
preset's VQ loss weight (5, the paper's) is kept for every rung.

Scores: SWD (sliced Wasserstein distance, Karras et al. 2018; x1e3, labelled as such) between the
samples and the held-out images of the split, always; FID and KID only when the standard Inception
weights are found (``eval/inception.py`` says where it looks). The floors are the same statistics
between real *train* images and the same held-out images: how far from real faces a rung is.

Statistics: every rung is compared with +l2 +replace seed by seed (the same seed is the same data order
and the same initial weights, so the difference of a pair is free of both), with the mean paired
difference, its 95 % confidence interval (Student t over the seeds) and the paired t-test's p-value. A
rung is called better or worse only where the interval excludes zero; otherwise "not separated".

Record: every finished run's numbers are also kept in ``bench/results/ladder_<setting>.json`` (with the
commit that ran it), which is committed, so a ladder spread over several sessions or machines adds up:
runs in the record count as done; the table is built from the record and the run directories.

Resumable: each finished stage of each run is recorded in ``<runs-dir>/<rung>/seed<k>/stages.json``
and training stages resume from their checkpoints, so a killed ladder continues where it stopped
(re-run the same command). Parallel: several copies of the same command share the runs (each run
directory is locked by the process working on it); on a machine with more cores than one run uses,
start one copy per free core group, then ``--report-only`` for the complete table. Outputs in ``--runs-dir``
(default runs/ladder): ladder.json, ladder.md, index.html, samples.png (one column per rung), seeds.png,
codes_used.png; bench/ladder_report.py builds them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, ROOT, resolve_image_folder
from ladder_report import LABELS, REFERENCE_RUNG, budget_table, comparisons, figures, table, write_pages

from core.files import final_metrics_path  # noqa: E402
from tokenizer.config import VQ_VARIANTS, variant_overrides  # noqa: E402

RUNGS = ["l2_replace", "baseline", "all", "seed_recipe", "opt_commit", "opt", "opt_renorm", "affine", "opt_affine"]
# Stage-two variants: "<rung>@<variant>" trains only MaskGIT differently, on the tokenizer and codes of
# "<rung>" with the same seed (linked, not retrained), so its pair with "<rung>" differs in MaskGIT alone.
# "overrides" are MaskGIT config overrides; "mg_steps" multiplies the setting's MaskGIT steps. A variant
# with more steps is a budget: its rungs are compared with the reference rung at the same budget
# ("<reference>@<variant>"), and the report says how the ranking moves from the setting's budget to it.
MG_VARIANTS = {"arccos": {"overrides": ["masking.schedule=arccos"], "label": "MaskGIT arccos"},
               "mg4x": {"overrides": [], "mg_steps": 4, "label": "4x MaskGIT steps"}}
# The ladder's sampler, spelled out so that a change of sample.py's defaults never changes a rung's numbers
# (MaskGIT's reference sampler: confidence order, Gumbel noise 4.5 annealed linearly, temperature 1).
DECODING = ["--steps", "8", "--order", "confidence", "--choice-temperature", "4.5", "--choice-schedule", "linear",
            "--temperature", "1.0"]
LABELS.update({f"{r}@{v}": f"{LABELS.get(r, r)}, {spec['label']}" for r in VQ_VARIANTS for v, spec in MG_VARIANTS.items()})


def reference_of(rung: str) -> str:
    """The rung that ``rung`` is paired with: the reference rung, at the same MaskGIT budget."""
    variant = rung.partition("@")[2]
    return f"{REFERENCE_RUNG}@{variant}" if MG_VARIANTS.get(variant, {}).get("mg_steps", 1) != 1 else REFERENCE_RUNG

RECORDS = ROOT / "bench" / "results"

# MaskGIT's mask schedule of the record's runs (made when cosine was the default): kept so that later runs
# pair with them; the "@arccos" variants override it.
MG_BASE = ["masking.schedule=cosine"]
# Budgets. "cpu": one run (rung x seed) takes about 12 minutes on one core of this project's 2-core machine
# (two copies of the command share the runs); "cpu_long" retrains both stages with more steps; "smoke" is
# the test suite's; "gpu64" is the documented setting for one GPU at the paper's CelebA resolution (not
# measured on this project's machines).
SETTINGS = {
    "cpu": dict(resolution=32, tok_preset="tiny", mg_preset="tiny", tok_steps=1000, mg_steps=600, samples=1000,
                reference=1000, tok_args=["optim.warmup_steps=50"], mg_args=MG_BASE),
    # The same with 2x the tokenizer's and 4x MaskGIT's steps: does the budget decide the ranking?
    "cpu_long": dict(resolution=32, tok_preset="tiny", mg_preset="tiny", tok_steps=2000, mg_steps=2400, samples=1000,
                     reference=1000, tok_args=["optim.warmup_steps=50"], mg_args=MG_BASE),
    "gpu64": dict(resolution=64, tok_preset="celeba64", mg_preset="celeba64", tok_steps=20_000, mg_steps=40_000,
                  samples=10_000, reference=10_000, tok_args=["data.num_workers=8"], mg_args=[]),
    "smoke": dict(resolution=32, tok_preset="smoke", mg_preset="smoke", tok_steps=2, mg_steps=2, samples=8,
                  reference=8, tok_args=[], mg_args=[]),
}
STAGES = ("tokenizer", "codes", "maskgit", "sample", "score", "recon")


def git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def load_record(path: Path | None, setting: str, folder: str) -> dict:
    """The runs finished so far in this setting (any session, any machine); refuses a record made on other data."""
    data = Path(folder).name
    if path is None or not path.exists():
        return {"setting": setting, "data": data, "runs": {}}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"ladder: cannot read the record {path}: {e}; fix or move it (or pass --record none)")
    if record.get("setting") != setting or record.get("data") != data:
        raise SystemExit(f"ladder: the record {path} holds setting {record.get('setting')!r} on data "
                         f"{record.get('data')!r}, not {setting!r} on {data!r}; pass --record with another file")
    return record


def add_to_record(path: Path, record: dict, rung: str, key: str, entry: dict) -> None:
    """Add one run and write the record, merged with what other ladder processes wrote meanwhile."""
    try:
        on_disk = json.loads(path.read_text())["runs"] if path.exists() else {}
    except (OSError, json.JSONDecodeError, KeyError):
        on_disk = {}  # unreadable now: keep this process's view
    for r, seeds in on_disk.items():
        for k, v in seeds.items():
            record["runs"].setdefault(r, {}).setdefault(k, v)
    record["runs"].setdefault(rung, {})[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a killed ladder never leaves half a record


def run(cmd: list[str], log: Path) -> None:
    """One stage as a subprocess of this Python; its output goes to ``log``; a failure stops the ladder."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"ladder: '{' '.join(cmd[:2])}' failed (exit {p.returncode}): {tail[0][-300:]}; see {log}; "
                         "fix it and re-run the same command to continue")


def data_overrides(folder: str, s: dict) -> list[str]:
    return [f"data.source={folder}", f"data.resolution={s['resolution']}", f"model.resolution={s['resolution']}",
            "data.crop=140", "data.cache=true"]


def complete(folder: Path, n: int) -> bool:
    """A reference set of n images written to the end (its ``.done`` marker holds n)."""
    return (folder / ".done").exists() and (folder / ".done").read_text() == str(n)


def write_references(folder: str, s: dict, out: Path) -> dict:
    """Held-out images (the split's val part) and as many train images, as PNGs, written once."""
    from torchvision.utils import save_image

    from data import DataConfig, build_dataset

    cfg = DataConfig(source=folder, resolution=s["resolution"], crop=140, flip=False)
    sets = {"val": build_dataset(cfg, "val", train=False), "train": build_dataset(cfg, "train", train=False)}
    counts = {}
    for split, dataset in sets.items():
        target, n = out / split, min(s["reference"], len(sets["val"]), len(dataset))
        if not complete(target, n):
            # Written in a folder of this process's own, then renamed into place: several ladder copies
            # started together each write a whole set, and none deletes files another one is writing.
            out.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{split}."))
            for i in range(n):
                save_image((dataset[i]["image"] + 1) / 2, tmp / f"{i:05d}.png")
            (tmp / ".done").write_text(str(n))
            if not complete(target, n):
                shutil.rmtree(target, ignore_errors=True)  # a set of another size, or left half-written
                try:
                    os.rename(tmp, target)
                except OSError:  # another copy's set landed in between
                    if not complete(target, n):
                        raise
            shutil.rmtree(tmp, ignore_errors=True)
        counts[split] = n
    return counts


def score(samples: Path, ref: Path, out_dir: Path, metrics: str, log: Path) -> dict:
    run(["-m", "eval", "score", str(samples), "--ref-images", str(ref / "val"), "--run-dir", str(out_dir),
         "--name", "generation", "--metrics", metrics, *(["--ref", str(ref / "val_stats.npz")] if metrics != "swd" else [])],
        log)
    return json.loads((out_dir / "generation.json").read_text())["metrics"]


def claim(d: Path) -> bool:
    """Take run directory ``d`` for this process (a lock file holding its pid); False when another live
    process holds it. Several copies of the same command thus share the ladder's runs between them."""
    lock = d / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # a live process runs it
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # left by a killed process: take it over
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def one_run(rung: str, seed: int, folder: str, s: dict, a: argparse.Namespace, metrics: str, ref: Path) -> dict | None:
    d = Path(a.runs_dir) / rung / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    if not claim(d):
        print(f"[{rung} seed {seed}] taken by another ladder process, skipped here", file=sys.stderr, flush=True)
        return None
    try:
        return _one_run(d, rung, seed, folder, s, metrics, ref)
    finally:
        (d / ".lock").unlink(missing_ok=True)


def _one_run(d: Path, rung: str, seed: int, folder: str, s: dict, metrics: str, ref: Path) -> dict | None:
    done_path, log = d / "stages.json", d / "output.log"
    done = json.loads(done_path.read_text()) if done_path.exists() else []
    tok, codes, mg = d / "tokenizer", d / "codes", d / "maskgit"
    base, _, variant = rung.partition("@")
    if variant and not (tok.exists() and codes.exists()):
        source = d.parent.parent / base / d.name
        ready = (source / "stages.json").exists() and "codes" in json.loads((source / "stages.json").read_text())
        if not ready:
            print(f"[{rung} seed {seed}] waits for the tokenizer and codes of {base} seed {seed}; skipped here",
                  file=sys.stderr, flush=True)
            return None
        for name in ("tokenizer", "codes"):
            (d / name).symlink_to((source / name).resolve(), target_is_directory=True)
    if variant:  # the base rung's stages, linked: never re-run here (they would write into the base rung's run)
        done = [*[name for name in ("tokenizer", "codes") if name not in done], *done]

    mg_steps = s["mg_steps"] * MG_VARIANTS.get(variant, {}).get("mg_steps", 1)

    def stage(name: str, fn) -> None:
        if name in done:
            return
        t = time.time()
        print(f"[{rung} seed {seed}] {name} ...", file=sys.stderr, flush=True)
        fn()
        done.append(name)
        done_path.write_text(json.dumps(done))
        print(f"[{rung} seed {seed}] {name} done in {time.time() - t:.0f} s", file=sys.stderr, flush=True)

    stage("tokenizer", lambda: run([
        "train_tokenizer.py", "--preset", s["tok_preset"], "--run-dir", str(tok), "--resume",
        *data_overrides(folder, s), f"optim.steps={s['tok_steps']}", f"optim.seed={seed}", "log.val_batches=0",
        f"log.ckpt_every={max(s['tok_steps'] // 4, 1)}", *s["tok_args"], *variant_overrides(base)], log))
    stage("codes", lambda: run(["pretokenize.py", "--tokenizer", str(tok / "checkpoint.pt"), "--out", str(codes)], log))
    stage("maskgit", lambda: run([
        "train_maskgit.py", "--preset", s["mg_preset"], "--run-dir", str(mg), "--resume", "--codes", str(codes),
        "--tokenizer", str(tok / "checkpoint.pt"), f"optim.steps={mg_steps}", f"optim.seed={seed}",
        f"log.ckpt_every={max(mg_steps // 4, 1)}", *s["mg_args"], *MG_VARIANTS.get(variant, {}).get("overrides", [])],
        log))

    def sample() -> None:
        shutil.rmtree(d / "samples", ignore_errors=True)  # a half-written set from a killed run
        run(["sample.py", "--tokenizer", str(tok / "checkpoint.pt"), "--maskgit", str(mg / "checkpoint.pt"),
             "--seed", str(seed), *DECODING, "--grid", str(d / "samples_grid.png"), "--grid-size", "16",
             "--num-images", str(s["samples"]), "--out-dir", str(d / "samples")], log)

    stage("sample", sample)
    stage("score", lambda: score(d / "samples", ref, d / "eval", metrics, log))
    # The same statistics for the tokenizer's reconstructions of the held-out images: the quality that
    # generation could reach with a perfect MaskGIT (the paper reports it as reconstruction FID).
    stage("recon", lambda: run([
        "-m", "eval", "rfid", "--tokenizer", str(tok / "checkpoint.pt"), "--images", str(ref / "val"),
        "--run-dir", str(d / "eval"), "--name", "reconstruction", "--metrics", metrics,
        *(["--ref", str(ref / "val_stats.npz")] if metrics != "swd" else [])], log))
    return collect(d)


def collect(d: Path) -> dict:
    """The numbers of one finished run, from the files its stages wrote."""
    tok = json.loads(final_metrics_path(d / "tokenizer").read_text())
    mg = json.loads(final_metrics_path(d / "maskgit").read_text())
    gen = json.loads((d / "eval" / "generation.json").read_text())["metrics"]
    rec = json.loads((d / "eval" / "reconstruction.json").read_text())["metrics"]
    log = [json.loads(line) for line in (d / "tokenizer" / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r["vq"] for r in log[-4:] if "vq" in r]  # the VQ loss's value is mean((z - z_q)^2) for every rung
    out = {"psnr": tok["psnr"], "perplexity": tok["perplexity"], "codes_used": tok["codes_used"],
           "num_codes": tok["num_codes"], "masked_accuracy": mg.get("val_accuracy"), "swd": gen["SWD_x1e3_mean"],
           "rswd": rec["SWD_x1e3_mean"], "ste_error": statistics.fmean(last) if last else None,
           "usage_curve": [(r["step"], r["window_codes_used"]) for r in log]}
    for key in ("FID", "KID_mean"):
        if key in gen:
            out[key.split("_")[0].lower()] = gen[key]
        if key in rec:
            out["r" + key.split("_")[0].lower()] = rec[key]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    p.add_argument("--rungs", nargs="+", default=RUNGS, choices=[*VQ_VARIANTS, *LABELS],
                   help="VQ rungs, or <rung>@<variant> for a MaskGIT variant on that rung's tokenizer "
                        f"({', '.join(MG_VARIANTS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="image folder, CelebA folder, the shared tarball's folder, or 'procedural'")
    p.add_argument("--runs-dir", default="runs/ladder")
    p.add_argument("--tok-steps", type=int, help="override the setting's tokenizer steps")
    p.add_argument("--mg-steps", type=int, help="override the setting's MaskGIT steps")
    p.add_argument("--samples", type=int, help="override the setting's number of samples per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild ladder.json/md/html from finished runs")
    p.add_argument("--record", help="JSON file keeping every finished run's numbers across sessions (default: "
                                    "bench/results/ladder_<setting>.json; 'none' for no record; the smoke setting keeps none)")
    a = p.parse_args()
    s = dict(SETTINGS[a.setting])
    for key, flag in (("tok_steps", a.tok_steps), ("mg_steps", a.mg_steps), ("samples", a.samples)):
        if flag is not None:
            if flag <= 0:
                raise SystemExit(f"ladder: --{key.replace('_', '-')} must be positive, got {flag}")
            s[key] = flag
    out = Path(a.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = a.data if a.data == "procedural" else str(resolve_image_folder(a.data))

    from demo import inception_weights_available

    have_fid = inception_weights_available()
    metrics = "auto" if have_fid else "swd"
    ref = out / "reference"
    counts = write_references(folder, s, ref)
    if have_fid and not (ref / "val_stats.npz").exists():
        run(["-m", "eval", "ref", "--images", str(ref / "val"), "--out", str(ref / "val_stats.npz")], out / "output.log")
    if not (ref / "floor" / "generation.json").exists():
        score(ref / "train", ref, ref / "floor", metrics, out / "output.log")
    floor_raw = json.loads((ref / "floor" / "generation.json").read_text())["metrics"]
    floors = {"swd": floor_raw["SWD_x1e3_mean"], **({"fid": floor_raw["FID"]} if "FID" in floor_raw else {}),
              **({"kid": floor_raw["KID_mean"]} if "KID_mean" in floor_raw else {})}
    floors.update({"r" + k: v for k, v in floors.items() if k in ("swd", "fid")})  # real vs real bounds both

    record_path = None if (a.record or "").lower() == "none" or (a.record is None and a.setting == "smoke") else \
        Path(a.record) if a.record else RECORDS / f"ladder_{a.setting}.json"
    record = load_record(record_path, a.setting, folder)

    t0 = time.time()
    results: dict[str, dict] = {r: {} for r in a.rungs}
    for seed in a.seeds:  # seed-major: a partial ladder already has every rung once
        for rung in a.rungs:
            d, key = out / rung / f"seed{seed}", f"seed{seed}"
            finished = (d / "stages.json").exists() and json.loads((d / "stages.json").read_text()) == list(STAGES)
            recorded = record["runs"].get(rung, {}).get(key)
            if a.report_only and not finished and recorded is None:
                continue
            ran_here = False
            if finished:
                r = collect(d)
            elif recorded is not None:  # finished in an earlier session or on another machine
                r = recorded
            else:
                r, ran_here = one_run(rung, seed, folder, s, a, metrics, ref), True
            if r is None:
                continue
            if record_path is not None and recorded is None:
                # a run this process did not make (found finished in its directory) may come from another checkout
                commit = git_commit() if ran_here else "unknown (collected from its run directory)"
                add_to_record(record_path, record, rung, key, {**r, "commit": commit, "date": time.strftime("%Y-%m-%d")})
            results[rung][key] = r
            print(f"[{rung} seed {seed}] PSNR {r['psnr']:.2f} dB, perplexity {r['perplexity']:.1f}, codes used "
                  f"{r['codes_used']:.1%}, masked acc {r['masked_accuracy']:.3f}, generation SWD {r['swd']:.2f}",
                  file=sys.stderr, flush=True)
    results = {r: v for r, v in results.items() if v}
    if not results:
        raise SystemExit("ladder: no finished run to report yet")
    header, lines = table(results, floors)
    paired_raw, paired_lines = comparisons(results, {r: reference_of(r) for r in results})
    budget_lines = [line for v, spec in MG_VARIANTS.items() if spec.get("mg_steps", 1) != 1
                    for line in budget_table(results, v, spec["label"])]
    figures(results, out)
    meta = {"command": "python bench/ladder.py " + " ".join(sys.argv[1:]), "setting": a.setting, **s,
            "data": str(folder), "seeds": a.seeds,
            "rungs": {r: {**VQ_VARIANTS[r.partition("@")[0]], **({"maskgit": MG_VARIANTS[r.partition("@")[2]]}
                                                                 if "@" in r else {})} for r in results},
            "metrics": "FID/KID (standard Inception) + SWD" if have_fid else "SWD only (no Inception weights found)",
            "reference": counts, "decoding": " ".join(DECODING),
            "weights": "EMA (tokenizer and MaskGIT)", "floors": floors, "elapsed_s_this_call": time.time() - t0,
            "date": time.strftime("%Y-%m-%d")}
    (out / "ladder.json").write_text(json.dumps({"meta": meta, "results": results, "table": lines,
                                                 "paired": paired_raw, "paired_table": paired_lines,
                                                 "budget_table": budget_lines}, indent=2) + "\n")
    write_pages(out, meta, lines, paired_lines, budget_lines)
    print("\n".join(lines + [""] + paired_lines + budget_lines))
    print(f"-> {out / 'ladder.md'}, {out / 'index.html'}")


if __name__ == "__main__":
    main()
