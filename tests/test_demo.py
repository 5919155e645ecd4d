"""`make demo` end to end at a smaller size, and the README's commands against the Makefile."""
import json
import re
import subprocess

from conftest import ROOT, run_script

ARTEFACTS = ["report.md", "index.html", "report_metrics.json", "samples_grid.png", "curves_tokenizer.png",
             "curves_maskgit.png", "pca.png", "tokenizer/recon_latest.png", "tokenizer/codebook_usage_val.png",
             "tokenizer/val_metrics.json", "maskgit/train_metrics.json", "eval/generation.json", "eval/generation.md"]


def _table(markdown: str, heading: str) -> dict[str, str]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| (\w+) \| ([^|]+) \|$", section, flags=re.M))


def test_demo_pipeline_end_to_end(tmp_path):
    run = tmp_path / "demo"
    out = run_script(ROOT / "demo.py", "--scale", "smoke", "--run", run, timeout=600)
    assert "Report:" in out.stdout.splitlines()[-1]
    for name in ARTEFACTS:
        assert (run / name).stat().st_size > 0, name
    assert len(list((run / "samples").glob("*.png"))) == 16
    report, metrics = (run / "report.md").read_text(), json.loads((run / "report_metrics.json").read_text())
    assert report.index("![") < report.index("## ")  # pictures before numbers
    # every number in the report equals the one in its source JSON
    from report import fmt
    sources = {"## Tokenizer": json.loads((run / "tokenizer/val_metrics.json").read_text()),
               "## MaskGIT": json.loads((run / "maskgit/train_metrics.json").read_text()),
               "## Evaluation: generation": json.loads((run / "eval/generation.json").read_text())["metrics"]}
    for heading, source in sources.items():
        table = _table(report, heading)
        shared = set(table) & set(source)
        assert shared, heading
        for key in shared:
            assert table[key].strip() == fmt(source[key]), (heading, key)
    assert metrics["tokenizer"]["psnr"] == sources["## Tokenizer"]["psnr"]
    assert "SWD" in report and "not FID" not in report.split("## Evaluation")[0]
    assert "No FID here" in report  # no Inception weights on the test machine: said plainly
    record = json.loads((run / "samples_grid.json").read_text())  # the grid's caption is what sample.py recorded
    assert f"EMA weights, {record['settings']['steps']} decoding steps, {record['settings']['schedule']}" in report
    html = (run / "index.html").read_text()
    assert html.count("data:image/png;base64,") == report.count("![")


def test_readme_commands_name_real_make_targets():
    readme = (ROOT / "README.md").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", readme, flags=re.M))
    assert {"demo", "test"} <= named
    assert named <= targets, named - targets
    dry = subprocess.run(["make", "-n", *sorted(named - {"setup"})], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme
