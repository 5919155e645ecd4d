"""Stage one: train the VQ tokenizer.

    python train_tokenizer.py --preset tiny --run-dir runs/tok
    accelerate launch train_tokenizer.py --preset celeba64 --run-dir runs/tok data.source=/data/celeba
    python train_tokenizer.py --run-dir runs/tok --resume optim.steps=20000    # continue / extend
    python train_tokenizer.py --preset tiny --recipe all --run-dir runs/tok_all  # another ladder rung's quantizer

Same code on CPU, one GPU and many GPUs (Accelerate). Writes to the run directory: config.json,
data.json (split), log.jsonl, checkpoint.pt (atomic, self-describing), recon_*.png (originals above
reconstructions, from a fixed validation batch), codebook_usage.png, codebook_usage_val.png, replicas.json
(the replicas' codebook check at each checkpoint) and final_metrics.json.
"""
from __future__ import annotations

import math
import time

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from core.config import to_dict
from core.errors import main_guard
from core.files import FINAL_METRICS, write_json
from data import build_dataset, seed_worker
from tokenizer import VQModel
from tokenizer.config import VQ_VARIANTS, variant_overrides
from tokenizer.losses import TokenizerLoss
from tokenizer.quantizer import NonFiniteInputError
from tokenizer.quantizer import kmeans_pending as raw_kmeans_pending
from tokenizer.train_config import PRESETS, TrainTokenizerConfig, tie_resolution
from tokenizer.usage import code_histogram, perplexity
from training import tracking
from training.ema import EMA
from training.lr_schedule import warmup_cosine
from training.plots import plot_usage
from training.run import (
    JsonlLog,
    MetricWindow,
    StopSignal,
    base_parser,
    make_accelerator,
    open_run,
    parse_run_args,
    resolve_config,
)
from training.sampler import step_loader
from training.state import NonFiniteGuard, Rollback, TrainState


@torch.no_grad()
def evaluate(model: VQModel, dataset, cfg: TrainTokenizerConfig, device: torch.device) -> dict[str, float]:
    """Reconstruction MSE / PSNR (images scaled to [0, 1]) and codebook use over the validation split."""
    loader = DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    sq_err, n_pix, n_img, counts = 0.0, 0, 0, torch.zeros(model.num_codes, device=device)
    for i, batch in enumerate(tqdm(loader, desc="validation", leave=False)):
        if cfg.log.val_batches and i >= cfg.log.val_batches:
            break
        x = batch["image"].to(device)
        x_rec, info = model(x)
        x01, r01 = (x + 1) / 2, ((x_rec + 1) / 2).clamp(0, 1)
        sq_err += (x01 - r01).square().sum().item()
        n_pix, n_img = n_pix + x.numel(), n_img + x.shape[0]
        counts += code_histogram(info["q"], model.num_codes)
    mse = sq_err / n_pix
    return {"val_images": n_img, "mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "perplexity": perplexity(counts).item(), "codes_used": (counts > 0).float().mean().item(),
            "num_codes": model.num_codes, "usage_counts": counts.long().tolist()}


def main() -> int | None:
    parser = base_parser(__doc__.splitlines()[0], PRESETS, "tiny")
    parser.add_argument("--recipe", choices=list(VQ_VARIANTS), metavar="RUNG",
                        help="train the quantizer of a ladder rung instead of the preset's (docs/recipe.md): every "
                             "model.vq option set as the rung sets it, the codebook's size kept; key=value overrides "
                             f"still apply after it. One of: {', '.join(VQ_VARIANTS)}")
    args = parse_run_args(parser, PRESETS, tie=tie_resolution, recipe=variant_overrides)
    run_dir, ckpt = open_run(args, "tokenizer")
    cfg = resolve_config(TrainTokenizerConfig, PRESETS[args.preset], args.overrides, ckpt["config"] if ckpt else None,
                         source=str(run_dir / "checkpoint.pt"))
    o = cfg.optim
    accelerator = make_accelerator(o.mixed_precision, o.grad_accum, **tracking.accelerator_kwargs(cfg.log.tracker, run_dir))
    set_seed(o.seed, device_specific=False)  # identical init on every rank: the codebook must agree

    # Data first: a bad path fails here, before any model is built.
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val", train=False)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", to_dict(cfg))
        write_json(run_dir / "data.json", {"train": train_set.describe(), "val": val_set.describe()})
    started = time.monotonic()  # this session's wall time, reported with the final metrics
    tracking.start(accelerator, cfg.log.tracker, "tokenizer", to_dict(cfg))

    # model, optimizers, EMA; restored from the checkpoint on --resume
    model = VQModel(cfg.model)
    loss_fn = TokenizerLoss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    disc = loss_fn.discriminator
    opt_d = torch.optim.AdamW(disc.parameters(), lr=o.lr, betas=tuple(o.betas)) if disc is not None else None
    state = TrainState(model, EMA(model, o.ema_decay), opt,
                       extra={"discriminator": disc, "optimizer_d": opt_d} if opt_d is not None else {})
    kmeans_pending = ckpt is None and raw_kmeans_pending(model)
    if ckpt is not None:
        state.restore(ckpt)
    model, opt = accelerator.prepare(model, opt)
    loss_fn.to(accelerator.device)
    if opt_d is not None:  # the discriminator gets its own DDP wrapper and optimizer
        loss_fn.discriminator, opt_d = accelerator.prepare(disc, opt_d)
    ema = state.ema
    ema.model.to(accelerator.device)
    raw = accelerator.unwrap_model(model)

    def batches_from(step: int):
        return iter(step_loader(train_set, o.batch_size, o.seed, start_batch=step * o.grad_accum,
                                rank=accelerator.process_index, world=accelerator.num_processes,
                                num_workers=cfg.data.num_workers, worker_init_fn=seed_worker))

    fixed = torch.stack([val_set[i]["image"] for i in range(min(8, len(val_set)))]).to(accelerator.device)
    log = JsonlLog(run_dir / "log.jsonl", resume_step=state.step)
    stop, guard, window = StopSignal(), NonFiniteGuard(o.nan_policy), MetricWindow()
    window_counts = torch.zeros(raw.num_codes, device=accelerator.device)

    def write_images() -> None:
        if accelerator.is_main_process:
            with torch.no_grad():
                rec = ema.model(fixed)[0].clamp(-1, 1)
            grid = (torch.cat([fixed, rec]) + 1) / 2
            save_image(grid, run_dir / f"recon_{state.step:07d}.png", nrow=len(fixed))
            save_image(grid, run_dir / "recon_latest.png", nrow=len(fixed))
            tracking.log_image(accelerator, cfg.log.tracker, "reconstructions", make_grid(grid, nrow=len(fixed)), state.step)
            plot_usage(window_counts.cpu(), run_dir / "codebook_usage.png", title=f"codebook usage, steps up to {state.step}")

    def advance(strict: bool) -> None:
        """One training step (grad_accum micro-batches), the EMA, state.step + 1. ``strict``: a non-finite
        loss or quantizer input is decided on the host now (skipped, or the run stops); otherwise it is
        noted on the device and decided at the window's end (``Rollback``): no host read here."""
        nonlocal kmeans_pending
        step = state.step
        for group in opt.param_groups:
            group["lr"] = o.lr * warmup_cosine(step, o.steps, o.warmup_steps)
        skipped = False
        for _ in range(o.grad_accum):
            x = next(batches)["image"].to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                # forward / backward / update
                try:
                    with accelerator.autocast(), guard.deferring(strict):
                        x_rec, info = model(x)
                        loss, logs = loss_fn.generator_loss(x, x_rec, info["loss"], step, raw.last_layer, as_tensors=True,
                                                            vq_unscaled=info.get("entropy_loss"))
                except NonFiniteInputError:  # (strict only: otherwise the quantizer notes it into guard.flag)
                    loss, logs = torch.tensor(float("nan"), device=accelerator.device), {}
                if guard.checked(loss.detach(), strict):
                    skipped = True
                    opt.zero_grad(set_to_none=True)
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if opt_d is not None and loss_fn.gan_active(step):
                    opt_d.zero_grad(set_to_none=True)  # drop what the generator loss left there
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec.detach(), step, as_tensors=True)
                    accelerator.backward(d_loss)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs.update(d_logs)
            window_counts.add_(code_histogram(info["q"], raw.num_codes))
            window.add({**logs, "loss": loss, "perplexity": info["perplexity"], "codes_used": info["codes_used"],
                        "quant_error": info["quant_error"]},
                       items=x.shape[0] * accelerator.num_processes)  # summed on the device, read once per log line
        if skipped:
            accelerator.print(f"step {step}: non-finite loss, step skipped ({guard.skipped} so far)")
        if kmeans_pending and not raw_kmeans_pending(raw):
            ema.reset(raw)  # k-means just rewrote the codebook: never average it with the random one
            kmeans_pending = False
        else:
            ema.update(raw)
        state.step += 1

    def save_loop():
        return window.copy(), window_counts.clone(), kmeans_pending

    def load_loop(saved) -> None:  # back to the window's start: its metrics, the data position, k-means
        nonlocal window, batches, kmeans_pending
        window, counts, kmeans_pending = saved
        window_counts.copy_(counts)
        batches = batches_from(state.step)

    # Steps that do not log read nothing on the host: a NaN/inf is noted on the device and the window is
    # replayed on the strict path when its last step finds the note (training.state.Rollback). The k-means step
    # (once, it reads the device anyway) is strict: k-means on a non-finite batch would fail, not note.
    rollback = Rollback(state, guard, accelerator.device, save_loop, load_loop, enabled=o.nan_check == "window")
    bar = tqdm(total=o.steps, initial=state.step, desc="tokenizer", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    batches = batches_from(state.step)
    model.train()
    rollback.mark()
    while state.step < o.steps:
        advance(strict=kmeans_pending or o.nan_check == "step")
        step = state.step
        bar.update(1)
        logs_now, images_now, ckpt_now = cfg.log.due(step, o.steps)
        stopping = stop.agreed(accelerator.device, due=logs_now or images_now or ckpt_now)
        if not (logs_now or images_now or ckpt_now or stopping):
            continue  # a step inside the window: nothing read on the host
        rollback.settle(lambda: advance(strict=True))
        # log
        if logs_now:
            record = {"step": step, **window.averages("images_per_s"), "lr": opt.param_groups[0]["lr"],
                      "skipped_steps": guard.skipped, "window_codes_used": (window_counts > 0).float().mean().item(),
                      "window_perplexity": perplexity(window_counts).item()}
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "perplexity", "window_codes_used") if k in record})
            if accelerator.is_main_process:
                log.write(record)
            tracking.log_scalars(accelerator, cfg.log.tracker, record, step)
        if images_now:
            write_images()
            window_counts.zero_()
        # checkpoint / stop
        if ckpt_now or stopping:
            state.save(run_dir, accelerator, "tokenizer", to_dict(cfg), meta={})
        if stopping:
            bar.close()
            accelerator.print(f"{stop.requested}: checkpoint saved at step {step}; continue with --resume")
            accelerator.end_training()
            return stop.exit_status  # not 0: the model is unfinished
        if state.step < o.steps:
            rollback.mark()
    bar.close()

    # final validation (EMA weights)
    if accelerator.is_main_process:
        metrics = evaluate(ema.model, val_set, cfg, accelerator.device)
        metrics.update(step=state.step, weights="ema", skipped_files=train_set.num_skipped + val_set.num_skipped,
                       wall_seconds=round(time.monotonic() - started, 1))
        write_json(run_dir / FINAL_METRICS, metrics)
        tracking.log_final(accelerator, cfg.log.tracker, metrics, state.step)
        plot_usage(torch.tensor(metrics["usage_counts"]), run_dir / "codebook_usage_val.png",
                   title="codebook usage over the validation split (EMA weights)")
        skipped = train_set.num_skipped + val_set.num_skipped
        accelerator.print(f"tokenizer: step {state.step}, val PSNR {metrics['psnr']:.2f} dB, MSE {metrics['mse']:.5f}, "
                          f"perplexity {metrics['perplexity']:.1f}, codes used {metrics['codes_used']:.1%}"
                          + (f", {skipped} unreadable image(s) skipped" if skipped else "") + f" -> {run_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main_guard(main)
