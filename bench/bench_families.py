"""Forward+backward time and peak memory of our FSQ, LFQ, rotation-trick VQ and SimVQ vs vector-quantize-pytorch.

    python bench/bench_families.py            # --quick: one or two sizes per family, ~2-4 min on 2 busy CPU cores
    python bench/bench_families.py --full     # larger N and K as well
    python bench/bench_families.py --cases lfq:16384x10x1024 simvq:16384x64x1024

Each family is compared with the peer's layer of the same name at the same size, set up as the same
algorithm (``build`` below): FSQ with the same levels; LFQ with the same entropy weights (0.1 per-sample,
0.1 codebook), commitment weight 0.25 and temperature 0.01; VQ + rotation trick as ``bench_vq.py``'s plain
VQ (learnable codebook, no EMA, no k-means, no dead-code replacement) with the rotation trick on both
sides, the peer's codebook overwritten with ours; SimVQ with a linear code map, no rotation trick, the
peer's frozen basis and map overwritten with ours (so both make the same assignments). Sizes are
``N x d x K``: N vectors of d features, K codes; for FSQ and LFQ d is the number of grid channels
(len(levels), log2 K), so neither side projects and the quantizer itself is measured. FSQ's levels
for K come from ``tokenizer.fsq.fsq_levels``.

Timing and memory exactly as ``bench_vq.py`` (whose subprocess machinery this script reuses): one
fresh subprocess per size times both layers in alternating repetitions (median, ratio peer / ours,
> 1: ours is faster); one fresh subprocess per (layer, size) measures the peak memory of one step above
its inputs; "agree" is the fraction of vectors both layers map to the same index.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import bench_vq  # noqa: E402

FAMILIES = ("fsq", "lfq", "rotation", "simvq")
QUICK = [("fsq", 65536, 4, 1000), ("fsq", 65536, 6, 64000), ("lfq", 16384, 10, 1024),
         ("rotation", 16384, 64, 1024), ("simvq", 16384, 64, 1024)]
FULL = QUICK + [("fsq", 262144, 6, 64000), ("lfq", 65536, 10, 1024), ("lfq", 16384, 12, 4096),
                ("rotation", 65536, 64, 1024), ("rotation", 16384, 64, 16384), ("simvq", 16384, 64, 16384)]
LFQ = dict(beta=0.75, temperature=0.01, sample_entropy_weight=0.1, codebook_entropy_weight=0.1)
PEER_LFQ = dict(entropy_loss_weight=0.1, commitment_loss_weight=0.25, diversity_gamma=1.0)


# ---- the measured layers (built inside the worker subprocesses) ----------------------------------
def build(family: str, impl: str, d: int, k: int, device: str):
    import torch

    from tokenizer import VectorQuant
    from tokenizer.fsq import FiniteScalarQuant, fsq_levels
    from tokenizer.lfq import LookupFreeQuant
    from tokenizer.simvq import SimVQ

    torch.manual_seed(0)
    if family == "fsq":
        levels = fsq_levels(k)
        if impl == "ours":
            vq = FiniteScalarQuant(d, levels)
        else:
            from vector_quantize_pytorch import FSQ
            vq = FSQ(levels=list(levels), dim=d)
    elif family == "lfq":
        if impl == "ours":
            vq = LookupFreeQuant(d, k, **LFQ)
        else:
            from vector_quantize_pytorch import LFQ as PeerLFQ
            vq = PeerLFQ(dim=d, codebook_size=k, **PEER_LFQ)
    elif family == "rotation":
        if impl == "ours":
            vq = VectorQuant(d, k, **bench_vq.OURS_KWARGS, rotation_trick=True)
        else:
            from vector_quantize_pytorch import VectorQuantize
            vq = VectorQuantize(dim=d, codebook_size=k, **{**bench_vq.PEER_KWARGS, "rotation_trick": True})
    else:
        if impl == "ours":
            vq = SimVQ(d, k)
        else:
            from vector_quantize_pytorch import SimVQ as PeerSimVQ
            vq = PeerSimVQ(dim=d, codebook_size=k, rotation_trick=False)
    return vq.to(device).train()


def tie(family: str, layers: dict) -> None:
    """Make the peer's learned/random state ours, so both compute the same assignments."""
    ours, peer = layers["ours"], layers["peer"]
    if family == "rotation":
        bench_vq.tie_codebooks(layers)
    elif family == "simvq":
        peer.frozen_codebook.copy_(ours.codebook.weight)
        peer.code_transform.weight.copy_(ours.code_map.weight)


def forward(impl: str, vq, z):
    """(output (N, d), loss, indices (N,)); the peer's layers take (B, N, d), its FSQ returns no loss."""
    if impl == "ours":
        return bench_vq.forward(impl, vq, z)
    res = vq(z[None])
    return res[0][0], (res[2] if len(res) > 2 else 0.0), res[1][0]


# ---- the driver ----------------------------------------------------------------------------------
def parse_case(text: str) -> tuple[str, int, int, int]:
    family, _, size = text.partition(":")
    if family not in FAMILIES:
        raise SystemExit(f"error: case {text!r}: family must be one of {', '.join(FAMILIES)}")
    try:
        n, d, k = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: case {text!r}: expected FAMILY:NxDxK, e.g. lfq:16384x10x1024") from None
    return family, n, d, k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="a few sizes per family (the default)")
    grid.add_argument("--full", action="store_true", help="larger N and K as well")
    p.add_argument("--cases", nargs="+", metavar="FAMILY:NxDxK", help="run only these, e.g. fsq:65536x4x1000")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (0: torch's default); 1 gives steadier ratios on a busy machine")
    p.add_argument("--out", default="runs/bench/families.json")
    p.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)  # internal: the worker's family
    bench_vq.add_measurement_args(p)
    a = p.parse_args()

    if a.worker:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        if a.device == "cpu":
            bench_vq.limit_address_space(a.mem_limit_gib)
        fns = dict(build_fn=partial(build, a.family), step_fn=partial(bench_vq.step, forward_fn=forward))
        result = bench_vq.worker_time(a, tie_fn=partial(tie, a.family), **fns) if a.worker == "time" \
            else bench_vq.worker_mem(a, **fns)
        print(json.dumps(result))
        return

    from importlib.metadata import version

    import torch
    import vector_quantize_pytorch  # noqa: F401  (fail here, not in every worker, if it is missing)

    cases = [parse_case(c) for c in a.cases] if a.cases else FULL if a.full else QUICK
    reps = a.reps or (5 if a.full else 3)
    meta = {"device": a.device, "precision": "bf16 autocast" if bench_vq.bf16(a) else "fp32",
            "torch": torch.__version__, "threads": a.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "peer": f"vector-quantize-pytorch {version('vector-quantize-pytorch')}", "reps": reps,
            "ours_lfq": LFQ, "peer_lfq": PEER_LFQ, "ours_vq": bench_vq.OURS_KWARGS, "peer_vq": bench_vq.PEER_KWARGS,
            "step": "vq(z); (loss + <out, g>).backward(); z (N, d), g fixed, training mode"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start, rows = time.time(), []
    for family, n, d, k in cases:
        row = bench_vq.measure(a, n, d, k, reps, script=__file__, extra=("--family", family, "--threads", str(a.threads)))
        rows.append({"family": family, **row})
        meta["elapsed_s"] = time.time() - t_start
        meta["complete"] = len(rows) == len(cases)
        table = bench_vq.table(rows, first=("family",))
        out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"quantizer families vs {meta['peer']} ({a.device}, {meta['threads']} threads, median of {reps} "
          f"alternating reps; memory = peak of one step above its inputs)")
    print("\n".join(bench_vq.table(rows, first=("family",))))
    print(f"total {meta['elapsed_s']:.0f} s")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
