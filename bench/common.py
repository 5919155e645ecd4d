"""What the bench/ scripts share, imported first by each of them (``python bench/x.py`` puts bench/ on the
path): this checkout's packages on sys.path (ahead of an installed copy), the benchmarks' data folder, and
how a result is written.
"""
from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.files import write_json  # noqa: E402
from data import find_images  # noqa: E402

DEFAULT_DATA = os.environ.get("BENCH_DATA", "")  # the benchmarks' image folder: --data, else $BENCH_DATA
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def resolve_image_folder(path: str, cache_root: str | Path = "runs/cache") -> Path:
    """A folder of images for ``path``: the folder itself, or its tarball(s) extracted once under cache_root.

    ``path`` may be an image folder, a tarball, or a folder of tarballs (the shared data's layout).
    Relative paths are tried from the current directory, then from the repository root.
    """
    if not path:
        raise SystemExit("data: give --data (an image folder or a folder of CelebA tarballs) or set $BENCH_DATA")
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (ROOT / p).exists():
        p = ROOT / p
    if not p.exists():
        raise SystemExit(f"data: {path} does not exist (give an image folder, or a folder of CelebA tarballs)")
    if p.is_file():
        tarballs = [p] if p.name.endswith(TARBALL_SUFFIXES) else []
    else:
        tarballs = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(TARBALL_SUFFIXES))
        if not tarballs:
            return p  # an image folder; build_dataset checks it and names what is wrong
    if not tarballs:
        raise SystemExit(f"data: {p} is a file but not a tarball ({', '.join(TARBALL_SUFFIXES)})")
    name = p.name if p.is_dir() else p.name.split(".")[0]
    dest = Path(cache_root)
    if not dest.is_absolute():
        dest = ROOT / dest
    dest = dest / name
    stamp = dest / ".extracted"
    wanted = "\n".join(f"{t.name} {t.stat().st_size}" for t in tarballs)
    if stamp.exists() and stamp.read_text() == wanted:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for t in tarballs:
        print(f"extracting {t} -> {dest}", file=sys.stderr, flush=True)
        with tarfile.open(t) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")  # refuses absolute paths, links out of dest, devices
            else:
                tar.extractall(dest)
    if not find_images(dest):
        raise SystemExit(f"data: no images found in {dest} after extracting {', '.join(t.name for t in tarballs)}")
    stamp.write_text(wanted)
    return dest


def write_result(path: str | Path, result: dict) -> None:
    """Write a benchmark's result as indented JSON (creating the folder; core.files.write_json) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"-> {path}")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean of ``values`` (e.g. per-seed paired differences) and its 95 % Student t confidence interval
    (n - 1 degrees of freedom); the bounds are nan for a single value."""
    import statistics

    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half
