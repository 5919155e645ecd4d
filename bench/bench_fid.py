"""Feature-extraction throughput: this project's FID pipeline vs torch-fidelity's ``calculate_metrics``.

Both run the same torch-fidelity InceptionV3 on the same N CelebA images, preprocessed once by the data
package (crop 140 in the 178-px frame = 70x70 at (9, 19) on the 89x109 copy, antialiased resize to 64)
and written as PNG files, so both pipelines decode the same files.

* ours: ``eval.images.open_folder`` -> ``InceptionExtractor`` -> streaming ``FeatureStats``
  (what ``python -m eval ref`` / ``score`` do), then ``frechet_distance``;
* torch-fidelity: ``calculate_metrics(input1=dir, input2=small_dir, fid=True, cache=False)`` with a
  second input of 8 of the same files, so it extracts N + 8 images and computes one FID; its
  extraction-only rate subtracts the time of that FID, measured separately on the same statistics.
  Run twice: with its default DataLoader (4 worker processes) and with ``save_cpu_ram=True``
  (decoding in the main process, like ours).

Without ``--weights`` a random-initialised network is used (speed does not depend on the weights).

    python bench/bench_fid.py --quick          # 200 images, ~3 min on 2 CPU cores
    python bench/bench_fid.py --n 1000 [--data FOLDER] [--device cpu] [--out runs/bench/fid.json]

``--data`` takes an image folder, a tarball, or a folder of tarballs (default: the shared CelebA copy,
extracted once under runs/cache, as bench_loader.py does).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_fidelity  # noqa: E402
from common import DEFAULT_DATA, resolve_image_folder, write_result  # noqa: E402
from PIL import Image  # noqa: E402
from torch_fidelity.metric_fid import fid_statistics_to_metric  # noqa: E402

from data.images import find_images, load_rgb  # noqa: E402
from data.transforms import preprocess_uint8  # noqa: E402
from eval.images import open_folder  # noqa: E402
from eval.inception import FEATURE_DIM, InceptionExtractor, make_random_weights  # noqa: E402
from eval.stats import FeatureStats, frechet_distance  # noqa: E402

SMALL = 8  # images in torch-fidelity's second input
QUICK_N = 200


def prepare(images: Path, n: int, resolution: int, crop: int, out: Path) -> None:
    files = sorted(find_images(images))[:n]
    if len(files) < n:
        sys.exit(f"error: {images} holds {len(files)} images, --n asks for {n}")
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        x = preprocess_uint8(load_rgb(path), resolution, crop)  # (3, R, R) uint8
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(out / f"{i:05d}.png")


def run_ours(folder: Path, extractor: InceptionExtractor, batch_size: int) -> tuple[float, FeatureStats]:
    images = open_folder(folder)
    stats = FeatureStats(FEATURE_DIM)
    start = time.perf_counter()
    for batch in images.batches(batch_size):
        stats.update(extractor(batch))
    return time.perf_counter() - start, stats


def main() -> None:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # torch-fidelity's 4 workers
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", "--images", default=DEFAULT_DATA,
                   help="CelebA aligned images: a folder, a tarball or a folder of tarballs")
    p.add_argument("--quick", action="store_true", help=f"--n {QUICK_N} (unless --n is given)")
    p.add_argument("--n", type=int, default=None, help=f"images (default 1000; --quick: {QUICK_N})")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--crop", type=int, default=140, help="center crop in the 178-px frame (data package)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", help="Inception weights (default: random, written to a temp dir)")
    p.add_argument("--out", default="runs/bench/fid.json")
    args = p.parse_args()
    args.n = args.n or (QUICK_N if args.quick else 1000)
    folder = resolve_image_folder(args.data)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        prepare(folder, args.n, args.resolution, args.crop, tmp / "png")
        prep_s = time.perf_counter() - t
        weights = Path(args.weights) if args.weights else make_random_weights(tmp / "random-inception.pth")
        extractor = InceptionExtractor.load(weights, allow_unverified=True, device=args.device)

        extractor(next(open_folder(tmp / "png").batches(args.batch_size)))  # warm-up: first-call overheads
        ours_s, stats = run_ours(tmp / "png", extractor, args.batch_size)  # again after torch-fidelity, below
        t = time.perf_counter()
        frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
        ours_fid_s = time.perf_counter() - t

        small = tmp / "small"
        small.mkdir()
        for path in sorted((tmp / "png").iterdir())[:SMALL]:
            (small / path.name).write_bytes(path.read_bytes())
        tf_s = {}
        for save_cpu_ram in (False, True):  # True: no DataLoader worker processes (4 by default)
            t = time.perf_counter()
            torch_fidelity.calculate_metrics(
                input1=str(tmp / "png"), input2=str(small), fid=True, cuda=args.device.startswith("cuda"),
                batch_size=args.batch_size, feature_extractor_weights_path=str(weights), cache=False,
                verbose=False, save_cpu_ram=save_cpu_ram)
            tf_s[save_cpu_ram] = time.perf_counter() - t
        ours_again_s, _ = run_ours(tmp / "png", extractor, args.batch_size)  # load drift shows as a gap
        stat = {"mu": stats.mu.astype(np.float32), "sigma": stats.sigma}  # torch-fidelity's own dtypes
        t = time.perf_counter()
        fid_statistics_to_metric(stat, stat, verbose=False)
        tf_fid_s = time.perf_counter() - t

    rows = {
        "ours (folder -> extractor -> streaming stats)": {"images": args.n, "seconds": ours_s},
        "  ours again, after the torch-fidelity runs": {"images": args.n, "seconds": ours_again_s},
        "torch-fidelity calculate_metrics (N + 8 images + FID)": {"images": args.n + SMALL, "seconds": tf_s[False]},
        "  same, minus its FID step": {"images": args.n + SMALL, "seconds": tf_s[False] - tf_fid_s},
        "  same, save_cpu_ram=True (no loader workers)": {"images": args.n + SMALL, "seconds": tf_s[True]},
        "  same, save_cpu_ram=True, minus its FID step": {"images": args.n + SMALL, "seconds": tf_s[True] - tf_fid_s},
    }
    for row in rows.values():
        row["images_per_s"] = row["images"] / row["seconds"]
    result = {
        "rows": rows, "frechet_seconds": {"ours (svd)": ours_fid_s, "torch-fidelity (eigvals)": tf_fid_s},
        "setup": {"data": str(folder), "n": args.n, "resolution": args.resolution, "crop": args.crop,
                  "batch_size": args.batch_size,
                  "device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "load_avg": os.getloadavg(), "torch": torch.__version__,
                  "torch_fidelity": torch_fidelity.__version__, "weights": extractor.describe(),
                  "platform": platform.platform(), "prepare_seconds": prep_s},
    }
    print(f"{'pipeline':52s} {'images':>7s} {'seconds':>9s} {'img/s':>8s}")
    for name, row in rows.items():
        print(f"{name:52s} {row['images']:7d} {row['seconds']:9.1f} {row['images_per_s']:8.2f}")
    print(f"Frechet distance, 2048-d: ours {ours_fid_s:.2f} s, torch-fidelity {tf_fid_s:.2f} s; "
          f"device {args.device}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
