"""Training throughput of both stages: images/s, tokens/s, peak memory and model FLOP utilisation.

    python bench/bench_train.py               # CUDA: CelebA-64 presets, batch 64, bf16 autocast
    python bench/bench_train.py --precision fp32      # the same in fp32 (TF32 matmuls)
    python bench/bench_train.py --quick       # 5 timed steps; on CPU (the default there): small + tiny, batch 32
    python bench/bench_train.py --compile     # both models' forward under torch.compile (compile time reported)
    python bench/bench_train.py --channels-last       # the tokenizer's convolutions on NHWC tensors

One training step is what the training scripts do per step, without Accelerate or a data loader
(inputs are random tensors already on the device; ``bench_loader.py`` measures the loader):
* tokenizer: ``bench_loader.Trainer`` (the preset's VQModel with all VQ fixes, L1 + VQ loss, AdamW,
  gradient clipping, EMA update);
* MaskGIT (``MaskGITTrainer``, also used by bench_stage_two.py): the model train_maskgit.py's preset of
  that name trains (its dropout settings included: the tiny preset has no attention dropout, which
  on CPU lets scaled_dot_product_attention use its fused kernel instead of the unfused math path);
  mask a batch of code grids with the cosine schedule, masked cross-entropy, gradient clipping at 1,
  AdamW (betas 0.9/0.96, wd 0.045).

FLOPs per step are counted once by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions, attention through the math kernel; forward + backward) on the real batch; MFU = counted FLOPs per second /
the chip's dense peak. The peak comes from ``--peak-tflops`` or, on CUDA, from the table below for the
precision used; on CPU MFU is left out unless ``--peak-tflops`` is given. Peak memory is
``torch.cuda.max_memory_allocated`` (CUDA only). Prints a table, writes JSON.

``--compile`` / ``--channels-last`` answer "does it pay here" for a change the training scripts do not make:
the FLOPs are counted on the eager model first, then each model's forward is compiled
(``torch.compile``, default mode; on a CPU it needs a C++ compiler) and the first compiled step is
timed on its own as ``compile_s``, outside the median; channels-last converts the tokenizer and its
input batch (MaskGIT has no convolutions). Compare with a run without the flag, one after the other.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from contextlib import nullcontext
from functools import partial

import torch  # noqa: E402
from bench_loader import Trainer  # noqa: E402
from common import write_result  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tokenizer import preset as tokenizer_preset  # noqa: E402
from transformer import MaskGIT, mask_tokens, masked_ce_loss  # noqa: E402
from transformer.config import PRESETS as MASKGIT_TRAIN_PRESETS  # noqa: E402

# Dense tensor-core peaks in TFLOP/s from the vendor data sheets (SXM parts). "fp32" runs with TF32
# matmuls/convolutions enabled (as below), so its peak is the TF32 one.
PEAK_TFLOPS = {"H200": {"bf16": 989.4, "fp32": 494.7}, "H100": {"bf16": 989.4, "fp32": 494.7},
               "A100": {"bf16": 312.0, "fp32": 156.0}}


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for chip, p in PEAK_TFLOPS.items() if chip in name), None)


class MaskGITTrainer:
    """One MaskGIT training step as in train_maskgit.py (the model, masking and AdamW settings of its preset
    ``preset_name``), without Accelerate, EMA, the LR schedule or the no-decay parameter group."""

    def __init__(self, preset_name: str, num_codes: int, grid: tuple[int, int], device: torch.device) -> None:
        torch.manual_seed(0)
        run = MASKGIT_TRAIN_PRESETS[preset_name]
        cfg = dataclasses.replace(run.model, num_codes=num_codes, grid=tuple(grid))
        self.model = MaskGIT(cfg).to(device).train()
        self.masking = run.masking
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=run.optim.lr, betas=tuple(run.optim.betas),
                                     weight_decay=run.optim.weight_decay)

    def step(self, tokens: torch.Tensor) -> None:
        inputs, mask = mask_tokens(tokens, self.model.mask_id, self.masking.schedule)
        loss, _ = masked_ce_loss(self.model(inputs).float(), tokens, mask, self.masking.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def compile_forward(model: torch.nn.Module) -> None:
    """--compile: the model's forward under torch.compile; the optimizer, EMA and clipping stay eager."""
    model.forward = torch.compile(model.forward)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, step, batch, params: int, tokens_per_image: int, a, device, autocast, compile_fn=None) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # also the first warm-up step. Attention through SDPA's math kernel here: the counter has no formula
    # for the fused CPU kernel (it would count no attention FLOPs), and the model's FLOPs do not depend
    # on the kernel that computes them.
    with autocast(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step(batch)
    flops = counter.get_total_flops()
    compile_s = None
    if compile_fn is not None:  # compiled after the count: the counter sees the eager model's operations
        compile_fn()
        sync(device)
        t = time.perf_counter()
        with autocast():
            step(batch)
        sync(device)
        compile_s = time.perf_counter() - t
    with autocast():
        for _ in range(a.warmup):
            step(batch)
    times = []
    for _ in range(a.steps):
        sync(device)
        t = time.perf_counter()
        with autocast():
            step(batch)
        sync(device)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    peak = peak_tflops(device, a.precision, a.peak_tflops)
    return {
        "stage": name, "params_M": params / 1e6, "batch_size": a.batch_size, "step_s_median": step_s,
        "compile_s": compile_s,
        "step_s_all": times, "images_per_s": a.batch_size / step_s,
        "tokens_per_s": a.batch_size * tokens_per_image / step_s, "gflop_per_step": flops / 1e9,
        "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
        "mfu": flops / step_s / 1e12 / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 timed steps after 1 warm-up (default 20 after 3)")
    p.add_argument("--tokenizer", default=None, help="tokenizer preset (default: celeba64 on CUDA, small on CPU)")
    p.add_argument("--maskgit", default=None, help="MaskGIT preset (default: celeba64 on CUDA, tiny on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the counted one")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense peak for MFU (default: table)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each model's forward (after the FLOP count)")
    p.add_argument("--channels-last", action="store_true", help="the tokenizer and its input in channels-last layout")
    p.add_argument("--out", default="runs/bench/train.json")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.tokenizer = a.tokenizer or ("celeba64" if cuda else "small")
    a.maskgit = a.maskgit or ("celeba64" if cuda else "tiny")
    a.batch_size = a.batch_size or (64 if cuda else 32)
    a.steps = a.steps or (5 if a.quick or not cuda else 20)
    a.warmup = (1 if a.quick or not cuda else 3) if a.warmup is None else a.warmup
    a.precision = a.precision or ("bf16" if cuda else "fp32")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as Accelerate's default fp32 run

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16" else nullcontext()

    tok_cfg = tokenizer_preset(a.tokenizer)
    n_tokens = tok_cfg.grid[0] * tok_cfg.grid[1]
    rows = []
    tok = Trainer(a.tokenizer, device)
    images = torch.rand(a.batch_size, 3, tok_cfg.resolution, tok_cfg.resolution, device=device) * 2 - 1
    if a.channels_last:
        tok.model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    rows.append(measure(f"tokenizer ({a.tokenizer})", tok.step, images, sum(q.numel() for q in tok.model.parameters()),
                        n_tokens, a, device, autocast, partial(compile_forward, tok.model) if a.compile else None))
    del tok
    mg = MaskGITTrainer(a.maskgit, tok_cfg.vq.num_codes, tok_cfg.grid, device)
    codes = torch.randint(0, tok_cfg.vq.num_codes, (a.batch_size, n_tokens), device=device)
    rows.append(measure(f"MaskGIT ({a.maskgit})", mg.step, codes, mg.model.num_params(), n_tokens, a, device, autocast,
                        partial(compile_forward, mg.model) if a.compile else None))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    variant = "".join(f", {v}" for v, on in (("torch.compile", a.compile), ("channels-last tokenizer", a.channels_last)) if on)
    print(f"training throughput on {where}, {a.precision}{variant}, batch {a.batch_size}, {n_tokens} tokens/image, "
          f"median of {a.steps} steps" + (" after the compiling step" if a.compile else ""))
    header = ("stage", "params M", "step ms", "images/s", "tokens/s", "GFLOP/step", "TFLOP/s", "MFU", "peak GiB",
              *(("compile s",) if a.compile else ()))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["stage"], f"{r['params_M']:.2f}", f"{1e3 * r['step_s_median']:.1f}", f"{r['images_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}", f"{r['gflop_per_step']:.1f}", f"{r['achieved_tflops']:.3f}",
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
            "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}",
            *((f"{r['compile_s']:.1f}",) if a.compile else ())]) + " |")
    print("\n".join(lines))
    meta = {"device": where, "precision": a.precision, "batch_size": a.batch_size, "tokenizer": a.tokenizer,
            "maskgit": a.maskgit, "compile": a.compile, "channels_last": a.channels_last,
            "tokens_per_image": n_tokens, "steps": a.steps, "warmup": a.warmup,
            "torch": torch.__version__, "platform": platform.platform(),
            "flops": "torch.utils.flop_counter.FlopCounterMode, one training step (forward + backward)"}
    write_result(a.out, {"meta": meta, "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
