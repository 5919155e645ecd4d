"""Stage two: train the MaskGIT transformer on pre-tokenized codes.

    python train_maskgit.py --preset tiny --run-dir runs/mg --codes runs/codes --tokenizer runs/tok/checkpoint.pt
    accelerate launch train_maskgit.py --preset celeba64 --run-dir runs/mg --codes ... --tokenizer ...
    python train_maskgit.py --run-dir runs/mg --resume --codes ... --tokenizer ... optim.steps=200000

Reads only the code files (the encoder never runs here); the tokenizer is loaded to decode the
periodic sample grids. Writes config.json, log.jsonl, checkpoint.pt (atomic, self-describing: it
names the tokenizer and its sha256), samples_*.png and final_metrics.json.
"""
from __future__ import annotations

import time

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from core.checkpoint import file_sha256
from core.config import to_dict
from core.errors import main_guard
from core.files import FINAL_METRICS, write_json
from data.codes import CodeDataset, check_matches_tokenizer
from tokenizer import load_tokenizer
from training import tracking
from training.ema import EMA
from training.lr_schedule import warmup_cosine
from training.run import (
    JsonlLog,
    MetricWindow,
    RunError,
    StopSignal,
    base_parser,
    make_accelerator,
    open_run,
    parse_run_args,
    resolve_config,
)
from training.sampler import step_loader
from training.state import NonFiniteGuard, Rollback, TrainState
from transformer import MaskGIT, mask_tokens, masked_ce_loss
from transformer.config import PRESETS, TrainMaskGITConfig
from transformer.pipeline import decode_settings, generate


def condition_of(batch: dict[str, torch.Tensor], cfg: TrainMaskGITConfig, device: torch.device) -> dict | None:
    return {"attrs": batch["attrs"].to(device, non_blocking=True)} if cfg.masking.condition == "attrs" else None


@torch.no_grad()
def masked_accuracy(model: MaskGIT, dataset: CodeDataset, cfg: TrainMaskGITConfig, device: torch.device) -> dict[str, float]:
    """Validation loss and masked-token accuracy at mask ratios r = 0.25, 0.5, 0.75 (fixed generator), over
    the first log.val_batches batches (0: the whole split)."""
    gen = torch.Generator(device=device).manual_seed(0)
    loader = DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=False)
    totals = {"loss": 0.0, "accuracy": 0.0}
    n = 0
    for i, batch in enumerate(loader):
        if cfg.log.val_batches and i >= cfg.log.val_batches:
            break
        tokens = batch["tokens"].to(device)
        for r in (0.25, 0.5, 0.75):
            inputs, mask = mask_tokens(tokens, model.mask_id, cfg.masking.schedule, gen,
                                       r=torch.full((len(tokens),), r, dtype=torch.float64, device=device))
            loss, acc = masked_ce_loss(model(inputs, condition_of(batch, cfg, device)), tokens, mask, cfg.masking.label_smoothing)
            totals["loss"] += loss.item()
            totals["accuracy"] += acc.item()
            n += 1
    return {f"val_{k}": v / max(n, 1) for k, v in totals.items()}


def main() -> int | None:
    p = base_parser(__doc__.splitlines()[0], PRESETS, "tiny")
    p.add_argument("--codes", help="code directory written by pretokenize.py (required)")
    p.add_argument("--tokenizer", help="the tokenizer checkpoint the codes were made with (required)")
    args = parse_run_args(p, PRESETS, "codes", "tokenizer")
    run_dir, ckpt = open_run(args, "maskgit")

    # data: the code files, tied to the tokenizer that made them
    train_set = CodeDataset(args.codes, "train")
    val_set = CodeDataset(args.codes, "val") if "val" in train_set.header.splits else None
    header = train_set.header
    tok_sha = file_sha256(args.tokenizer)
    tok_weights = header.dataset.get("weights", "ema")  # decode grids with the weights that encoded the codes
    tokenizer, tok_cfg = load_tokenizer(args.tokenizer, ema=tok_weights == "ema")
    check_matches_tokenizer(header, tok_sha, tok_cfg.vq.num_codes, tok_cfg.grid, args.codes, args.tokenizer)
    if ckpt and ckpt["meta"]["tokenizer_sha256"] != tok_sha:
        raise RunError(f"{run_dir} was trained on codes of tokenizer sha256 {ckpt['meta']['tokenizer_sha256']}, "
                       f"but {args.tokenizer} has sha256 {tok_sha}")

    # config: the codebook size, grid and attributes come from the code file, not from the preset
    cfg = resolve_config(TrainMaskGITConfig, PRESETS[args.preset], args.overrides, ckpt["config"] if ckpt else None,
                         source=str(run_dir / "checkpoint.pt"),
                         fixed=("model.num_codes", "model.grid", "model.num_attrs"))
    cfg.fit_codes(header, args.codes)
    meta = {"tokenizer": str(args.tokenizer), "tokenizer_sha256": tok_sha, "tokenizer_weights": tok_weights,
            "codes": str(args.codes), "attr_names": header.attr_names}

    # model, optimizer, EMA; restored from the checkpoint on --resume
    o = cfg.optim
    accelerator = make_accelerator(o.mixed_precision, o.grad_accum, **tracking.accelerator_kwargs(cfg.log.tracker, run_dir))
    set_seed(o.seed, device_specific=False)
    model = MaskGIT(cfg.model)
    decay, no_decay = [], []
    for name, prm in model.named_parameters():  # no weight decay on biases, norms and embeddings
        (decay if prm.dim() >= 2 and "emb" not in name else no_decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=tuple(o.betas))
    state = TrainState(model, EMA(model, o.ema_decay), opt)
    if ckpt is not None:
        state.restore(ckpt)
    # Four handles on one network: ``model`` is what Accelerate prepared (DDP on several processes: call it for
    # the forward, so gradients are all-reduced); ``raw`` is the module itself (its attributes, EMA updates);
    # ``state.model`` is the same object as ``raw`` (what the checkpoint saves); ``ema.model`` is a separate
    # averaged copy that draws the sample grids and is scored at the end.
    model, opt = accelerator.prepare(model, opt)
    ema = state.ema
    ema.model.to(accelerator.device)
    tokenizer.to(accelerator.device)
    raw = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", to_dict(cfg))
        write_json(run_dir / "meta.json", meta)
        print(f"maskgit: {raw.num_params() / 1e6:.2f}M parameters, {len(train_set)} training grids of "
              f"{header.grid[0]}x{header.grid[1]} tokens, K={header.num_codes}")
    started = time.monotonic()  # this session's wall time, reported with the final metrics
    tracking.start(accelerator, cfg.log.tracker, "maskgit", to_dict(cfg))

    def batches_from(step: int):
        return iter(step_loader(train_set, o.batch_size, o.seed, start_batch=step * o.grad_accum,
                                rank=accelerator.process_index, world=accelerator.num_processes))

    log = JsonlLog(run_dir / "log.jsonl", resume_step=state.step)
    stop, guard, window = StopSignal(), NonFiniteGuard(o.nan_policy), MetricWindow()
    sample_attrs = None
    if cfg.masking.condition == "attrs":  # grids of 16 samples with the attributes of the first 16 validation grids
        src = val_set or train_set
        sample_attrs = torch.stack([src[i % len(src)]["attrs"] for i in range(16)])

    def advance(strict: bool) -> None:
        """One training step (grad_accum micro-batches), the EMA, state.step + 1. ``strict``: a non-finite
        loss is decided on the host now (skipped, or the run stops); otherwise it is noted on the device and
        decided at the window's end (``Rollback``): no host read here."""
        step = state.step
        for group in opt.param_groups:
            group["lr"] = o.lr * warmup_cosine(step, o.steps, o.warmup_steps)
        # grad_accum micro-batches make one step. Under accumulate(), opt.step() and zero_grad() act only on the
        # last micro-batch (Accelerate skips them, and DDP's all-reduce, on the others), so calling them every
        # time is right. On the strict path a non-finite loss is judged by all processes together
        # (NonFiniteGuard: one all-reduce), so every rank skips the same backward (``continue``) and none waits in
        # a collective the others skip. A skipped micro-batch adds no gradient; when it is the last one, zero_grad
        # drops the step's gradients and opt.step() is never called: the whole step is skipped.
        for _ in range(o.grad_accum):
            batch = next(batches)
            tokens = batch["tokens"].to(accelerator.device, non_blocking=True)  # pinned: no wait for the device
            with accelerator.accumulate(model):
                # forward / backward / update
                inputs, mask = mask_tokens(tokens, raw.mask_id, cfg.masking.schedule)
                with accelerator.autocast():
                    logits = model(inputs, condition_of(batch, cfg, accelerator.device))
                loss, acc = masked_ce_loss(logits.float(), tokens, mask, cfg.masking.label_smoothing)
                if guard.checked(loss.detach(), strict):
                    opt.zero_grad(set_to_none=True)
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            window.add({"loss": loss, "masked_accuracy": acc},  # summed on the device, read once per log line
                       items=tokens.shape[0] * accelerator.num_processes)
        ema.update(raw)
        state.step += 1

    def save_loop():
        return window.copy()

    def load_loop(saved) -> None:  # back to the window's start: its metrics and the data position
        nonlocal window, batches
        window, batches = saved, batches_from(state.step)

    # Steps that do not log read nothing on the host: a NaN/inf loss is noted on the device and the window is
    # replayed on the strict path when its last step finds the note (training.state.Rollback).
    rollback = Rollback(state, guard, accelerator.device, save_loop, load_loop, enabled=o.nan_check == "window")
    bar = tqdm(total=o.steps, initial=state.step, desc="maskgit", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    batches = batches_from(state.step)
    model.train()
    rollback.mark()
    while state.step < o.steps:
        advance(strict=o.nan_check == "step")
        step = state.step
        bar.update(1)
        logs_now, images_now, ckpt_now = cfg.log.due(step, o.steps)
        stopping = stop.agreed(accelerator.device, due=logs_now or images_now or ckpt_now)
        if not (logs_now or images_now or ckpt_now or stopping):
            continue  # a step inside the window: nothing read on the host
        rollback.settle(lambda: advance(strict=True))
        # log
        if logs_now:
            record = {"step": step, **window.averages("grids_per_s"), "lr": opt.param_groups[0]["lr"],
                      "skipped_steps": guard.skipped}
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "masked_accuracy") if k in record})
            if accelerator.is_main_process:
                log.write(record)
            tracking.log_scalars(accelerator, cfg.log.tracker, record, step)
        # sample grid (the sampling path of sample.py, EMA weights)
        if images_now and accelerator.is_main_process:
            images = next(generate(tokenizer, ema.model, 16, 16, seed=1234, attrs=sample_attrs, progress=False,
                                   **decode_settings(to_dict(cfg))))
            save_image(images.float() / 255, run_dir / f"samples_{step:07d}.png", nrow=4)
            save_image(images.float() / 255, run_dir / "samples_latest.png", nrow=4)
            tracking.log_image(accelerator, cfg.log.tracker, "samples", make_grid(images.float() / 255, nrow=4), step)
        # checkpoint / stop
        if ckpt_now or stopping:
            state.save(run_dir, accelerator, "maskgit", to_dict(cfg), meta)
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
        metrics = {"step": state.step, "weights": "ema"}
        if val_set is not None:
            metrics.update(masked_accuracy(ema.model, val_set, cfg, accelerator.device))
        metrics["wall_seconds"] = round(time.monotonic() - started, 1)
        write_json(run_dir / FINAL_METRICS, metrics)
        tracking.log_final(accelerator, cfg.log.tracker, metrics, state.step)
        val = f", val masked-token accuracy {metrics['val_accuracy']:.3f}" if "val_accuracy" in metrics else ""
        print(f"maskgit: step {state.step}{val} -> {run_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main_guard(main)
