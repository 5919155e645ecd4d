"""How often a training step waits on the host: calls that read a tensor's value on the CPU, per step.

    python bench/count_syncs.py                  # both stages, tiny presets, procedural faces

The tokenizer trains the paper's full recipe (``--recipe all``: k-means init, in-place step, affine map,
synchronized STE, l2, dead-code replacement), every part of the VQ layer that could read the device,
not only the presets' +l2 +replace.

On a GPU every such call (``.item()``, ``bool(t)``, ``.tolist()``, ``int(t)`` / ``float(t)``,
``.numpy()``, ``nonzero``, boolean-mask indexing, ``masked_select``) stalls the queue until the device
has caught up. On the CPU nothing stalls, but the calls are the same, so counting them here says what
a GPU run would wait for. The real training scripts run in this process twice, for A and for B steps,
with logging, validation, sample grids and checkpoints pushed past the last step; the difference of the
two counts divided by B - A is the number per step that does not log. Setup and the final save are the
same in both runs and cancel out. Reads of tensors that stay on the host also when training on a GPU
(the optimizers' step counters, the data sampler's permutations, checks guarded to CPU tensors) are
listed but not counted. Prints the count per step and the call sites.

What a CPU run cannot see: calls that synchronize only on a GPU without reading a value in Python
(``torch.bincount``, which sizes its output from the largest id; a blocking host-to-device copy, which
waits for the queue). tests/test_host_syncs.py runs the same steps under torch.cuda.set_sync_debug_mode
("error") where a GPU is present.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from common import ROOT

HOST_ONLY = "host-resident tensors (no device sync on a GPU either)"
READS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__", "numpy", "nonzero", "masked_select")


@contextlib.contextmanager
def count_host_reads():
    """Count (and locate) every host read of a tensor's value while the block runs."""
    counts: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    saved_getitem, saved_nonzero = torch.Tensor.__getitem__, torch.nonzero

    def site() -> str:
        stack = traceback.extract_stack()[:-2]
        if "torch/optim" in stack[-1].filename.replace("\\", "/"):
            return HOST_ONLY  # the optimizers' step counters: CPU tensors also when training on a GPU
        for frame in reversed(stack):
            if str(ROOT) in frame.filename and "site-packages" not in frame.filename and "count_syncs" not in frame.filename:
                where = f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
                # the data sampler's permutations and checks written to run on CPU tensors only
                if "training/sampler.py" in where or 'device.type == "cpu"' in (frame.line or ""):
                    return HOST_ONLY
                return where
        return "outside the project"

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[(name, site())] += 1
            return fn(self, *args, **kwargs)
        return counted

    def getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            counts[("boolean index", site())] += 1
        return saved_getitem(self, index)

    def nonzero(*args, **kwargs):
        counts[("torch.nonzero", site())] += 1
        return saved_nonzero(*args, **kwargs)

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.Tensor.__getitem__, torch.nonzero = getitem, nonzero
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.__getitem__, torch.nonzero = saved_getitem, saved_nonzero


def run_script(script: str, args: list[str]) -> None:
    """Run a training script in this process (its signal handlers are restored afterwards)."""
    import runpy
    import signal

    argv, handlers = sys.argv, {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"{script} exited with {e.code}") from None
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


QUIET = ["log.log_every=100000", "log.image_every=100000", "log.ckpt_every=100000", "data.num_images=64",
         "optim.batch_size=8", "data.num_workers=0"]


def first_stage(root: Path) -> tuple[Path, Path]:
    """A 2-step tiny tokenizer and its code files under ``root``: what the MaskGIT stage trains on."""
    tok_dir = root / "tok"
    run_script("train_tokenizer.py", ["--preset", "tiny", "--run-dir", str(tok_dir), "optim.steps=2",
                                      "log.val_batches=1", *QUIET])
    run_script("pretokenize.py", ["--tokenizer", str(tok_dir / "checkpoint.pt"), "--out", str(root / "codes")])
    return tok_dir / "checkpoint.pt", root / "codes"


def stages(tokenizer: Path, codes: Path) -> dict[str, tuple[str, Any]]:
    """Each stage's script and its arguments (a function of a temporary folder), logging pushed past the end."""
    return {
        "tokenizer": ("train_tokenizer.py", lambda tmp: ["--preset", "tiny", "--recipe", "all", "log.val_batches=0",
                                                        *QUIET]),
        "maskgit": ("train_maskgit.py", lambda tmp: ["--preset", "tiny", "--codes", str(codes), "--tokenizer",
                                                    str(tokenizer), "log.log_every=100000",
                                                    "log.image_every=100000", "log.ckpt_every=100000",
                                                    "optim.batch_size=8"]),
    }


def per_step(script: str, common: list[str], a: int, b: int) -> tuple[float, collections.Counter]:
    results = []
    for steps in (a, b):
        with tempfile.TemporaryDirectory() as tmp, count_host_reads() as counts:
            run_script(script, ["--run-dir", str(Path(tmp) / "run"), *common(tmp), f"optim.steps={steps}"])
        results.append(counts)
    diff = collections.Counter({k: v for k, v in (results[1] - results[0]).items()})
    return sum(v for k, v in diff.items() if k[1] != HOST_ONLY) / (b - a), diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", nargs=2, type=int, default=[4, 8], metavar=("A", "B"))
    p.add_argument("--out", help="write the counts as JSON here")
    a = p.parse_args()
    torch.set_num_threads(1)
    stage_runs = stages(*first_stage(Path(tempfile.mkdtemp())))
    report = {}
    for stage, (script, common) in stage_runs.items():
        n, sites = per_step(script, common, *a.steps)
        report[stage] = {"per_step": n, "sites": {f"{k[0]} at {k[1]}": v / (a.steps[1] - a.steps[0])
                                                  for k, v in sites.most_common()}}
        print(f"{stage}: {n:g} host reads of device tensors per step that does not log")
        for where, v in report[stage]["sites"].items():
            print(f"    {v:g}  {where}")
    if a.out:
        Path(a.out).write_text(json.dumps({"command": "python bench/count_syncs.py " + " ".join(sys.argv[1:]),
                                           **report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
