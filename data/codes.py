"""Pre-tokenized code files: stage two reads token grids from here and never runs the encoder.

A code directory holds, per split, ``<split>.npy`` (M, h, w) integer token grids (int16 when K fits,
else int32; memory-mapped on read), ``<split>_attrs.npy`` (M, A) uint8 attributes when the dataset has
them, and one ``codes.json`` header naming the tokenizer checkpoint (path and sha256), codebook size,
grid, dtype, the dataset description and whether horizontally flipped copies were appended.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from core.checkpoint import file_sha256
from core.errors import UserError

FORMAT = "straight-maskgit-codes"


class CodeFileError(UserError):
    """A code file is missing, stale (other tokenizer) or inconsistent."""


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest signed integer type holding ids 0..K-1."""
    if num_codes <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    if num_codes <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    raise CodeFileError(f"a codebook of {num_codes} codes does not fit a 32-bit code file")


@dataclass
class CodeHeader:
    tokenizer: str  # path of the tokenizer checkpoint that produced the codes
    tokenizer_sha256: str
    num_codes: int
    grid: tuple[int, int]
    dtype: str
    flip: bool  # horizontally flipped copies appended after the originals
    attr_names: list[str]
    splits: dict[str, int]  # split -> number of grids (flipped copies included)
    dataset: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (older headers: none)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__, "grid": list(self.grid)}


def write_code_dir(out_dir: str | os.PathLike, header: CodeHeader,
                   arrays: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Path:
    """Write a whole code directory atomically: every split's arrays and the header (with each file's
    sha256 and row count) go to a temporary directory that then replaces ``out_dir``. A failure at any
    point leaves the previous directory as it was; splits not in ``arrays`` do not survive."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    header.splits, header.files = {}, {}
    try:
        for split, (codes, attrs) in arrays.items():
            header.splits[split] = len(codes)
            for name, arr in ((f"{split}.npy", codes), (f"{split}_attrs.npy", attrs)):
                if arr is not None:
                    np.save(tmp / name, arr)
                    header.files[name] = file_sha256(tmp / name)
        (tmp / "codes.json").write_text(json.dumps(header.to_json(), indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_header(code_dir: str | os.PathLike) -> CodeHeader:
    path = Path(code_dir) / "codes.json"
    if not path.is_file():
        raise CodeFileError(f"no code file header at {path}; run pretokenize.py (make maskgit does) first")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CodeFileError(f"{path} is not valid JSON ({e.msg})") from None
    if raw.pop("format", None) != FORMAT:
        raise CodeFileError(f"{path} is not a {FORMAT} header")
    try:
        header = CodeHeader(**raw)
    except TypeError as e:
        raise CodeFileError(f"{path}: malformed header ({e})") from None
    header.grid = tuple(header.grid)
    return header


def check_matches_tokenizer(header: CodeHeader, tokenizer_sha256: str, num_codes: int, grid: tuple[int, int],
                            code_dir: str | os.PathLike, tokenizer_path: str | os.PathLike) -> None:
    """Refuse a stale code file: made by another tokenizer, or for another codebook size or grid."""
    problems = []
    if header.tokenizer_sha256 != tokenizer_sha256:
        problems.append(f"it was made by tokenizer sha256 {header.tokenizer_sha256} ({header.tokenizer}), "
                        f"but {tokenizer_path} has sha256 {tokenizer_sha256}")
    if header.num_codes != num_codes:
        problems.append(f"codebook size {header.num_codes} != tokenizer's {num_codes}")
    if tuple(header.grid) != tuple(grid):
        problems.append(f"grid {tuple(header.grid)} != tokenizer's {tuple(grid)}")
    if problems:
        raise CodeFileError(f"stale code file {code_dir}: " + "; ".join(problems) + "; re-run pretokenize.py")


class CodeDataset(Dataset):
    """Token grids of one split as {"tokens": (h*w,) long, "attrs": (A,) long}. Ids are range-checked once."""

    def __init__(self, code_dir: str | os.PathLike, split: str = "train") -> None:
        self.header = read_header(code_dir)
        path = Path(code_dir) / f"{split}.npy"
        if split not in self.header.splits or not path.is_file():
            raise CodeFileError(f"no '{split}' split in {code_dir} (have: {', '.join(self.header.splits)})")
        for name in (f"{split}.npy", f"{split}_attrs.npy"):
            if name in self.header.files and file_sha256(Path(code_dir) / name) != self.header.files[name]:
                raise CodeFileError(f"{Path(code_dir) / name} is not the file codes.json describes (sha256 differs); "
                                    f"re-run pretokenize.py")
        try:
            self.codes = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CodeFileError(f"{path} is not a plain integer array ({e})") from None
        h, w = self.header.grid
        if self.codes.ndim != 3 or self.codes.shape[1:] != (h, w) or self.codes.dtype != np.dtype(self.header.dtype):
            raise CodeFileError(f"{path}: expected ({'M'}, {h}, {w}) {self.header.dtype}, "
                                f"got {self.codes.shape} {self.codes.dtype}")
        if len(self.codes) != self.header.splits[split]:
            raise CodeFileError(f"{path} has {len(self.codes)} grids, codes.json says {self.header.splits[split]}; "
                                f"re-run pretokenize.py")
        lo, hi = int(self.codes.min()), int(self.codes.max())
        if lo < 0 or hi >= self.header.num_codes:
            raise CodeFileError(f"{path} holds token ids in [{lo}, {hi}], outside the codebook [0, {self.header.num_codes})")
        attrs_path = Path(code_dir) / f"{split}_attrs.npy"
        self.attrs = np.load(attrs_path, allow_pickle=False) if attrs_path.is_file() else None
        if self.header.attr_names and self.attrs is None:
            raise CodeFileError(f"{attrs_path} is missing (codes.json names {len(self.header.attr_names)} attributes)")
        expected = (len(self.codes), len(self.header.attr_names))
        if self.attrs is not None and self.attrs.shape != expected:
            raise CodeFileError(f"{attrs_path} has shape {self.attrs.shape}, expected ({len(self.codes)}, "
                                f"{len(self.header.attr_names)}): one row of {len(self.header.attr_names)} attributes per grid")

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i = key[0] if isinstance(key, tuple) else key  # (index, draw) from StepSampler: codes draw nothing
        tokens = torch.from_numpy(np.asarray(self.codes[i], dtype=np.int64)).flatten()
        attrs = torch.from_numpy(self.attrs[i].astype(np.int64)) if self.attrs is not None else torch.zeros(0, dtype=torch.long)
        return {"tokens": tokens, "attrs": attrs}
