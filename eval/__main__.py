"""``python -m eval``: reference statistics, and FID / KID / SWD of folders, generators and tokenizers.

    python -m eval ref   --data PATH [--split val --resolution 64 --crop 140] --out refs/celeba64_val.npz
    python -m eval ref   --images DIR_OR_NPZ --out refs/mine.npz
    python -m eval score SAMPLES --ref refs/celeba64_val.npz [--metrics auto|fid,kid,swd] [--ref-images DIR]
    python -m eval score SAMPLES --metrics swd --ref-images PHOTOS --ref-resize   # offline, any photo folder
    python -m eval gen   --tokenizer TOK.pt --maskgit MG.pt --n 10000 --ref refs/celeba64_val.npz
    python -m eval rfid  --tokenizer TOK.pt --data PATH [--split val]

Weights: --weights PATH, else $FID_INCEPTION_WEIGHTS, else the torch hub cache; --allow-download to
fetch them; --allow-unverified-weights to run with any other file (numbers are then labelled
"FID(unverified-weights)", never FID). Each score/gen/rfid run writes <report-dir>/<name>.json and .md.
Errors in the inputs print one line ``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import closing
from pathlib import Path

import torch

from core.errors import guarded
from core.processes import check_device, ordered_on_main, process_state, shard_batches
from eval.errors import EvalError
from eval.images import open_images
from eval.inception import InceptionExtractor, WeightsInfo, find_weights, verify_weights
from eval.reference import (
    KEEP_FEATURES,
    compute_reference,
    dataset_batches,
    dataset_protocol,
    folder_protocol,
    load_reference,
    save_reference,
)
from eval.results import summary_line, write_report
from eval.score import INCEPTION_METRICS, METRICS, score_images, score_reconstructions
from eval.stats import KID_DEFAULTS
from eval.swd import SWDConfig
from transformer.pipeline import SAMPLES_RECORD, add_decode_flags, generate, load_models, parse_attrs, settings_from_args


# ----------------------------------------------------------------------------------------------- flags
def _add_weights_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Inception weights and device")
    g.add_argument("--weights", help="path to weights-inception-2015-12-05-6726825d.pth")
    g.add_argument("--allow-unverified-weights", action="store_true",
                   help="accept a file whose sha256 is not 6726825d... (results labelled 'unverified-weights')")
    g.add_argument("--allow-download", action="store_true", help="download the weights if not found locally")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu (gen on several processes: "
                                                  "each process's own device, cuda:LOCAL_RANK)")
    g.add_argument("--batch-size", type=int, default=64, help="images per Inception batch")


def _add_data_flags(p: argparse.ArgumentParser, split: str = "val") -> None:
    g = p.add_argument_group("dataset (the data package; unset flags take DataConfig's defaults)")
    g.add_argument("--data", help="dataset source: 'procedural' or a CelebA image folder")
    g.add_argument("--split", default=split)
    g.add_argument("--resolution", type=int)
    g.add_argument("--crop", type=int, help="center crop in the 178-px frame (0: largest square)")
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--split-seed", type=int)
    g.add_argument("--data-num-images", dest="num_images", type=int, help="data.num_images: the first N images only")
    g.add_argument("--num-images", dest="num_images", type=int, help=argparse.SUPPRESS)  # old name of --data-num-images
    g.add_argument("--num-workers", type=int, default=2)


def _add_score_flags(p: argparse.ArgumentParser, default_name: str) -> None:
    g = p.add_argument_group("metrics and report")
    g.add_argument("--metrics", default="auto",
                   help="comma list of fid,kid,pr,swd (pr: precision and recall, k-NN in Inception features), "
                        "or 'auto' (FID; KID and precision/recall if the reference kept features; SWD if "
                        "reference images are available)")
    g.add_argument("--report-dir", dest="report_dir", default="runs/eval", help="where <name>.json and <name>.md go")
    g.add_argument("--run-dir", dest="report_dir", help=argparse.SUPPRESS)  # old name of --report-dir
    g.add_argument("--name", help=f"report name (default: {default_name})")
    g.add_argument("--kid-subsets", type=int, default=KID_DEFAULTS["subsets"])
    g.add_argument("--kid-subset-size", type=int, default=KID_DEFAULTS["subset_size"])
    g.add_argument("--keep-features", type=int, default=KEEP_FEATURES, help="KID features kept from the samples")
    g.add_argument("--swd-max-images", type=int, default=SWDConfig.max_images)
    g.add_argument("--swd-seed", type=int, default=SWDConfig.seed)


# ------------------------------------------------------------------------------------------- helpers
def _data_config(args: argparse.Namespace):
    from data import DataConfig  # the dataset belongs to the data package

    given = {"source": args.data, "resolution": args.resolution, "crop": args.crop,
             "val_fraction": args.val_fraction, "split_seed": args.split_seed, "num_images": args.num_images}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        return DataConfig(**given, flip=False, cache=False, num_workers=args.num_workers)
    except ValueError as e:  # DataConfig validates every field with a one-line message
        raise EvalError(str(e)) from None


def _weights(args: argparse.Namespace) -> WeightsInfo:
    found = find_weights(args.weights, allow_download=args.allow_download, progress=True)
    return verify_weights(found, allow_unverified=args.allow_unverified_weights)


def _extractor(args: argparse.Namespace) -> InceptionExtractor:
    return InceptionExtractor(_weights(args), device=args.device)


def _metrics(args: argparse.Namespace, kid_available: bool, swd_available: bool) -> set[str]:
    if args.metrics == "auto":
        return {"fid"} | ({"kid", "pr"} if kid_available else set()) | ({"swd"} if swd_available else set())
    metrics = {m.strip().lower() for m in args.metrics.split(",") if m.strip()}
    if not metrics or metrics - set(METRICS):
        raise EvalError(f"--metrics: expected 'auto' or a comma list of {','.join(METRICS)}, got {args.metrics!r}")
    return metrics


def _needs_inception(args: argparse.Namespace) -> bool:
    return args.metrics == "auto" or bool(_metrics(args, False, False) & INCEPTION_METRICS)


def _kid_kwargs(args: argparse.Namespace) -> dict:
    return {"subsets": args.kid_subsets, "subset_size": args.kid_subset_size}


def _swd_config(args: argparse.Namespace) -> SWDConfig:
    return SWDConfig(max_images=args.swd_max_images, seed=args.swd_seed)


def _swd_reference_batches(args, reference, resolution: int):
    """Reference *images* for SWD: --ref-images, else the set the reference statistics came from."""
    if args.ref_images:
        return open_images(args.ref_images, resolution, resize=args.ref_resize).batches(args.batch_size)
    if reference is None:
        return None
    source = str(reference.protocol["source"])
    kind, _, path = source.partition(":")
    if kind in ("folder", "npz"):
        return open_images(path, resolution).batches(args.batch_size) if Path(path).exists() else None
    p = reference.protocol
    from data import DataConfig

    if source != "procedural" and not Path(source).exists():
        return None
    fields = {k: p[k] for k in ("resolution", "crop", "val_fraction", "split_seed", "num_images") if p[k] is not None}
    cfg = DataConfig(source=source, **fields, flip=False, cache=False, num_workers=args.num_workers)
    return dataset_batches(cfg, p["split"], args.batch_size)[0]


def _samples_record(folder: str, count: int) -> dict | None:
    """sample.py's record of what made the images in ``folder`` (None if absent); its count must match."""
    path = Path(folder) / SAMPLES_RECORD
    if not path.is_file():
        if Path(folder).is_dir():
            warnings.warn(f"{folder} has no {SAMPLES_RECORD}: not written by sample.py (or by an interrupted one, "
                          f"before records were kept); it is scored as it is, {count} images", stacklevel=2)
        return None
    record = json.loads(path.read_text())
    if record.get("complete") is False:
        raise EvalError(f"{folder} is an unfinished sampling ({count} of {record.get('count')} images; sample.py was "
                        f"interrupted): run the same sample.py command again to finish it, then score")
    if record.get("count") != count:
        raise EvalError(f"{folder} holds {count} images but {path} records {record.get('count')} samples: "
                        f"leftovers from another run? Re-sample into an empty folder")
    return record


def _finish(args, name: str, result) -> int:
    json_path, md_path = write_report(args.report_dir, args.name or name, result)
    print(summary_line(result))
    print(f"report: {json_path} {md_path}")
    return 0


# ------------------------------------------------------------------------------------------ commands
def cmd_ref(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.data):
        raise EvalError("ref: give exactly one of --data (a dataset) or --images (a folder / .npz)")
    weights = _weights(args)
    if args.images:
        images = open_images(args.images, args.resolution)
        protocol = folder_protocol(images)
    else:
        cfg = _data_config(args)
        protocol = dataset_protocol(cfg, args.split)
    if Path(args.out).exists() and not args.force:  # computed once per protocol, then reused
        cached = load_reference(args.out, expect={**protocol, "weights_sha256": weights.sha256})
        print(f"reference {args.out} is up to date ({cached.count} images, same protocol); --force recomputes")
        return 0
    if args.images:
        batches, n, description = images.batches(args.batch_size), images.count, images.describe()
        preprocessing = "files decoded with data.images.load_rgb (RGB), no resize"
    else:
        batches, n, description = dataset_batches(cfg, args.split, args.batch_size)
        preprocessing = f"data package, split {protocol['split']!r}, train=False (no flip), crop {cfg.crop}, " \
                        f"resize to {cfg.resolution}"
    ref = compute_reference(batches, InceptionExtractor(weights, args.device), protocol,
                            keep_features=args.kid_features, total=n, progress=True,
                            preprocessing=preprocessing, description=description)
    npz, side = save_reference(args.out, ref)
    print(f"reference: {ref.count} images, protocol {ref.protocol}")
    print(f"wrote {npz} {side}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    wants_inception = _needs_inception(args)
    extractor = _extractor(args) if wants_inception else None  # first, so missing weights fail fast
    reference = load_reference(args.ref) if args.ref else None
    if reference is None and wants_inception:
        raise EvalError("score: FID/KID need --ref (reference statistics); use --metrics swd with --ref-images")
    resolution = reference.resolution if reference is not None else None
    images = open_images(args.input, resolution)
    sampled = _samples_record(args.input, images.count)
    swd_batches = _swd_reference_batches(args, reference, images.height)
    metrics = _metrics(args, kid_available=reference is not None and reference.features is not None,
                       swd_available=swd_batches is not None)
    result = score_images(images.batches(args.batch_size), reference, extractor, metrics=metrics,
                          swd_reference=swd_batches, swd_config=_swd_config(args), kid_kwargs=_kid_kwargs(args),
                          keep_features=args.keep_features, total=images.count,
                          progress=True, protocol={"input": images.describe(), "reference_file": args.ref,
                                                   "reference_images": args.ref_images,
                                                   "reference_resized": args.ref_resize, "sampled": sampled,
                                                   "command": args.command_line})
    return _finish(args, f"score_{Path(args.input).stem}", result)


def cmd_gen(args: argparse.Namespace) -> int:
    """Generate and score. On several processes (``accelerate launch`` / torchrun) each process generates
    its share of the batches and the main process scores them all, in the order one process would: the
    same images and the same numbers for any process count."""
    if args.ref is None and not (args.metrics == "swd" and args.ref_images):
        raise EvalError("gen: --ref (reference statistics) is required, except for --metrics swd with --ref-images")
    state = process_state()  # with a launcher: waits here for the other processes
    args.device = args.device or str(state.device)
    main = state.is_main_process
    tokenizer, model, meta = load_models(args.tokenizer, args.maskgit, ema=True, device=args.device)
    settings = settings_from_args(args, meta)  # the sampler's flags, checked before Inception and the reference load
    attrs = parse_attrs(args.attrs, meta, model)
    extractor = _extractor(args) if main and _needs_inception(args) else None
    reference = load_reference(args.ref) if main and args.ref else None
    shard = (state.process_index, state.num_processes)
    local = generate(tokenizer, model, n=args.n, batch_size=args.gen_batch_size, seed=args.seed, attrs=attrs,
                     progress=False, shard=shard, **settings)
    batches = ordered_on_main(local, len(shard_batches(args.n, args.gen_batch_size)), state)
    if not main:
        for _ in batches:  # generate this process's share; the main process scores
            pass
        return 0
    resolution = reference.resolution if reference else tokenizer.cfg.resolution
    swd_batches = _swd_reference_batches(args, reference, resolution)
    metrics = _metrics(args, kid_available=reference is not None and reference.features is not None,
                       swd_available=swd_batches is not None)
    sampling = {"n": args.n, "seed": args.seed, "batch_size": args.gen_batch_size, "attrs": args.attrs, **settings}
    with closing(batches):  # SWD alone stops at its image cap: the other processes stop with it
        result = score_images(batches, reference, extractor, metrics=metrics, swd_reference=swd_batches,
                              swd_config=_swd_config(args), kid_kwargs=_kid_kwargs(args),
                              keep_features=args.keep_features, total=args.n, progress=True,
                              protocol={"checkpoints": {"tokenizer": args.tokenizer, "maskgit": args.maskgit},
                                        "sampling": sampling, "reference_file": args.ref, "command": args.command_line})
    if result.protocol["samples"]["count"] != args.n and metrics & INCEPTION_METRICS:
        raise EvalError(f"gen: the sampler yielded {result.protocol['samples']['count']} images, asked for {args.n}")
    return _finish(args, f"gen_{Path(args.maskgit).stem}_n{args.n}", result)


def cmd_rfid(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.data):
        raise EvalError("rfid: give exactly one of --data (a dataset split) or --images (a folder / .npz)")
    extractor = _extractor(args) if _needs_inception(args) else None
    from tokenizer import load_tokenizer

    model, _tok_cfg = load_tokenizer(args.tokenizer, ema=not args.raw_weights)
    model = model.to(args.device).eval()

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        z_q, _indices, _info = model.encode(x.to(args.device))
        return model.decode(z_q)
    if args.images:
        images = open_images(args.images, args.resolution)
        batches, n = images.batches(args.batch_size), images.count
        data = {"input": images.describe()}
    else:
        cfg = _data_config(args)
        batches, n, description = dataset_batches(cfg, args.split, args.batch_size, uint8=False)
        data = {"dataset": {**dataset_protocol(cfg, args.split), "description": description}}
    metrics = _metrics(args, kid_available=True, swd_available=True)
    result = score_reconstructions(batches, reconstruct, extractor, metrics=metrics, swd_config=_swd_config(args),
                                   kid_kwargs=_kid_kwargs(args), keep_features=args.keep_features,
                                   total=n, progress=True,
                                   protocol={"checkpoints": {"tokenizer": args.tokenizer, "ema": not args.raw_weights},
                                             **data, "command": args.command_line})
    return _finish(args, f"rfid_{Path(args.tokenizer).stem}_{args.split}", result)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ref", help="build reference statistics (.npz + .json) for a dataset split or a folder")
    _add_weights_flags(p)
    _add_data_flags(p)
    p.add_argument("--images", help="a folder of PNG/JPG or an .npz used as the reference set instead of --data")
    p.add_argument("--kid-features", type=int, default=KEEP_FEATURES,
                   help="features kept for KID (8 KiB each; 0: no KID against this reference)")
    p.add_argument("--out", required=True, help="output .npz (sidecar: same name, .json)")
    p.add_argument("--force", action="store_true", help="recompute even if --out exists (any protocol)")
    p.set_defaults(func=cmd_ref)

    p = sub.add_parser("score", help="score a folder / .npz of images against reference statistics")
    p.add_argument("input", help="folder of PNG/JPG images or .npz of uint8 NHWC/NCHW images")
    p.add_argument("--ref", help="reference statistics .npz from `ref`")
    p.add_argument("--ref-images", help="reference images (folder / .npz) for SWD")
    p.add_argument("--ref-resize", action="store_true",
                   help="--ref-images is a folder of photos of any size: centre-crop and resize each to the "
                        "samples' resolution, as the training images are")
    _add_weights_flags(p)
    _add_score_flags(p, "score_<input>")
    p.add_argument("--num-workers", type=int, default=2, help="workers for reading the reference dataset (SWD)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("gen", help="generate N samples from checkpoints and score them")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--maskgit", required=True)
    p.add_argument("--num-images", "--n", dest="n", type=int, default=10_000,
                   help="images to generate and score (--n: the former name; a launcher may take --n for its own)")
    p.add_argument("--seed", type=int, default=0)
    add_decode_flags(p)
    p.add_argument("--gen-batch-size", type=int, default=100)
    p.add_argument("--ref", help="reference statistics .npz (required unless --metrics swd with --ref-images)")
    p.add_argument("--ref-images", help="reference images (folder / .npz) for SWD")
    p.add_argument("--ref-resize", action="store_true",
                   help="--ref-images is a folder of photos of any size: centre-crop and resize each to the "
                        "samples' resolution, as the training images are")
    _add_weights_flags(p)
    _add_score_flags(p, "gen_<maskgit>_n<N>")
    p.add_argument("--num-workers", type=int, default=2)
    p.set_defaults(func=cmd_gen)

    p = sub.add_parser("rfid", help="reconstruct the validation split through a tokenizer and score it")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of EMA")
    p.add_argument("--no-ema", dest="raw_weights", action="store_true", help=argparse.SUPPRESS)  # old name of --raw-weights
    p.add_argument("--images", help="a folder / .npz of validation images instead of --data")
    _add_weights_flags(p)
    _add_data_flags(p)
    _add_score_flags(p, "rfid_<tokenizer>_<split>")
    p.set_defaults(func=cmd_rfid)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # what the user ran, as they would type it again: not the path of this file on this machine
    args.command_line = ["python", "-m", "eval", *(sys.argv[1:] if argv is None else argv)]
    if args.command != "gen" and getattr(args, "device", "") is None:  # gen: each process's own device
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return guarded(lambda: _check_outputs(args) or args.func(args))


def _check_outputs(args: argparse.Namespace) -> None:
    """Where the results go is checked first, not after minutes of computing."""
    report_dir = getattr(args, "report_dir", None)
    if report_dir and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise EvalError(f"--report-dir {report_dir} exists and is not a directory")
    for name in ("n", "batch_size", "gen_batch_size", "swd_max_images", "kid_subsets", "kid_subset_size"):
        if getattr(args, name, 1) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "device", None):
        check_device(args.device)


if __name__ == "__main__":
    warnings.showwarning = _show_warning  # "warning: ..." lines, not source locations
    sys.exit(main())
