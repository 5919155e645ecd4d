"""The README's studio picture and request times: serve RUN, time requests, drive the page, screenshot.

    python docs/studio_screenshot.py --run runs/demo --out docs/studio.png

Times are medians of 5 requests each (wall time of the HTTP round trip and the model time the
server reports) on this machine's CPU or GPU. The page is driven in headless Chromium (Debian's
`chromium` through the playwright package): sample 12 faces, inpaint the lower face of one, then mark a box over its hair.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from studio.engine import Engine
from studio.server import StudioServer

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def post(server: StudioServer, path: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(server.url + path.lstrip("/"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - t0, answer


def time_requests(server: StudioServer, repeats: int = 5) -> None:
    r = server.engine.info.resolution
    _, first = post(server, "/api/generate", {"n": 1, "seed": 0})
    sample = first["images"][0]
    quarter = [r // 4, r // 4, 3 * r // 4, 3 * r // 4]
    cases = [(f"generate n={n}, T=8", "/api/generate", {"n": n, "steps": 8}) for n in (1, 8, 16)]
    cases.append((f"inpaint box {quarter}, T=8", "/api/edit", {"image": sample["png"], "tokens": sample["tokens"],
                                                               "box": quarter, "steps": 8}))
    print(f"{'request':<32} {'wall s':>8} {'model s':>8}   (median of {repeats}; torch threads {torch.get_num_threads()})")
    for label, path, body in cases:
        runs = [post(server, path, {**body, "seed": i}) for i in range(repeats)]
        wall = statistics.median(t for t, _ in runs)
        model = statistics.median(a["seconds"] for _, a in runs)
        print(f"{label:<32} {wall:8.3f} {model:8.3f}")


def screenshot(server: StudioServer, out: Path, seed: int, pick: int) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(server.url)
        expect(page.locator("#status")).to_contain_text("samples in", timeout=600_000)
        page.fill("#seed", str(seed))
        page.fill("#n", "12")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text(f"seed {seed}", timeout=600_000)
        page.click(f"#grid .thumb >> nth={pick}")
        view = page.locator("#view").bounding_box()

        def drag_box(x0: float, y0: float, x1: float, y1: float) -> None:
            def at(x: float, y: float) -> tuple[float, float]:
                return view["x"] + x * view["width"], view["y"] + y * view["height"]
            page.mouse.move(*at(x0, y0))
            page.mouse.down()
            page.mouse.move(*at(x1, y1), steps=4)
            page.mouse.up()

        drag_box(0.26, 0.56, 0.74, 0.84)  # the lower face: regenerate it
        page.click("#regenerate")
        expect(page.locator("#status")).to_contain_text("inpainted", timeout=600_000)
        drag_box(0.22, 0.1, 0.78, 0.3)  # mark the hair, so the picture also shows what a box looks like
        page.wait_for_timeout(300)
        page.screenshot(path=str(out))
        browser.close()
    Image.open(out).convert("RGB").quantize(colors=256).save(out, optimize=True)  # a UI needs no more colours
    print(f"screenshot ({out.stat().st_size // 1024} KiB) -> {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--out", default="docs/studio.png")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pick", type=int, default=1, help="which sample of the grid to edit")
    args = p.parse_args()
    run = Path(args.run)
    engine = Engine.from_paths(run / "tokenizer" / "checkpoint.pt", run / "maskgit" / "checkpoint.pt")
    server = StudioServer(engine, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time_requests(server)
    screenshot(server, Path(args.out), args.seed, args.pick)
    server.shutdown()


if __name__ == "__main__":
    main()
