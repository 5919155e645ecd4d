"""Which image files make up a split: CelebA in the torchvision layout, or any folder of images.

CelebA layout (torchvision ``datasets.CelebA``)::

    <root>/celeba/img_align_celeba/000001.jpg ...
    <root>/celeba/list_eval_partition.txt      # "<file> <0|1|2>": 0 = train, 1 = valid, 2 = test
    <root>/celeba/list_attr_celeba.txt         # count line, 40 names, then "<file> <-1|1> x 40"

``source`` may also point at ``<root>/celeba`` or at ``img_align_celeba`` itself (annotations are then
looked for in its parent). The Kaggle ``.csv`` versions of both files are read too.

* With a partition file, splits are the official ones. Images on disk that the file does not list are
  left out, and listed images missing from disk are counted; both are noted in the description (the
  shared 10k subset is entirely official *train*, so its 'val' is empty and raises ``DataError``).
* Without one, the seeded hash-rank split of ``splits.py`` is used and 'test' is the validation set.
* With an attribute file, -1/1 become 0/1; an image the file has no row for is a ``DataError``.

Any other folder is a plain image folder: all images below it, recursively, with the seeded split
and no attributes.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.files import sha256_file
from data.images import DataError, find_images
from data.splits import describe_seeded, list_sha256, normalize_split, seeded_split

logger = logging.getLogger(__name__)

IMAGES_DIRNAME = "img_align_celeba"
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
ATTRIBUTE_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
_PARTITION_NAMES = {0: "train", 1: "val", 2: "test"}


@dataclass
class FileIndex:
    """The files of one split, in a fixed order, with their attributes and a record of the split."""

    kind: str                      # "celeba" or "folder"
    image_root: Path               # the folder the images were found in
    paths: list[Path]              # (N,) image files of the split
    attrs: torch.Tensor            # (N, A) uint8 of 0/1; A = 0 when there are no attributes
    attr_names: list[str]
    split: dict                    # JSON-able description of how the split was made
    notes: list[str] = field(default_factory=list)


def locate_celeba(root: Path) -> tuple[Path, Path] | None:
    """(images folder, annotations folder) when ``root`` is in the CelebA layout, else None."""
    for images, annotation_dir in ((root / "celeba" / IMAGES_DIRNAME, root / "celeba"),
                                   (root / IMAGES_DIRNAME, root)):
        if images.is_dir():
            return images, annotation_dir
    if root.name == IMAGES_DIRNAME and root.is_dir():
        return root, root.parent
    return None


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a whitespace- or comma-separated text file, blank lines dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from None
    if path.suffix.lower() == ".csv":
        return [(i + 1, [c.strip() for c in r]) for i, r in enumerate(csv.reader(text.splitlines())) if r]
    return [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]


def read_partition(path: Path) -> dict[str, str]:
    """file name -> 'train' | 'val' | 'test' from ``list_eval_partition.txt`` (or ``.csv``)."""
    out: dict[str, str] = {}
    for lineno, fields in _rows(path):
        if lineno == 1 and fields[:1] == ["image_id"]:  # Kaggle csv header
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{path}:{lineno}: expected '<file> <0|1|2>', got {' '.join(fields)[:80]!r}")
        out[fields[0]] = _PARTITION_NAMES[int(fields[1])]
    if not out:
        raise DataError(f"partition file {path} lists no images")
    return out


def read_attributes(path: Path, wanted: set[str]) -> tuple[list[str], dict[str, list[int]]]:
    """(attribute names, file name -> 0/1 values) from ``list_attr_celeba.txt`` (or ``.csv``).

    Only rows for ``wanted`` files are kept. Values -1/1 (or 0/1) become 0/1.
    """
    rows = _rows(path)
    if rows and len(rows[0][1]) == 1 and rows[0][1][0].isdigit():  # leading image-count line
        rows = rows[1:]
    if not rows:
        raise DataError(f"attribute file {path} is empty")
    names = rows[0][1]
    if names and names[0] == "image_id":  # Kaggle csv header names the file column
        names = names[1:]
    values: dict[str, list[int]] = {}
    for lineno, fields in rows[1:]:
        if fields[0] not in wanted:
            continue
        if len(fields) != len(names) + 1:
            raise DataError(f"{path}:{lineno}: expected a file name and {len(names)} values, got {len(fields) - 1}")
        try:
            row = [int(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{path}:{lineno}: attribute values must be -1, 0 or 1") from None
        if any(v not in (-1, 0, 1) for v in row):
            raise DataError(f"{path}:{lineno}: attribute values must be -1, 0 or 1")
        values[fields[0]] = [1 if v == 1 else 0 for v in row]
    return names, values


def _pick(split: str, train: list[int], val: list[int], test: list[int], n: int) -> list[int]:
    return {"train": train, "val": val, "test": test, "all": list(range(n))}[split]


def index_files(source: str | Path, split: str, val_fraction: float = 0.1, seed: int = 0) -> FileIndex:
    """Resolve ``source`` (CelebA root or image folder) to the files of ``split``; ``DataError`` if unusable."""
    split = normalize_split(split)
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    layout = locate_celeba(root)
    image_root = layout[0] if layout else root
    paths = find_images(image_root)
    keys = [p.relative_to(image_root).as_posix() for p in paths]
    notes: list[str] = []

    partition_file = attribute_file = None
    if layout is not None:
        partition_file = _first_existing(layout[1], PARTITION_FILES)
        attribute_file = _first_existing(layout[1], ATTRIBUTE_FILES)
        # CelebA annotations name files by base name (the Kaggle zip nests one folder deeper).
        keys = [p.name for p in paths]
        if len(set(keys)) != len(keys):
            raise DataError(f"duplicate image file names under {image_root}: CelebA names must be unique")

    if partition_file is not None:
        partition = read_partition(partition_file)
        on_disk = [i for i, k in enumerate(keys) if k in partition]
        unlisted = len(keys) - len(on_disk)
        missing = len(set(partition) - set(keys))
        if unlisted:
            notes.append(f"{unlisted} image(s) under {image_root} are not in {partition_file.name}; left out")
        if missing:
            notes.append(f"{missing} of {len(partition)} image(s) listed in {partition_file.name} are not on disk")
        by_split = {s: [i for i in on_disk if partition[keys[i]] == s] for s in ("train", "val", "test")}
        chosen = on_disk if split == "all" else by_split[split]
        description = {
            "method": "official_partition",
            "file": str(partition_file),
            "file_sha256": sha256_file(partition_file),
            "counts": {**{s: len(v) for s, v in by_split.items()}, "all": len(on_disk)},
            "val_sha256": list_sha256([keys[i] for i in by_split["val"]]),
            "not_on_disk": missing,
            "not_in_partition": unlisted,
        }
        if not chosen:
            raise DataError(
                f"split '{split}' is empty: {partition_file} assigns none of the {len(on_disk)} images "
                f"found under {image_root} to it")
    else:
        if len(keys) >= 2:
            train, val = seeded_split(keys, val_fraction, seed)
            description = describe_seeded(keys, train, val, val_fraction, seed)
        elif split == "all":
            train, val = [], []
            description = {"method": "all", "counts": {"all": len(keys)}}
        else:
            raise DataError(f"only {len(keys)} image under {image_root}: cannot split it into train and val")
        chosen = _pick(split, train, val, val, len(keys))
        if split == "test":
            notes.append("no partition file: split 'test' is the validation set")

    attr_names: list[str] = []
    attrs = torch.zeros(len(chosen), 0, dtype=torch.uint8)
    if attribute_file is not None:
        wanted = {keys[i] for i in chosen}
        attr_names, values = read_attributes(attribute_file, wanted)
        lacking = sorted(wanted - set(values))
        if lacking:
            raise DataError(f"{attribute_file} has no row for {len(lacking)} image(s), e.g. {lacking[0]}")
        attrs = torch.tensor([values[keys[i]] for i in chosen], dtype=torch.uint8).reshape(len(chosen), len(attr_names))
        description["attribute_file"] = str(attribute_file)

    for note in notes:
        logger.warning("%s: %s", root, note)
    return FileIndex(
        kind="celeba" if layout is not None else "folder",
        image_root=image_root,
        paths=[paths[i] for i in chosen],
        attrs=attrs,
        attr_names=attr_names,
        split=description,
        notes=notes,
    )
