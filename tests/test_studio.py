"""The studio: its JSON API on a real server with the tiny checkpoints (errors included), and the
page driven in headless Chromium: generate, draw a box, inpaint."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from conftest import CHROMIUM_ARGS, ROOT, chromium, run_script
from PIL import Image

from core.errors import main_guard
from studio.api import RequestError
from studio.engine import Engine
from studio.server import MAX_BODY, StudioServer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tiny_runs):
    """A studio on a free localhost port, serving the tiny conditional pair (32x32 px, 8x8 tokens)."""
    srv = StudioServer(Engine.from_paths(tiny_runs["tokenizer"], tiny_runs["maskgit"]), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(server, path, body=None, raw=None, headers=None):
    """(status, JSON answer) of one request."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def png_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def outside(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The pixels of (R, R, 3) outside the square [lo, hi)^2."""
    keep = np.ones(a.shape[:2], dtype=bool)
    keep[lo:hi, lo:hi] = False
    return a[keep]


# maskgit_decode's sampler settings as a request names them ("cfg" = cfg_scale): each choice of order and schedule
SAMPLERS = {"confidence": {"order": "confidence"},
            "confidence-annealed": {"order": "confidence", "temperature_end": 0.4, "choice_schedule": "cosine",
                                    "cfg_schedule": "linear"},
            "halton": {"order": "halton", "temperature": 1.3, "temperature_end": 0.5, "cfg_schedule": "pow-cosine",
                       "cfg_power": 2.0},
            "halton-constant": {"order": "halton", "choice_schedule": "constant", "cfg_schedule": "constant"}}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_generate_is_the_sampling_path_with_a_strip(server, sampler):
    from studio.engine import generate  # sample.py's, through the studio's one import of it
    settings = SAMPLERS[sampler]
    request = {"n": 3, "seed": 7, "steps": 6, "attrs": {"smiling": 1}, "cfg": 1.5, **settings}
    status, a = post(server, "/api/generate", request)
    assert status == 200 and len(a["images"]) == 3, a
    _, b = post(server, "/api/generate", request)
    _, c = post(server, "/api/generate", {**request, "seed": 8})
    assert [x["png"] for x in a["images"]] == [x["png"] for x in b["images"]]
    assert [x["png"] for x in a["images"]] != [x["png"] for x in c["images"]]
    # the same pictures as sample.py's generate with the same seed and settings (the trained schedule)
    e = server.engine
    assert e.schedule == "arccos" and e.info.default_steps == 5  # what the tiny run was trained with
    ref = next(generate(e.tokenizer, e.model, 3, 3, seed=7, steps=6, attrs=torch.tensor([1, 0, 0, 0, 0]),
                        cfg_scale=1.5, schedule="arccos", progress=False, **settings))
    for got, want in zip(a["images"], ref):
        assert np.array_equal(pixels(got["png"]), want.permute(1, 2, 0).numpy())
        assert len(got["tokens"]) == 64 and 0 <= min(got["tokens"]) and max(got["tokens"]) < 128
        fixed = got["fixed"]  # known tokens after each step: grows to all 64
        assert len(fixed) == 6 and fixed == sorted(set(fixed)) and fixed[-1] == 64
        strip = pixels(got["strip"])  # six 32x32 frames, each followed by a white column
        assert strip.shape == (32, 6 * 33, 3) and (strip[:, 32::33] == 255).all()
        last = strip[:, 5 * 33 : 5 * 33 + 32]  # the last frame is the sample itself
        assert np.array_equal(last, pixels(got["png"]))


def test_unset_sampling_fields_are_sample_py_defaults(server):
    """A request that names no sampler setting decodes with DECODE_DEFAULTS, sample.py's defaults (one
    definition: switching a default switches both), and /api/info gives the page the same values."""
    from transformer.pipeline import DECODE_CHOICES, DECODE_DEFAULTS, generate

    e = server.engine
    info = e.describe()
    assert info["defaults"] == {{"cfg_scale": "cfg"}.get(k, k): v for k, v in DECODE_DEFAULTS.items()}
    assert info["choices"] == {k: list(v) for k, v in DECODE_CHOICES.items() if k in DECODE_DEFAULTS}
    status, got = post(server, "/api/generate", {"n": 2, "seed": 4})
    assert status == 200
    ref = next(generate(e.tokenizer, e.model, 2, 2, seed=4, steps=5, schedule="arccos", progress=False,
                        **DECODE_DEFAULTS))
    for image, want in zip(got["images"], ref):
        assert np.array_equal(pixels(image["png"]), want.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("mode", ["inpaint", "outpaint"])
def test_edit_changes_only_the_marked_tokens(server, mode):
    _, gen = post(server, "/api/generate", {"n": 1, "seed": 3})
    sample = gen["images"][0]
    before = pixels(sample["png"])
    # box [9, 23) touches tokens 2..5 (pixels 8..23); it holds tokens 3..4 (pixels 12..19) whole
    status, out = post(server, "/api/edit", {"image": sample["png"], "tokens": sample["tokens"], "box": [9, 9, 23, 23],
                                             "mode": mode, "seed": 5})
    assert status == 200, out
    after, region = pixels(out["images"][0]["png"]), np.array(out["region"], dtype=bool)
    tokens_before, tokens_after = np.array(sample["tokens"]), np.array(out["images"][0]["tokens"])
    expected = np.zeros((8, 8), dtype=bool)
    if mode == "inpaint":
        expected[2:6, 2:6] = True
        assert np.array_equal(outside(after, 8, 24), outside(before, 8, 24))  # bit for bit
        changed = (after[8:24, 8:24] != before[8:24, 8:24]).any(-1).mean()
    else:
        expected[:] = True
        expected[3:5, 3:5] = False
        assert np.array_equal(after[12:20, 12:20], before[12:20, 12:20])
        changed = (outside(after, 12, 20) != outside(before, 12, 20)).any(-1).mean()
    assert np.array_equal(region, expected)
    assert np.array_equal(tokens_after[~expected.ravel()], tokens_before[~expected.ravel()])
    assert changed > 0.3  # the region is new (random tiny models: new tokens differ almost everywhere)
    # the same region as a painted mask, and the same picture as an upload (no tokens: encoded)
    mask = np.zeros((32, 32, 3), dtype=np.uint8)
    mask[9:23, 9:23] = 255
    status, masked = post(server, "/api/edit", {"image": sample["png"], "tokens": sample["tokens"], "mask": png_url(mask),
                                                "mode": mode, "seed": 5})
    assert status == 200 and masked["images"][0]["png"] == out["images"][0]["png"]
    status, upload = post(server, "/api/edit", {"image": sample["png"], "box": [9, 9, 23, 23], "mode": mode})
    assert status == 200 and upload["region"] == out["region"]
    if mode == "inpaint":
        assert np.array_equal(outside(pixels(upload["images"][0]["png"]), 8, 24), outside(before, 8, 24))


@pytest.mark.parametrize("mode", ["inpaint", "outpaint"])
def test_studio_edit_and_sample_py_inpaint_give_the_same_pixels(tiny_runs, tmp_path, mode):
    """One inpainting (transformer/pipeline.py): the studio's edit of an uploaded picture and sample.py --inpaint
    with the same box, seed and settings give the same pixels, and both keep every pixel outside the
    regenerated tokens exactly. Both at one thread (``one_thread`` sets it for this process and for sample.py's):
    another thread count sums the matmuls in another order, which can flip a near-tie between two codes."""
    from data import preprocess_uint8

    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    engine = Engine.from_paths(tiny_runs["tokenizer"], tiny_runs["maskgit"])
    out = engine.edit({"image": png_url(picture), "box": [9, 9, 23, 20], "mode": mode, "seed": 3})
    grid = tmp_path / "grid.png"
    run_script(ROOT / "sample.py", "--tokenizer", tiny_runs["tokenizer"], "--maskgit", tiny_runs["maskgit"], "--grid", grid,
               "--grid-size", "1", "--seed", "3", "--inpaint", tmp_path / "picture.png", "--box", "9,9,23,20",
               *(["--outpaint"] if mode == "outpaint" else []))
    studio = pixels(out["images"][0]["png"])
    assert np.array_equal(studio, np.asarray(Image.open(grid).convert("RGB")))
    original = preprocess_uint8(Image.fromarray(picture), 32, None).permute(1, 2, 0).numpy()
    kept = ~np.kron(np.array(out["region"], dtype=bool), np.ones((4, 4), dtype=bool))
    assert kept.any() and np.array_equal(studio[kept], original[kept])
    assert (studio[~kept] != original[~kept]).any()


def bad_requests():
    """(name, path, body or raw bytes, extra headers, status, words the error must contain)."""
    ok = png_url(np.zeros((32, 32, 3), dtype=np.uint8))
    big = png_url(np.zeros((4096, 4096, 3), dtype=np.uint8))  # compresses to a few kB: refused by size
    edit = {"image": ok, "tokens": [0] * 64}
    return [
        ("malformed", "/api/generate", b'{"n": 2,', {}, 400, "malformed JSON"),
        ("not-object", "/api/generate", [1, 2], {}, 400, "must be a JSON object"),
        ("unknown-field", "/api/generate", {"n": 2, "sed": 1}, {}, 400, "unknown field(s) sed"),
        ("n-zero", "/api/generate", {"n": 0}, {}, 400, "n must lie in [1, 16]"),
        ("steps-string", "/api/generate", {"steps": "8"}, {}, 400, "steps must be an integer"),
        ("seed-bool", "/api/generate", {"seed": True}, {}, 400, "seed must be an integer"),
        ("negative-temperature", "/api/generate", {"temperature": -1}, {}, 400, "temperature must lie in"),
        ("unknown-attribute", "/api/generate", {"attrs": {"wings": 1}}, {}, 400, "unknown attribute(s) wings"),
        ("attribute-value", "/api/generate", {"attrs": {"smiling": 2}}, {}, 400, "attrs.smiling must be 0 or 1"),
        ("cfg-without-attrs", "/api/generate", {"cfg": 2.0}, {}, 400, "cfg > 0 needs 'attrs'"),
        ("order", "/api/generate", {"order": "random"}, {}, 400, "order must be one of confidence, halton, got 'random'"),
        ("order-type", "/api/generate", {"order": 1}, {}, 400, "order must be one of confidence, halton"),
        ("choice-schedule", "/api/generate", {"choice_schedule": "exp"}, {}, 400,
         "choice_schedule must be one of linear, cosine, constant"),
        ("cfg-schedule", "/api/generate", {"cfg_schedule": None}, {}, 400, "cfg_schedule must be one of"),
        ("cfg-power", "/api/generate", {"cfg_power": 0}, {}, 400, "cfg_power must lie in [0.01, 20]"),
        ("temperature-end", "/api/generate", {"temperature_end": 11}, {}, 400, "temperature_end must lie in [0, 10]"),
        ("temperature-end-string", "/api/generate", {"temperature_end": "1"}, {}, 400, "temperature_end must be a number"),
        ("temperature-null", "/api/generate", {"temperature": None}, {}, 400, "temperature must be a number, got None"),
        ("edit-order", "/api/edit", {**edit, "box": [0, 0, 3, 3], "order": "Halton"}, {}, 400, "order must be one of"),
        ("box-outside", "/api/edit", {**edit, "box": [0, 0, 33, 10]}, {}, 400, "outside the 32x32 image"),
        ("box-empty", "/api/edit", {**edit, "box": [5, 5, 5, 9]}, {}, 400, "is empty"),
        ("box-floats", "/api/edit", {**edit, "box": [0.5, 0, 3, 3]}, {}, 400, "four integers"),
        ("box-and-mask", "/api/edit", {**edit, "box": [0, 0, 3, 3], "mask": ok}, {}, 400, "exactly one of"),
        ("no-region", "/api/edit", edit, {}, 400, "exactly one of"),
        ("mask-wrong-size", "/api/edit", {**edit, "mask": png_url(np.zeros((64, 64, 3), np.uint8))}, {}, 400,
         "mask is 64x64 pixels; this model works on 32x32"),
        ("mask-huge", "/api/edit", {**edit, "mask": big}, {}, 400, "mask is 4096x4096"),
        ("upload-huge", "/api/edit", {"image": big, "box": [0, 0, 3, 3]}, {}, 400, "at most 2048 per side"),
        ("mask-base64", "/api/edit", {**edit, "mask": "data:image/png;base64,@@@"}, {}, 400, "invalid base64"),
        ("mask-not-image", "/api/edit", {**edit, "mask": "data:image/png;base64," + base64.b64encode(b"hello").decode()},
         {}, 400, "not a readable image"),
        ("tokens-range", "/api/edit", {**edit, "tokens": [128] * 64, "box": [0, 0, 3, 3]}, {}, 400, "in [0, 128)"),
        ("tokens-length", "/api/edit", {**edit, "tokens": [0] * 63, "box": [0, 0, 3, 3]}, {}, 400, "list of 64"),
        ("outpaint-everything", "/api/edit", {**edit, "box": [1, 1, 3, 3], "mode": "outpaint"}, {}, 400, "every token"),
        ("mode", "/api/edit", {**edit, "box": [0, 0, 3, 3], "mode": "paint"}, {}, 400, "mode must be one of"),
        ("too-large", "/api/edit", b" " * (MAX_BODY + 1), {}, 413, "byte limit"),
        ("content-type", "/api/generate", {}, {"Content-Type": "text/plain"}, 415, "application/json"),
        ("endpoint", "/api/paint", {}, {}, 404, "no such endpoint"),
        ("host", "/api/generate", {}, {"Host": "attacker.example:80"}, 403, "only answers to localhost"),
    ]


def test_bad_requests_get_one_line_json_errors_and_the_server_keeps_serving(server):
    for name, path, body, headers, want_status, words in bad_requests():
        raw = body if isinstance(body, bytes) else None
        status, answer = post(server, path, None if raw else body, raw=raw, headers=headers)
        assert (status, list(answer)) == (want_status, ["error"]), name
        assert words in answer["error"] and "\n" not in answer["error"], (name, answer["error"])
    status, answer = post(server, "/api/generate", {"n": 1})
    assert status == 200 and len(answer["images"]) == 1
    for path in ("static/../api.py", "static/api.py", "static/%2e%2e/api.py"):  # only the page's own files
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + path, timeout=10)
        assert e.value.code == 404, path


def test_an_unconditional_model_refuses_attributes(server):
    from transformer import MaskGIT, MaskGITConfig
    e = server.engine
    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(num_codes=128, grid=(8, 8), dim=32, depth=1, heads=2)).eval()
    engine = Engine(e.tokenizer, model, {"config": {"masking": {"schedule": "cosine", "sample_steps": 8}}})
    assert engine.describe()["conditional"] is False
    with pytest.raises(RequestError, match="without attribute conditioning"):
        engine.generate({"attrs": {"smiling": 1}})
    assert len(engine.generate({"n": 2, "steps": 2})["images"]) == 2


def test_cli_serves_and_refuses_a_run_without_checkpoints(tiny_runs, tmp_path, monkeypatch, capsys):
    from studio.__main__ import main
    monkeypatch.setattr(sys, "argv", ["studio", "--run", str(tmp_path), "--port", "0"])
    with pytest.raises(SystemExit) as e:
        main_guard(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "make demo" in err
    from studio.__main__ import model_paths
    from transformer.pipeline import export_models
    export_models(str(tiny_runs["tokenizer"]), str(tiny_runs["maskgit"]), str(tmp_path / "export"))
    assert model_paths(str(tmp_path / "export"), None, None) == (tmp_path / "export" / "tokenizer",
                                                                 tmp_path / "export" / "maskgit")
    assert Engine.from_paths(*model_paths(str(tmp_path / "export"), None, None)).describe()["grid"] == [8, 8]
    run = tmp_path / "run"  # the layout `make demo` writes
    for part, path in (("tokenizer", tiny_runs["tokenizer"]), ("maskgit", tiny_runs["maskgit"])):
        (run / part).mkdir(parents=True)
        (run / part / "checkpoint.pt").symlink_to(path)
    proc = subprocess.Popen([sys.executable, "-m", "studio", "--run", str(run), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        url = lines[1].split("open ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=30) as r:
            assert json.loads(r.read())["grid"] == [8, 8]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def studio_page(server, width=1280, height=800):
    """(page, expect): the studio in headless Chromium with a viewport of width x height CSS pixels, once it
    has sampled on load. Any script or console error on the page fails the test."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[browser]')")
    executable = chromium()
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.goto(server.url)
        sync_api.expect(page.locator("#status")).to_contain_text("samples in", timeout=30_000)  # sampled on load
        yield page, sync_api.expect
        browser.close()
    assert not problems, problems


def drag_box(page, x0, y0, x1, y1):
    """Drag over pixels (x0, y0) .. (x1, y1) of the model's 32x32 picture in the editor's canvas."""
    view = page.locator("#view").bounding_box()
    at = lambda x, y: (view["x"] + (x + 0.5) * view["width"] / 32, view["y"] + (y + 0.5) * view["height"] / 32)
    page.mouse.move(*at(x0, y0))
    page.mouse.down()
    page.mouse.move(*at((x0 + x1) // 2, (y0 + y1) // 2))
    page.mouse.move(*at(x1, y1))
    page.mouse.up()
    return at


def test_page_generates_and_inpaints_a_box_in_chromium(server):
    with studio_page(server) as (page, expect):
        page.fill("#seed", "11")
        page.fill("#n", "4")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("seed 11", timeout=30_000)
        assert page.locator("#grid .thumb").count() == 4
        page.click("#grid .thumb >> nth=2")
        before_url = page.get_attribute("#download", "href")
        # the strip: one frame per step, T = 5 by default (the tiny run's trained setting)
        assert page.locator("#strip figure").count() == 5 and page.inner_text("#strip figure >> nth=4") == "5: 64/64"

        # drag a box over pixels 9..22 of the 32x32 picture: tokens 2..5, pixels 8..23
        at = drag_box(page, 9, 9, 22, 22)
        page.click("#regenerate")
        expect(page.locator("#status")).to_contain_text("inpainted in", timeout=30_000)
        after_url = page.get_attribute("#download", "href")
        before, after = pixels(before_url), pixels(after_url)
        assert np.array_equal(outside(after, 8, 24), outside(before, 8, 24))
        assert (after[8:24, 8:24] != before[8:24, 8:24]).any(-1).mean() > 0.3
        # a brush stroke along row 4 (radius 2.5 px: rows 2..6) marks the top row of tokens, pixels 0..7
        page.check("input[name=tool][value=brush]")
        page.mouse.move(*at(2, 4))
        page.mouse.down()
        page.mouse.move(*at(30, 4), steps=2)  # events at x = 16, 30 only: the page fills the gaps
        page.mouse.up()
        page.click("#regenerate")
        expect(page.locator("#edit-seed")).to_have_value("3", timeout=30_000)  # done: seed 1, 2 used
        brushed = pixels(page.get_attribute("#download", "href"))
        assert np.array_equal(brushed[8:], after[8:])
        assert all((brushed[:8, x : x + 4] != after[:8, x : x + 4]).any() for x in range(0, 32, 4))  # every token
        page.click("#undo")
        page.click("#undo")
        assert page.get_attribute("#download", "href") == before_url


def within(page, selector, width):
    """The element is drawn, and fully inside the columns [0, width) of the page."""
    box = page.locator(selector).bounding_box()
    assert box is not None and box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= width, (selector, box)
    return box


PHONE = (390, 844)  # CSS pixels of a phone held upright


def test_page_fits_a_phone_in_chromium(server):
    """At a phone's width nothing sticks out sideways (no horizontal scrolling), the settings, samples and
    editor stack in one column, Generate is on the first screen, and a box drawn on the canvas (scaled to
    the width) inpaints the right tokens."""
    width, height = PHONE
    with studio_page(server, width, height) as (page, expect):
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        generate = within(page, "#generate", width)
        assert generate["y"] + generate["height"] <= height  # reachable without scrolling
        for selector in ("#seed", "#dice", "#n", "#steps", "#order", "#temperature", "#choice", "#cfg",
                         "#grid .thumb >> nth=0", "#grid .thumb >> nth=7"):
            within(page, selector, width)
        page.click("#grid .thumb >> nth=1")
        page.locator("#view").scroll_into_view_if_needed()
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # the editor open too
        view = within(page, "#view", width)
        assert view["width"] >= 300 and abs(view["width"] - view["height"]) < 1  # as wide as fits, square
        controls, samples, editor = (page.locator(s).bounding_box() for s in ("#controls", "#samples", "#editor"))
        assert controls["y"] + controls["height"] <= samples["y"] and samples["y"] + samples["height"] <= editor["y"]
        before = pixels(page.get_attribute("#download", "href"))
        drag_box(page, 9, 9, 22, 22)
        page.locator("#regenerate").scroll_into_view_if_needed()
        for selector in ("#regenerate", "#clear", "#undo", "#download", "#edit-seed", "#strip figure >> nth=4"):
            within(page, selector, width)
        page.click("#regenerate")
        expect(page.locator("#status")).to_contain_text("inpainted in", timeout=30_000)
        after = pixels(page.get_attribute("#download", "href"))
        assert np.array_equal(outside(after, 8, 24), outside(before, 8, 24))
        assert (after[8:24, 8:24] != before[8:24, 8:24]).any(-1).mean() > 0.3
        assert page.evaluate("document.documentElement.scrollWidth") <= width


def test_page_keeps_its_three_columns_on_a_desktop_in_chromium(server):
    with studio_page(server, 1280, 800) as (page, expect):
        page.click("#grid .thumb >> nth=0")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        columns = [within(page, s, 1280) for s in ("#controls", "#samples", "#editor")]
        assert max(c["y"] for c in columns) - min(c["y"] for c in columns) < 1  # side by side, tops aligned
        assert all(a["x"] + a["width"] < b["x"] for a, b in zip(columns, columns[1:]))
        assert within(page, "#view", 1280)["width"] == 320  # the canvas at its full size
        generate = within(page, "#generate", 1280)
        assert generate["y"] + generate["height"] <= 800


def test_page_samples_with_the_order_it_is_set_to_in_chromium(server):
    """The page starts from the server's defaults (sample.py's): its first samples are the API's with no sampler
    setting named; with the order set to Halton it samples what the API samples with "order": "halton"."""
    from transformer.pipeline import DECODE_DEFAULTS

    attrs = {name: 0 for name in server.engine.info.attr_names}  # the page's attribute boxes start unticked
    thumbs = lambda page: [img.get_attribute("src") for img in page.locator("#grid .thumb img").all()]
    with studio_page(server) as (page, expect):
        assert page.eval_on_selector_all("#order option", "options => options.map(o => o.value)") == [
            "confidence", "halton"]
        assert page.input_value("#order") == DECODE_DEFAULTS["order"]
        _, api = post(server, "/api/generate", {"n": 8, "seed": 0, "attrs": attrs})
        assert thumbs(page) == [x["png"] for x in api["images"]]
        page.select_option("#order", "halton")
        assert page.is_disabled("#choice") and page.is_disabled("#choice-schedule")  # unused by Halton
        page.fill("#n", "3")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("halton order", timeout=30_000)
        _, api = post(server, "/api/generate", {"n": 3, "seed": 0, "attrs": attrs, "order": "halton"})
        assert thumbs(page) == [x["png"] for x in api["images"]]
        _, other = post(server, "/api/generate", {"n": 3, "seed": 0, "attrs": attrs, "order": "confidence"})
        assert thumbs(page) != [x["png"] for x in other["images"]]
        page.select_option("#order", "confidence")
        assert not page.is_disabled("#choice")




# --- issue 26: a studio that holds under load; every refusal is JSON ---------------------------------------

LOAD_CLIENTS, LOAD_REQUESTS = 20, 100  # parallel clients, requests in all (each on its own connection)


def test_a_burst_of_parallel_requests_is_answered_every_time(server):
    assert server.request_queue_size >= 128  # the listen backlog (the default 5 reset connections of a burst)
    barrier = threading.Barrier(LOAD_CLIENTS)
    statuses, failures = [], []

    def client(k):
        barrier.wait()  # all at once
        for j in range(LOAD_REQUESTS // LOAD_CLIENTS):
            try:
                statuses.append(post(server, "/api/generate", {"n": 1, "steps": 1, "seed": k * 100 + j})[0])
            except OSError as e:  # a reset or refused connection
                failures.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures[:3]
    assert statuses == [200] * LOAD_REQUESTS  # every request answered, and answered well
    assert post(server, "/api/generate", {"n": 1, "steps": 1})[0] == 200  # and the server is still there


def _raw(server, method, path="/api/generate", body=None, headers=None):
    import http.client

    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


STUDIO_BAD_REQUESTS = 9


def test_odd_methods_deep_json_and_bad_lengths_are_json_refusals(server):
    cases = 0
    for method in ("OPTIONS", "PUT", "DELETE", "PATCH", "FOO"):
        status, kind, body = _raw(server, method, body=b"{}")
        assert status in (405, 501) and kind == "application/json" and "error" in json.loads(body), (method, body)
        cases += 1
    status, kind, body = _raw(server, "HEAD", "/")
    assert status == 405 and kind == "application/json" and body == b""
    deep = b"[" * 100_000 + b"]" * 100_000
    status, _, body = _raw(server, "POST", body=deep)
    assert status == 400 and "nested too deeply" in json.loads(body)["error"]
    for length in ("abc", "-5"):
        status, _, body = _raw(server, "POST", body=b"{}", headers={"Content-Length": length})
        assert status == 400 and "Content-Length must be a number of bytes" in json.loads(body)["error"], body
    cases += 4
    assert cases == STUDIO_BAD_REQUESTS
    assert post(server, "/api/generate", {"n": 1, "steps": 1})[0] == 200
