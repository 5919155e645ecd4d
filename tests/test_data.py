"""Tests for data/: crop arithmetic, decoding of odd and broken files, splits, procedural faces, loaders.

Everything is generated in tmp folders; no test reads real CelebA.
"""
from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    PROCEDURAL_ATTRIBUTES,
    BadImageError,
    DataConfig,
    DataError,
    ProceduralFaces,
    build_dataset,
    crop_box,
    crop_side,
    find_images,
    load_rgb,
    num_val,
    preprocess_uint8,
    render_face,
    sample_params,
    seed_worker,
    seeded_split,
    to_float,
    to_uint8,
)
from training.sampler import step_loader

RNG = np.random.default_rng(0)


def noise_image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    arr = RNG.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny file whose header claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def cfg(source: str | Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), **{"num_workers": 0, "flip": False, **kw})


# ----------------------------------------------------------------------------- transforms

def test_crop_box_reference_frames():
    assert crop_box(178, 218, 140) == (19, 39, 159, 179)  # official aligned CelebA: 140 at (19, 39)
    assert crop_box(89, 109, 140) == (9, 19, 79, 89)      # shared half-size copy: 70 at (9, 19)
    assert crop_box(89, 109, None) == (0, 10, 89, 99)     # no crop: largest centred square
    assert crop_box(89, 109, 0) == crop_box(89, 109, None)
    assert crop_box(400, 100, 140) == (150, 0, 250, 100)  # crop larger than the height is clamped
    assert crop_side(89, 109, 141) == 71  # 70.5 rounds half up (Python's round() would give 70)


def test_preprocess_takes_exactly_the_crop_box():
    img = noise_image(178, 218)
    x = preprocess_uint8(img, 140, 140)  # same size as the crop: no resampling, pixels must match
    expected = torch.from_numpy(np.array(img)[39:179, 19:159]).permute(2, 0, 1)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("size", [(89, 109), (178, 218), (30, 40)])
def test_transform_shape_and_range(size):
    x = to_float(preprocess_uint8(noise_image(*size), 64, 140))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5
    u = preprocess_uint8(noise_image(*size), 32, 140)
    assert torch.equal(to_uint8(to_float(u)), u)


# ----------------------------------------------------------------------------- decoding

def test_mode_conversions(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[0, 1] = (0, 0, 255, 255)    # opaque blue stays blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 255)

    g16 = np.full((4, 4), 30000, np.uint16)
    g16[0, 0], g16[0, 1] = 65535, 0
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert tuple(out[1, 1]) == (117, 117, 117)  # 30000 / 257 = 116.7: scaled, not clipped to 255
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (0, 200, 0)

    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    img = load_rgb(tmp_path / "c.jpg")
    assert img.mode == "RGB" and img.getpixel((4, 4))[1] < 40  # magenta: little green

    noise_image(8, 8, "L").save(tmp_path / "l.png")
    out = np.asarray(load_rgb(tmp_path / "l.png"))
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("name,content,reason", [
    ("zero.jpg", b"", "empty file"),
    ("text.jpg", b"this is not a jpeg\n" * 10, "not a recognised image format"),
    ("random.png", bytes(RNG.integers(0, 256, 500, dtype=np.uint8)), "not a recognised image format"),
    ("bomb.png", bomb_png(), "decompression bomb"),
])
def test_bad_files_raise_one_line_error(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadImageError) as e:
        load_rgb(tmp_path / name)
    assert reason in str(e.value) and name in str(e.value) and "\n" not in str(e.value)
    assert e.value.path == str(tmp_path / name)


def test_truncated_jpeg_is_bad(tmp_path):
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, "JPEG", quality=95)
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError, match="cannot decode"):
        load_rgb(tmp_path / "t.jpg")


def test_max_image_pixels_is_honoured(tmp_path, monkeypatch):
    noise_image(40, 40).save(tmp_path / "x.png")
    assert load_rgb(tmp_path / "x.png").size == (40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow alone would only warn
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(tmp_path / "x.png")


# ----------------------------------------------------------------------------- folders

GOOD = ["good.jpg", "good.png", "gray.png", "rgba.png", "g16.png", "palette.png", "cmyk.jpg",
        "tiny.png", "ünïcødé_顔.jpg", "sub/UPPER.JPEG"]
BAD = {"zero.jpg": "empty file", "trunc.jpg": "cannot decode", "random.png": "not a recognised",
       "text.jpg": "not a recognised", "bomb.png": "decompression bomb"}


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    (root / "sub").mkdir()
    noise_image(89, 109).save(root / "good.jpg")
    noise_image(89, 109).save(root / "good.png")
    noise_image(89, 109, "L").save(root / "gray.png")
    Image.fromarray(RNG.integers(0, 256, (109, 89, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(RNG.integers(0, 65536, (109, 89), dtype=np.uint16)).save(root / "g16.png")
    noise_image(89, 109).convert("P").save(root / "palette.png", transparency=0)
    Image.new("CMYK", (89, 109), (10, 200, 30, 0)).save(root / "cmyk.jpg")
    noise_image(12, 10).save(root / "tiny.png")  # crop of 9 px < 64: upsampled
    noise_image(89, 109).save(root / "ünïcødé_顔.jpg")
    noise_image(89, 109).save(root / "sub" / "UPPER.JPEG", "JPEG")
    (root / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    noise_image(89, 109).save(buf, "JPEG")
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "random.png").write_bytes(bytes(RNG.integers(0, 256, 2000, dtype=np.uint8)))
    (root / "text.jpg").write_text("hello, I am text\n")
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "notes.txt").write_text("not an image extension: ignored")
    noise_image(8, 8).save(root / ".hidden.jpg")  # hidden: ignored
    os.symlink(root, root / "sub" / "loop")  # a directory symlink loop back to the root
    return root


def test_find_images_counts_each_file_once(messy_folder):
    found = find_images(messy_folder)
    rel = [p.relative_to(messy_folder).as_posix() for p in found]
    assert sorted(rel) == sorted(GOOD + list(BAD)) and len(rel) == len(set(rel))
    assert found == find_images(messy_folder)  # deterministic order


def test_messy_folder_exact_used_and_skipped(messy_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = build_dataset(cfg(messy_folder), "all")
        assert len(ds) == len(GOOD) + len(BAD)
        items = [ds[i] for i in range(len(ds))]  # must never raise
    assert all(it["image"].shape == (3, 64, 64) and it["attrs"].shape == (0,) for it in items)
    assert all(-1 <= it["image"].min() and it["image"].max() <= 1 for it in items)
    assert {Path(s.path).name: s.reason for s in ds.skipped}.keys() == BAD.keys()
    for s in ds.skipped:
        assert BAD[Path(s.path).name] in s.reason
    used = {Path(ds.source.name(it["index"])).name for it in items}
    assert used == {Path(g).name for g in GOOD}
    assert [Path(p).name for p in ds.upsampled] == ["tiny.png"]
    lines = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(lines) == len(BAD) and all("\n" not in line for line in lines)
    assert all("takes its place: that image counts twice per epoch" in line for line in lines)  # said, not silent
    for i in range(len(ds)):  # a second pass neither re-warns nor re-records
        ds[i]
    assert ds.num_skipped == len(BAD)
    json.dumps(ds.describe())


def test_substitute_is_next_loadable_index(messy_folder):
    ds = build_dataset(cfg(messy_folder), "all")
    names = [Path(ds.source.name(i)).name for i in range(len(ds))]
    for i, name in enumerate(names):
        if name in BAD:
            j = ds[i]["index"]
            k = next((i + d) % len(ds) for d in range(1, len(ds)) if names[(i + d) % len(ds)] not in BAD)
            assert j == k


def test_cache_matches_lazy_loading(messy_folder):
    lazy = build_dataset(cfg(messy_folder), "all")
    cached = build_dataset(cfg(messy_folder, cache=True), "all")
    assert cached.num_skipped == len(BAD)  # all found at construction
    for i in range(len(lazy)):
        a, b = lazy[i], cached[i]
        assert a["index"] == b["index"] and torch.equal(a["image"], b["image"])


def test_loader_with_workers_survives_bad_files(messy_folder):
    ds = build_dataset(cfg(messy_folder, num_workers=2), "all")
    loader = step_loader(ds, batch_size=4, seed=0, start_batch=0, num_workers=2, worker_init_fn=seed_worker)
    batches = [b for b, _ in zip(loader, range(len(ds) // 4))]  # one epoch
    assert sum(len(b["index"]) for b in batches) == len(ds) // 4 * 4  # bad files substituted, never a crash
    assert batches[0]["image"].shape == (4, 3, 64, 64)


def test_missing_or_empty_paths_fail_at_construction(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(cfg(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        build_dataset(cfg(tmp_path / "empty"), "train")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        build_dataset(cfg(tmp_path / "empty"), "train")
    assert issubclass(DataError, ValueError)


def test_all_bad_files_is_a_data_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("x")
    ds = build_dataset(cfg(tmp_path), "all")
    with pytest.raises(DataError, match="none of the 2 images"):
        ds[0]
    with pytest.raises(DataError):
        build_dataset(cfg(tmp_path, cache=True), "all")


# ----------------------------------------------------------------------------- splits

def test_num_val_rounding():
    assert num_val(10_000, 0.1) == 1000
    assert num_val(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in floating point
    assert num_val(3, 0.01) == 1 and num_val(3, 0.99) == 2


def test_seeded_split_folder(tmp_path):
    for i in range(20):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i:03d}.png")
    train = build_dataset(cfg(tmp_path), "train")
    val = build_dataset(cfg(tmp_path), "val")
    t_names = {Path(train.source.name(i)).name for i in range(len(train))}
    v_names = {Path(val.source.name(i)).name for i in range(len(val))}
    assert (len(t_names), len(v_names)) == (18, 2) and not t_names & v_names
    again = build_dataset(cfg(tmp_path), "valid")
    assert [again.source.name(i) for i in range(len(again))] == [val.source.name(i) for i in range(len(val))]
    test = build_dataset(cfg(tmp_path), "test")
    assert len(test) == 2 and "validation" in test.describe()["split_info"]["note"]
    info = val.describe()["split_info"]
    assert info["counts"]["train"] == 18 and info["seed"] == 0 and len(info["val_sha256"]) == 64
    others = {build_dataset(cfg(tmp_path, split_seed=s), "val").describe()["split_info"]["val_sha256"]
              for s in range(1, 6)}
    assert others - {info["val_sha256"]}  # the seed matters


def test_seeded_split_is_a_partition():
    keys = [f"img_{i}.jpg" for i in range(10_000)]
    train, val = seeded_split(keys, 0.1, seed=3)
    assert (len(train), len(val)) == (9000, 1000)
    assert sorted(train + val) == list(range(10_000))
    assert seeded_split(keys, 0.1, seed=3) == (train, val)


# ----------------------------------------------------------------------------- CelebA layout

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows"] + [f"Attr_{i}" for i in range(38)]


def make_celeba(root: Path, n: int = 12, partition: bool = True, attributes: bool = True) -> list[list[int]]:
    images = root / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    values = []
    for i in range(1, n + 1):
        Image.new("RGB", (36, 44), (i * 10, 0, 0)).save(images / f"{i:06d}.jpg")
        values.append([1 if (i + a) % 3 == 0 else -1 for a in range(40)])
    if partition:
        parts = ["0"] * 8 + ["1"] * 2 + ["2"] * (n - 10)
        lines = [f"{i:06d}.jpg {p}" for i, p in zip(range(1, n + 1), parts)] + [f"{n + 1:06d}.jpg 0"]
        (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
        Image.new("RGB", (36, 44)).save(images / "999999.jpg")  # on disk, not in the partition: left out
    if attributes:
        rows = [str(n), " ".join(ATTRS)] + [f"{i:06d}.jpg " + " ".join(f"{v:2d}" for v in values[i - 1])
                                            for i in range(1, n + 1)]
        (root / "celeba" / "list_attr_celeba.txt").write_text("\n".join(rows) + "\n")
    return values


@pytest.mark.parametrize("sub", ["", "celeba", "celeba/img_align_celeba"])
def test_celeba_layout_partition_and_attributes(tmp_path, sub):
    values = make_celeba(tmp_path)
    sizes = {s: len(build_dataset(cfg(tmp_path / sub, resolution=16), s)) for s in ("train", "valid", "test", "all")}
    assert sizes == {"train": 8, "valid": 2, "test": 2, "all": 12}
    ds = build_dataset(cfg(tmp_path / sub, resolution=16), "val")
    assert ds.attr_names == ATTRS
    for i in range(len(ds)):
        item = ds[i]
        file_no = int(Path(ds.source.name(item["index"])).stem)
        assert item["attrs"].dtype == torch.long and item["attrs"].shape == (40,)
        assert item["attrs"].tolist() == [1 if v == 1 else 0 for v in values[file_no - 1]]
    info = ds.describe()
    assert info["kind"] == "celeba" and info["split_info"]["method"] == "official_partition"
    assert info["split_info"]["not_on_disk"] == 1 and info["split_info"]["not_in_partition"] == 1
    json.dumps(info)


def test_celeba_without_partition_uses_seeded_split(tmp_path):
    make_celeba(tmp_path, n=20, partition=False)
    train = build_dataset(cfg(tmp_path, resolution=16), "train")
    val = build_dataset(cfg(tmp_path, resolution=16), "val")
    assert (len(train), len(val)) == (18, 2)
    t = {train.source.name(i) for i in range(len(train))}
    v = {val.source.name(i) for i in range(len(val))}
    assert not t & v and len(t | v) == 20
    assert val.describe()["split_info"]["method"] == "seeded_hash_rank"
    assert val[0]["attrs"].shape == (40,)


def test_celeba_empty_split_is_a_data_error(tmp_path):
    make_celeba(tmp_path, n=8)  # all eight are train
    with pytest.raises(DataError, match="split 'val' is empty"):
        build_dataset(cfg(tmp_path), "val")


# ----------------------------------------------------------------------------- procedural

def test_procedural_deterministic_and_varied():
    a, b = ProceduralFaces(64, seed=0, length=300), ProceduralFaces(64, seed=0, length=300)
    x = a.load(5)
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
    assert torch.equal(x, b.load(5))
    assert not torch.equal(x, a.load(6))
    assert not torch.equal(x, ProceduralFaces(64, seed=1, length=10).load(5))
    attrs = torch.stack([a.attrs(i) for i in range(300)]).float()
    assert attrs.shape == (300, len(PROCEDURAL_ATTRIBUTES))
    assert ((attrs.mean(0) > 0.15) & (attrs.mean(0) < 0.85)).all()  # every attribute varies
    assert ProceduralFaces(24, seed=0, length=1).load(0).shape == (3, 24, 24)


@pytest.mark.parametrize("attr", ["smiling", "eyeglasses", "long_hair", "bangs"])
def test_procedural_attributes_are_visible(attr):
    for i in range(6):
        p = sample_params(0, i)
        if p.bald:
            continue
        off = np.asarray(render_face(replace(p, **{attr: False}), 64)).astype(int)
        on = np.asarray(render_face(replace(p, **{attr: True}), 64)).astype(int)
        assert (np.abs(on - off).max(-1) > 30).mean() > 0.005  # > 20 of 4096 pixels clearly change


def test_procedural_dark_hair_label_matches_colour():
    params = [sample_params(0, i) for i in range(300)]
    luma = [0.299 * p.hair[0] + 0.587 * p.hair[1] + 0.114 * p.hair[2] for p in params if not p.bald]
    dark = [p.dark_hair for p in params if not p.bald]
    assert max(v for v, d in zip(luma, dark) if d) < 70 < 85 < min(v for v, d in zip(luma, dark) if not d)


def test_procedural_splits_and_items():
    c = DataConfig(num_images=100, resolution=32, flip=False, num_workers=0)
    train, val = build_dataset(c, "train"), build_dataset(c, "val")
    assert (len(train), len(val)) == (90, 10)
    assert val[0]["index"] == 0 and torch.equal(val[0]["image"], to_float(ProceduralFaces(32, 0, 100).load(90)))
    item = train[3]
    assert item["image"].shape == (3, 32, 32) and item["attrs"].tolist() == train.source.attrs(3).tolist()
    assert train.attr_names == PROCEDURAL_ATTRIBUTES
    json.dumps(train.describe())


def test_flip_only_in_training():
    c = DataConfig(num_images=10, resolution=16, flip=True, num_workers=0)
    ds = build_dataset(c, "train")
    base = to_float(ds.source.load(0))
    outs = [ds[(0, draw)]["image"] for draw in range(20)]  # the flip is drawn per (seed + epoch, index)
    assert any(torch.equal(o, base) for o in outs) and any(torch.equal(o, base.flip(-1)) for o in outs)
    assert all(torch.equal(ds[(0, draw)]["image"], o) for draw, o in enumerate(outs))  # and only from that
    ev = build_dataset(c, "train", train=False)
    assert all(torch.equal(ev[0]["image"], base) for _ in range(5))


def test_flips_are_a_function_of_seed_epoch_and_index_with_workers_and_resume():
    """Exact resume with flips and loader workers: the batches a resumed loader (2 workers, started at
    global batch 5) yields equal those of an uninterrupted one-process loader from batch 5 on; about
    half the images are flipped, and an epoch's flips differ from the next epoch's."""
    ds = build_dataset(DataConfig(num_images=40, resolution=8, flip=True, num_workers=0), "all", train=True)
    plain = build_dataset(DataConfig(num_images=40, resolution=8, flip=False, num_workers=0), "all")
    straight = [b for b, _ in zip(step_loader(ds, 4, seed=3, start_batch=0), range(20))]  # two epochs of 10
    resumed = step_loader(ds, 4, seed=3, start_batch=5, num_workers=2, worker_init_fn=seed_worker)
    again = [b for b, _ in zip(resumed, range(15))]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(straight[5:], again))

    def flips(batches):  # index -> flipped?
        return {int(i): not torch.equal(x, plain[int(i)]["image"]) for b in batches for x, i in zip(b["image"], b["index"])}
    epoch0, epoch1 = flips(straight[:10]), flips(straight[10:])
    assert len(epoch0) == 40 and 10 <= sum(epoch0.values()) <= 30 and epoch0 != epoch1


@pytest.mark.parametrize("key,value", [("resolution", 0), ("val_fraction", 1.0), ("val_fraction", 0),
                                       ("crop", -1), ("flip", "maybe"), ("num_workers", -1), ("source", ""),
                                       ("split_seed", 1.5), ("num_images", 1)])
def test_config_validation(key, value):
    from core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=f"data.{key}'?: expected"):
        from_dict(DataConfig, {key: value}, prefix="data.")


def test_unknown_split_name():
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset(DataConfig(num_images=10), "training")
