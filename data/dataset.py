"""The one entry point for scripts: ``DataConfig`` -> ``build_dataset`` (loaders: ``training.sampler``).

Items are dicts::

    {"image": FloatTensor (3, R, R) in [-1, 1],
     "attrs": LongTensor (A,) of 0/1 (shape (0,) without attributes),
     "index": int}        # dataset index of the image actually returned (see "Bad files")

Bad files. A file that fails to decode while training (``BadImageError``: truncated, corrupt, ...)
never stops the run: ``__getitem__`` logs one line naming the file and the reason (logger
``data.dataset``, level WARNING, once per file per process), records it in ``dataset.skipped``, and
returns the next index that loads (wrapping around), so the substitute is deterministic. ``index``
in the item is then the substitute's index. With DataLoader workers each worker process keeps its
own ``skipped`` list, which the main process never sees: there **the log lines are the record**.
``dataset.skipped`` is complete when ``num_workers=0`` or ``cache=True`` (the cache decodes every
file once, in the constructing process, so all bad files are found and logged before training).

Images whose crop is smaller than the output resolution are upsampled, not skipped: one line is
logged for the first, and all are listed in ``dataset.upsampled`` (same per-process caveat).
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from core.config import require
from data.celeba import FileIndex, index_files
from data.images import BadImageError, DataError, image_size, load_rgb
from data.procedural import ProceduralFaces
from data.splits import check_val_fraction, index_range_split, normalize_split
from data.transforms import REFERENCE_WIDTH, crop_box, crop_side, hflip, needs_upsampling, preprocess_uint8, to_float

logger = logging.getLogger(__name__)

PROCEDURAL = "procedural"


@dataclass
class DataConfig:
    """What to load and how. ``source``: "procedural", or a path to a CelebA root / image folder."""

    source: str = PROCEDURAL
    resolution: int = 64
    crop: int | None = 140       # square crop side in the 178-wide CelebA frame, scales with width; 0/None: none
    #                              (files only: procedural faces are drawn at ``resolution`` directly)
    flip: bool = True            # random horizontal flip, train split only
    val_fraction: float = 0.1    # held-out fraction when there is no official partition
    split_seed: int = 0          # seed of that split; for "procedural" also the seed of the faces
    num_images: int = 10000      # procedural only
    cache: bool = False          # decode once at construction, keep uint8 tensors in memory
    num_workers: int = 2         # DataLoader workers of the training loop

    def __post_init__(self) -> None:  # types are checked by core.config.from_dict
        self.source = str(self.source)
        require(self.source.strip() != "", "data.source: expected 'procedural' or a path to a CelebA root or image folder")
        require(self.resolution > 0, f"data.resolution: expected a positive integer, got {self.resolution}")
        require(self.crop is None or self.crop >= 0,
                f"data.crop: expected an integer >= 0 (pixels in the 178-wide frame; 0 or None for no crop), got {self.crop}")
        require(0.0 < self.val_fraction < 1.0,
                f"data.val_fraction: expected a number strictly between 0 and 1, got {self.val_fraction}")
        require(self.split_seed >= 0, f"data.split_seed: expected an integer >= 0, got {self.split_seed}")
        require(self.num_images >= 2, f"data.num_images: expected an integer >= 2, got {self.num_images}")
        require(self.num_workers >= 0, f"data.num_workers: expected an integer >= 0, got {self.num_workers}")


class SkippedFile(NamedTuple):
    index: int
    path: str
    reason: str


class ImageSource(Protocol):
    """What ``ImageDataset`` needs from a backend (``FileImages``, ``ProceduralFaces``)."""

    attr_names: list[str]

    def __len__(self) -> int: ...
    def load(self, i: int) -> torch.Tensor: ...  # uint8 (3, R, R); may raise BadImageError
    def attrs(self, i: int) -> torch.Tensor: ...  # long (A,)
    def name(self, i: int) -> str: ...


class FileImages:
    """Image files of a ``FileIndex``, decoded with ``load_rgb`` and center-crop-resized."""

    def __init__(self, index: FileIndex, resolution: int, crop: int | None) -> None:
        self.index = index
        self.resolution = resolution
        self.crop = crop
        self.attr_names = list(index.attr_names)
        self._attrs = index.attrs.long()  # (N, A)
        self._upsampled: dict[str, None] = {}  # ordered set of file paths

    def __len__(self) -> int:
        return len(self.index.paths)

    @property
    def upsampled(self) -> list[str]:
        return list(self._upsampled)

    def name(self, i: int) -> str:
        return str(self.index.paths[i])

    def attrs(self, i: int) -> torch.Tensor:
        return self._attrs[i]

    def load(self, i: int) -> torch.Tensor:
        img = load_rgb(self.index.paths[i])
        if needs_upsampling(img.width, img.height, self.resolution, self.crop):
            if not self._upsampled:
                side = crop_side(img.width, img.height, self.crop)
                logger.warning("upsampling %s: its %dx%d crop is smaller than the output %d "
                               "(further cases are only counted in dataset.upsampled)",
                               self.index.paths[i], side, side, self.resolution)
            self._upsampled[str(self.index.paths[i])] = None
        return preprocess_uint8(img, self.resolution, self.crop)


class ImageDataset(Dataset):
    """Map-style dataset over an ``ImageSource`` with flip, optional cache and bad-file substitution."""

    def __init__(self, source: ImageSource, *, flip: bool = False, cache: bool = False,
                 info: dict | None = None) -> None:
        if len(source) == 0:
            raise DataError(f"dataset {info.get('source') if info else source!r} has no images")
        self.source = source
        self.flip = flip
        self.attr_names: list[str] = list(source.attr_names)
        self.skipped: list[SkippedFile] = []
        self.default_num_workers = 0
        self._info = dict(info or {})
        self._bad: set[int] = set()
        self._alias: dict[int, int] = {}     # cache mode: bad index -> substitute index
        self._cache: torch.Tensor | None = None
        if cache:
            self._fill_cache()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def upsampled(self) -> list[str]:
        return list(getattr(self.source, "upsampled", []))

    def __len__(self) -> int:
        return len(self.source)

    def _record_bad(self, i: int, err: BadImageError) -> None:
        self._bad.add(i)
        self.skipped.append(SkippedFile(i, err.path, err.reason))
        logger.warning("skipping bad image %s: %s (the next readable image takes its place: that image counts "
                       "twice per epoch)", err.path, err.reason)

    def _load_or_substitute(self, i: int) -> tuple[int, torch.Tensor]:
        n = len(self.source)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return j, self.source.load(j)
            except BadImageError as e:
                self._record_bad(j, e)
        raise DataError(f"none of the {n} images of {self._info.get('source', 'the dataset')} could be "
                        "loaded; see the 'skipping bad image' log lines")

    def _fill_cache(self) -> None:
        n = len(self.source)
        first: torch.Tensor | None = None
        for i in range(n):
            try:
                x = self.source.load(i)
            except BadImageError as e:
                self._record_bad(i, e)
                continue
            if first is None:
                first = x
                self._cache = torch.empty((n, *x.shape), dtype=torch.uint8)  # (N, 3, R, R)
            self._cache[i] = x
        if first is None:
            raise DataError(f"none of the {n} images of {self._info.get('source', 'the dataset')} could be "
                            "loaded; see the 'skipping bad image' log lines")
        for i in sorted(self._bad):
            j = next((i + k) % n for k in range(1, n) if (i + k) % n not in self._bad)
            self._alias[i] = j

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``dataset[i]``, or ``dataset[(i, draw)]`` as ``training.sampler.StepSampler`` asks: the flip
        is then a function of (draw, i) only (draw = seed + epoch), so it does not depend on which
        loader worker or which resumed process reads the item. A plain index uses draw 0."""
        i, draw = key if isinstance(key, tuple) else (key, 0)
        i = int(i)  # samplers may hand out numpy / torch integers
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of {len(self)}")
        if self._cache is not None:
            j = self._alias.get(i, i)
            x = self._cache[j]
        else:
            j, x = self._load_or_substitute(i)
        image = to_float(x)  # (3, R, R) in [-1, 1]
        if self.flip and flip_coin(draw, i):
            image = hflip(image)
        return {"image": image, "attrs": self.source.attrs(j), "index": j}

    def describe(self) -> dict:
        """JSON-able summary for the run directory: source, split, counts, preprocessing."""
        return {**self._info, "count": len(self), "flip": self.flip, "cache": self._cache is not None,
                "attr_names": list(self.attr_names), "skipped": self.num_skipped,
                "upsampled": len(self.upsampled)}


def _crop_info(paths: list[Path], crop: int | None) -> dict:
    """The crop in pixels, measured on the first image whose header reads."""
    for path in paths[:10]:
        try:
            w, h = image_size(path)
        except BadImageError:
            continue
        return {"reference": crop, "reference_width": REFERENCE_WIDTH, "pixels": crop_side(w, h, crop),
                "box_ltrb": list(crop_box(w, h, crop)), "measured_on": f"{w}x{h} ({path.name})",
                "rule": "side = round_half_up(crop * W / 178), offsets floor((W - side) / 2)"}
    return {"reference": crop, "reference_width": REFERENCE_WIDTH, "pixels": None}


def build_dataset(cfg: DataConfig, split: str, train: bool | None = None) -> ImageDataset:
    """The dataset of ``split`` ('train', 'val'/'valid', 'test', 'all'); raises DataError if unusable.

    ``train`` (default: split == 'train') turns on the flip augmentation when ``cfg.flip`` is set.
    """
    if not isinstance(cfg, DataConfig):
        raise ValueError(f"build_dataset: expected a DataConfig, got {type(cfg).__name__}")
    split = normalize_split(split)
    check_val_fraction(cfg.val_fraction)
    train = (split == "train") if train is None else bool(train)
    info = {"source": cfg.source, "split": split, "train": train, "resolution": cfg.resolution,
            "config": asdict(cfg)}
    if cfg.source == PROCEDURAL:
        tr, va = index_range_split(cfg.num_images, cfg.val_fraction)
        chosen = {"train": tr, "val": va, "test": va, "all": range(cfg.num_images)}[split]
        source: ImageSource = ProceduralFaces(cfg.resolution, seed=cfg.split_seed, length=len(chosen),
                                              offset=chosen.start)
        info.update(kind="procedural", crop=None, split_info={
            "method": "index_range", "seed": cfg.split_seed, "val_fraction": cfg.val_fraction,
            "counts": {"train": len(tr), "val": len(va), "test": len(va), "all": cfg.num_images},
            "indices": [chosen.start, chosen.stop],
            "note": "procedural faces: train = first indices, val = last; split 'test' is the validation set"})
    else:
        index = index_files(cfg.source, split, cfg.val_fraction, cfg.split_seed)
        source = FileImages(index, cfg.resolution, cfg.crop)
        info.update(kind=index.kind, image_root=str(index.image_root), crop=_crop_info(index.paths, cfg.crop),
                    split_info=index.split, notes=list(index.notes))
    dataset = ImageDataset(source, flip=cfg.flip and train, cache=cfg.cache, info=info)
    dataset.default_num_workers = cfg.num_workers
    return dataset


def flip_coin(draw: int, index: int) -> bool:
    """A fair coin that is a pure function of (draw, index): the same in every process and worker."""
    return random.Random(f"flip:{draw}:{index}").random() < 0.5


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32  # DataLoader sets this to base_seed + worker_id
    np.random.seed(seed)
    random.seed(seed)
