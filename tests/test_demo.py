"""`make demo` end to end at a smaller size, and the README's commands against the Makefile."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import CHROMIUM_ARGS, ROOT, chromium, run_script

ARTEFACTS = ["report.md", "index.html", "report_metrics.json", "samples_grid.png", "curves_tokenizer.png",
             "curves_maskgit.png", "pca.png", "tokenizer/recon_latest.png", "tokenizer/codebook_usage_val.png",
             "tokenizer/final_metrics.json", "maskgit/final_metrics.json", "eval/generation.json", "eval/generation.md",
             "eval/floor.json"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "demo"
    out = run_script(ROOT / "demo.py", "--scale", "smoke", "--run", run, "--precision", "bf16", timeout=600)
    assert "Report:" in out.stdout.splitlines()[-1]
    return run


def _rows(markdown: str, heading: str) -> dict[str, str]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| [^|]*\|$", section, flags=re.M))


def test_demo_pipeline_end_to_end(demo_run):
    run = demo_run
    for name in ARTEFACTS:
        assert (run / name).stat().st_size > 0, name
    assert len(list((run / "samples").glob("*.png"))) == 16
    report, metrics = (run / "report.md").read_text(), json.loads((run / "report_metrics.json").read_text())
    assert report.index("![") < report.index("## ")  # pictures before numbers
    # the numbers with their context, equal to their sources
    val = json.loads((run / "tokenizer/final_metrics.json").read_text())
    tok = _rows(report, "## Tokenizer")
    used = sum(c > 0 for c in val["usage_counts"])
    assert tok["PSNR"] == f"{val['psnr']:.2f} dB" and tok["codes used"] == f"{used} of 128 ({used / 128:.0%})"
    assert _rows(report, "## MaskGIT")["training"] == "3 steps"
    # the precision each stage trained in (demo.py --precision bf16: MaskGIT under bf16 autocast, the tokenizer in fp32)
    assert json.loads((run / "maskgit/config.json").read_text())["optim"]["mixed_precision"] == "bf16"
    assert re.search(r"\| training \| 3 steps \| wall time [^|,]+, fp32 \|", report)
    assert re.search(r"\| training \| 3 steps \| wall time [^|,]+, bf16 autocast; trained with", report)
    swd, floor = (json.loads((run / f"eval/{n}.json").read_text())["metrics"]["SWD_x1e3_mean"] for n in ("generation", "floor"))
    assert _rows(report, "## Evaluation: generation")["SWD ×10³"] == f"{swd:.4g}" and f"floor {floor:.4g}" in report
    assert metrics["tokenizer"]["psnr"] == val["psnr"]
    assert "Inception weights" in report and "| FID | — |" in report  # no weights on the test machine: said plainly
    record = json.loads((run / "samples_grid.json").read_text())  # the grid's caption is what sample.py recorded
    assert f"EMA weights, {record['settings']['steps']} decoding steps, {record['settings']['schedule']}" in report
    page = (run / "index.html").read_text()
    assert page.count("data:image/png;base64,") == report.count("![")
    assert str(run) not in page and str(run) not in report  # paths relative to the run directory
    assert "http://" not in page and "https://" not in page  # nothing fetched


def test_a_run_written_under_the_former_metrics_names_still_reports(demo_run, tmp_path):
    """Both stages now write final_metrics.json; runs made before (val_metrics.json / train_metrics.json)
    still give the same report numbers."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(demo_run, run)
    (run / "tokenizer/final_metrics.json").rename(run / "tokenizer/val_metrics.json")
    (run / "maskgit/final_metrics.json").rename(run / "maskgit/train_metrics.json")
    run_script(ROOT / "report.py", "--run", run)
    assert json.loads((run / "report_metrics.json").read_text()) == \
        json.loads((demo_run / "report_metrics.json").read_text())


def test_wall_time_is_the_scripts_own_measure_not_file_times(demo_run, tmp_path):
    """A copy that does not keep modification times (cp without -p) used to report "wall time -0 s": the
    time now comes from the training script's final metrics; without that field (older runs) and with the
    files' times out of order, the report says nothing rather than a wrong number."""
    import shutil

    from report import wall_time

    stage = tmp_path / "maskgit"
    shutil.copytree(demo_run / "maskgit", stage)
    seconds = json.loads((stage / "final_metrics.json").read_text())["wall_seconds"]
    assert seconds >= 0
    os.utime(stage / "config.json", (2e9, 2e9))  # the start now after the end
    assert wall_time(stage) == f"{seconds:.0f} s, bf16 autocast"
    metrics = json.loads((stage / "final_metrics.json").read_text())
    del metrics["wall_seconds"]
    (stage / "final_metrics.json").write_text(json.dumps(metrics))
    assert wall_time(stage) == "—, bf16 autocast"


def test_report_in_a_browser(demo_run, tmp_path):
    """Headless Chromium at laptop and phone size: every image decoded and shown at its intended size
    (pictures upscaled by an integer factor, never squashed), pictures above the numbers, no horizontal
    scrolling, no text overflowing its box, no network request."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[browser]')")
    executable = chromium()
    shots = Path(os.environ.get("REPORT_SCREENSHOTS", tmp_path))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        for name, width in (("laptop", 1280), ("phone", 390)):
            page = browser.new_page(viewport={"width": width, "height": 800})
            urls = []
            page.on("request", lambda r: urls.append(r.url))
            page.goto((demo_run / "index.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", """els => els.map(e => { const r = e.getBoundingClientRect();
                return {ok: e.complete && e.naturalWidth > 0, nw: e.naturalWidth, nh: e.naturalHeight, w: r.width,
                        h: r.height, top: r.top, want: +e.getAttribute('width'), scale: +e.dataset.scale,
                        pixel: e.classList.contains('pixel'), box: e.parentElement.parentElement.clientWidth}; })""")
            assert len(images) == 6 and all(i["ok"] for i in images), images
            for i in images:
                assert abs(i["w"] - min(i["want"], i["box"])) <= 1, (name, i)  # intended size, or the screen width
                assert abs(i["h"] / i["w"] - i["nh"] / i["nw"]) < 0.02, (name, i)  # aspect kept
            pictures = [i for i in images if i["pixel"]]
            assert len(pictures) == 2 and all(i["scale"] >= 2 for i in pictures)  # 32x32 images: upscaled
            if name == "laptop":
                assert all(i["w"] == i["nw"] * i["scale"] for i in pictures)  # integer factor: sharp pixels
            table_top = page.eval_on_selector("table", "t => t.getBoundingClientRect().top")
            assert max(i["top"] for i in pictures) < table_top  # pictures first
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
            overflow = page.evaluate("""[...document.querySelectorAll('h1,h2,th,td,figcaption,summary,pre')]
                .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.tagName + ': ' + e.textContent.slice(0, 40))""")
            assert not overflow, (name, overflow)
            assert all(u.startswith(("file:", "data:")) for u in urls), urls
            page.screenshot(path=str(shots / f"report_{name}.png"), full_page=True)
        browser.close()


def test_readme_commands_name_real_make_targets():
    readme = (ROOT / "README.md").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", readme, flags=re.M))
    assert {"demo", "test"} <= named
    assert named <= targets, named - targets
    dry = subprocess.run(["make", "-n", "DATA=procedural", *sorted(named - {"setup"})], cwd=ROOT, capture_output=True,
                         text=True)  # the GPU recipe requires DATA
    assert dry.returncode == 0, dry.stderr
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme


def test_readme_flags_and_config_keys_exist():
    """Every --flag of a README command is defined by that command, every key=value override is a config key
    of a training script (with a value of the right type), every make VARIABLE= is a Makefile variable."""
    from core.config import apply_overrides, to_dict
    from tokenizer.train_config import PRESETS as TOKENIZER_PRESETS
    from training.run import flatten
    from transformer.config import PRESETS as MASKGIT_PRESETS

    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    sources = {"train_tokenizer.py": ["train_tokenizer.py", "training/run.py"],
               "train_maskgit.py": ["train_maskgit.py", "training/run.py"],
               "sample.py": ["sample.py", "transformer/pipeline.py"], "export.py": ["export.py"],
               "report.py": ["report.py"], "demo.py": ["demo.py"],
               "-m eval": ["eval/__main__.py", "transformer/pipeline.py"]}
    checked = 0
    for line in blocks.splitlines():
        m = re.search(r"python (-m eval|[\w/]+\.py)\b(.*?)(#|$)", line)
        if not m:
            continue
        text = "".join((ROOT / f).read_text() for f in sources[m.group(1)])
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)):
            assert f'"{flag}"' in text, (flag, line)
            checked += 1
    assert checked >= 15
    presets = (TOKENIZER_PRESETS["tiny"], MASKGIT_PRESETS["tiny"])
    keys = [set(flatten(to_dict(p))) for p in presets]
    for key, value in re.findall(r"\b((?:model|optim|data|log|loss|masking)\.[\w.]+)=([\w.]*)", readme):
        owners = [p for p, k in zip(presets, keys) if key in k]
        assert owners, key
        if value and value.upper() != value:  # a concrete value (not a placeholder such as N): it must parse
            apply_overrides(owners[0], [f"{key}={value}"])
    variables = set(re.findall(r"^([A-Z_]+)\s*\?=", (ROOT / "Makefile").read_text(), flags=re.M))
    assert set(re.findall(r"\b([A-Z_]{3,})=", blocks)) - {"TRACEBACK", "FID_INCEPTION_WEIGHTS"} <= variables
