"""Tokenizer training throughput with the real CelebA loader vs batches already in memory.

    python bench/bench_loader.py                     # --quick (the default): ~5 min on 2 busy CPU cores
    python bench/bench_loader.py --workers 0 2 4 --rounds 4 --steps 8
    python bench/bench_loader.py --data /path/to/extracted/folder_or_tarball_folder

One training step = what train_tokenizer.py does per step (preset ``small`` model and loss, AdamW,
grad-norm clip 1.0, EMA update), on batches of 32 from the train split (9,000 of the 10,000 shared
images, 64x64 from the 70x70 = "crop 140" face crop, random flip). Modes:

* ``memory``: a fixed set of batches prepared beforehand (the ideal input pipeline);
* ``files``: DataLoader over the folder, each image decoded and resized when drawn (``data.cache=false``);
* ``cache``: DataLoader over uint8 tensors decoded once at start (``data.cache=true``);

each with every ``--workers`` count, built exactly like train_tokenizer.py's loader (StepSampler,
persistent workers, seeded). The modes take turns in rounds (the order rotates every round) so that
load from other jobs hits all of them alike; within a round each mode runs ``--warm`` untimed steps
and then ``--steps`` timed ones. The overhead of a mode is median over rounds of
(its step time / memory step time in the same round) - 1. Target: < 10 %.
The "loader only" column is the loader's own rate with no training (how much headroom it has);
"load time / step" is that loader's time per batch over a memory step, the overhead to expect when
loading is serial (workers=0). On a machine whose load swings, it is the steadier of the two numbers.

Data: ``--data`` (default: ``$BENCH_DATA``) is a folder of images, or a folder holding CelebA
tarball(s) (e.g. the 89x109 half-size copy ``celeba_align_89x109``), which are extracted once into
``runs/cache/<folder name>``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from itertools import islice

import torch  # noqa: E402
from common import DEFAULT_DATA, resolve_image_folder, write_result  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data import DataConfig, build_dataset, seed_worker  # noqa: E402
from tokenizer import VQModel  # noqa: E402
from tokenizer.losses import TokenizerLoss  # noqa: E402
from tokenizer.train_config import PRESETS as TOKENIZER_PRESETS  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.sampler import StepSampler  # noqa: E402


def build_loader(dataset, batch_size: int, workers: int, seed: int = 0) -> DataLoader:
    """The same DataLoader train_tokenizer.py builds (one process, start at batch 0)."""
    sampler = StepSampler(len(dataset), batch_size, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


class Trainer:
    """One tokenizer training step as in train_tokenizer.py (the model and loss of its preset ``preset_name``),
    without Accelerate or the LR schedule."""

    def __init__(self, preset_name: str, device: torch.device, lr: float = 1e-3, grad_clip: float = 1.0) -> None:
        torch.manual_seed(0)
        cfg = TOKENIZER_PRESETS[preset_name]
        self.model = VQModel(cfg.model).to(device).train()
        self.loss_fn = TokenizerLoss(cfg.loss).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.99))
        self.ema = EMA(self.model, 0.99)
        self.device, self.grad_clip, self.step_count = device, grad_clip, 0

    def step(self, x: torch.Tensor) -> None:
        x = x.to(self.device, non_blocking=True)
        x_rec, info = self.model(x)
        loss, _ = self.loss_fn.generator_loss(x, x_rec, info["loss"], self.step_count, self.model.last_layer,
                                                vq_unscaled=info.get("entropy_loss"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        bool(torch.isfinite(loss))  # one host read per step, as train_tokenizer.py's non-finite guard makes
        self.step_count += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the default settings (3 rounds x 3 timed steps)")
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder, or folder of the shared tarball")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", default="small", help="tokenizer preset (model and loss)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    p.add_argument("--warm", type=int, default=0, help="untimed steps per mode per round, before the timed ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench/loader.json")
    a = p.parse_args()
    device = torch.device(a.device)
    t_start = time.time()

    folder = resolve_image_folder(a.data)
    cfg = dict(source=str(folder), resolution=64, crop=140, flip=True, val_fraction=0.1, split_seed=0)
    files = build_dataset(DataConfig(**cfg, cache=False), "train")
    t0 = time.time()
    cached = build_dataset(DataConfig(**cfg, cache=True), "train")
    cache_build_s = time.time() - t0
    print(f"train split: {len(files)} images from {folder}; cache built in {cache_build_s:.1f} s", file=sys.stderr)

    trainer = Trainer(a.preset, device)
    n_mem = max(2, a.warm + a.steps)
    memory_batches = [torch.stack([cached[(i * a.batch_size + j) % len(cached)]["image"] for j in range(a.batch_size)])
                      for i in range(n_mem)]
    for x in memory_batches[:2]:  # k-means init and first-call allocations happen here, not in a timed step
        trainer.step(x)

    modes: dict[str, dict] = {"memory": {"source": "memory", "workers": None}}
    for source, ds in (("files", files), ("cache", cached)):
        for w in a.workers:
            modes[f"{source} w={w}"] = {"source": source, "workers": w, "dataset": ds}
    iters = {}
    for name, m in modes.items():
        if m["source"] == "memory":
            continue
        loader = build_loader(m["dataset"], a.batch_size, m["workers"])
        it = iter(loader)
        for _ in range(2):  # workers started and their queues primed
            next(it)
        t0 = time.perf_counter()
        for _ in range(12):  # loader alone: its own rate, with no training competing for the CPU
            next(it)
        m["loader_only_ips"] = 12 * a.batch_size / (time.perf_counter() - t0)
        iters[name] = it

    def batches(name: str):
        if name == "memory":
            while True:
                yield from memory_batches
        while True:
            yield next(iters[name])["image"]

    sources = {name: batches(name) for name in modes}
    step_s: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no mode always runs first
        for name in order:
            for x in islice(sources[name], a.warm):
                trainer.step(x)
            sync(device)
            t0 = time.perf_counter()
            for x in islice(sources[name], a.steps):  # time includes waiting for each batch
                trainer.step(x)
            sync(device)
            step_s[name].append((time.perf_counter() - t0) / a.steps)
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {step_s[n][-1]:.2f} s" for n in names),
              file=sys.stderr, flush=True)
    elapsed = time.time() - t_start

    rows = []
    mem_step = statistics.median(step_s["memory"])
    for name, m in modes.items():
        ratios = [t / tm for t, tm in zip(step_s[name], step_s["memory"])]
        overhead = 100 * (statistics.median(ratios) - 1)
        rows.append({"mode": name, "source": m["source"], "workers": m["workers"],
                     "step_s_median": statistics.median(step_s[name]), "step_s_rounds": step_s[name],
                     "images_per_s": a.batch_size / statistics.median(step_s[name]),
                     "loader_only_images_per_s": m.get("loader_only_ips"),
                     # the loader's own time per batch relative to a training step: the overhead to
                     # expect when loading is serial (workers=0), robust to the machine's load swings
                     "load_time_pct_of_step": 100 * a.batch_size / m["loader_only_ips"] / mem_step
                     if m.get("loader_only_ips") else None,
                     "overhead_pct": None if name == "memory" else overhead,
                     "target_met": None if name == "memory" else overhead < 10.0})
    header = ("mode", "workers", "train img/s", "step s", "loader only img/s", "load time / step",
              "overhead vs memory", "< 10 %")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["source"], "-" if r["workers"] is None else str(r["workers"]), f"{r['images_per_s']:.2f}",
            f"{r['step_s_median']:.2f}", "-" if r["loader_only_images_per_s"] is None else f"{r['loader_only_images_per_s']:.0f}",
            "-" if r["load_time_pct_of_step"] is None else f"{r['load_time_pct_of_step']:.2f} %",
            "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f} %",
            "-" if r["target_met"] is None else ("yes" if r["target_met"] else "NO")]) + " |")
    meta = {"data": str(folder), "split": "train", "images": len(files), "resolution": 64, "crop": 140,
            "batch_size": a.batch_size, "preset": a.preset, "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "rounds": a.rounds,
            "timed_steps": a.steps, "warm_steps": a.warm, "cache_build_s": cache_build_s, "elapsed_s": elapsed,
            "overhead": "median over rounds of (mode step time / memory step time in the same round) - 1"}
    print(f"tokenizer training step ({a.preset} preset, batch {a.batch_size}, {device}, {meta['threads']} threads): "
          f"loader vs in-memory batches, {a.rounds} rounds x {a.steps} timed steps; cache build {cache_build_s:.1f} s")
    print("\n".join(lines))
    print(f"total {elapsed:.0f} s")
    write_result(a.out, {"meta": meta, "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
