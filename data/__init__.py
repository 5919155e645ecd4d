"""Data: CelebA / image folders / procedural faces -> dicts of [-1, 1] image tensors and 0/1 attributes.

Scripts use ``DataConfig`` and ``build_dataset``; the rest is exported for tests,
tools and other packages (``to_uint8`` for FID, ``describe()`` for the run directory).
"""
from data.celeba import FileIndex, index_files, locate_celeba, read_attributes, read_partition
from data.dataset import DataConfig, FileImages, ImageDataset, SkippedFile, build_dataset, seed_worker
from data.images import IMAGE_EXTENSIONS, BadImageError, DataError, find_images, load_rgb, to_rgb
from data.procedural import ATTRIBUTE_NAMES as PROCEDURAL_ATTRIBUTES
from data.procedural import ProceduralFaces, render_face, sample_params
from data.splits import describe_seeded, index_range_split, normalize_split, num_val, seeded_split
from data.transforms import (
    REFERENCE_WIDTH,
    crop_box,
    crop_side,
    hflip,
    preprocess_uint8,
    to_float,
    to_uint8,
)

__all__ = [
    "BadImageError",
    "DataConfig",
    "DataError",
    "FileImages",
    "FileIndex",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "PROCEDURAL_ATTRIBUTES",
    "ProceduralFaces",
    "REFERENCE_WIDTH",
    "SkippedFile",
    "build_dataset",
    "crop_box",
    "crop_side",
    "describe_seeded",
    "find_images",
    "hflip",
    "index_files",
    "index_range_split",
    "load_rgb",
    "locate_celeba",
    "normalize_split",
    "num_val",
    "preprocess_uint8",
    "read_attributes",
    "read_partition",
    "render_face",
    "sample_params",
    "seed_worker",
    "seeded_split",
    "to_float",
    "to_rgb",
    "to_uint8",
]
