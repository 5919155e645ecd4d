"""Everything that spans the processes of ``accelerate launch`` / torchrun, in one module: the collectives
the VQ layers use to keep replicas identical (``broadcast_``, ``all_reduce_``), the joint decisions of the
training loops (``all_ranks_any``), and for the scripts that do not train (``sample.py``,
``pretokenize.py``) which batches each process takes and gathering results on rank 0. All of them are
no-ops with one process.

The items (images to sample, images to encode) are cut into fixed batches of consecutive indices,
[0, B), [B, 2B), ..., and process r takes batches r, r + P, r + 2P, ... of them. A batch therefore holds
the same items whatever the number of processes P, so the numbers computed for an item do not depend
on P either (batched kernels are not required to give bit-identical rows for another batch shape).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def multi_cpu() -> bool:
    """Several processes without CUDA (torchrun or ``accelerate launch --cpu``): data-parallel on CPU, gloo."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> Any:
    """Accelerate's PartialState: rank, number of processes, this process's device, barriers. One
    process without a launcher; joining the others (a rendezvous) when started by one."""
    from accelerate import PartialState

    return PartialState(cpu=multi_cpu())


def check_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device ``name`` names, or one UserError line: not a device, or one this machine lacks."""
    from core.errors import UserError

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {name!r} is not a device; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                        f"use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda") and not getattr(getattr(torch.backends, device.type, None),
                                                          "is_available", lambda: False)():
        raise UserError(f"{flag} {name}: not available on this machine; use {flag} cpu")
    return device


def shard_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """The index ranges of the batches of ``n`` items that process ``rank`` of ``world`` takes, in order."""
    starts = range(rank * batch_size, n, world * batch_size)
    return [range(s, min(s + batch_size, n)) for s in starts]


def gather_on_main(obj: Any, state: Any) -> list[Any] | None:
    """Every process's ``obj``, in rank order, on the main process (None on the others); [obj] alone."""
    if state.num_processes == 1:
        return [obj]
    out = [None] * state.num_processes if state.is_main_process else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def ordered_on_main(local: Iterator[Any], n_batches: int, state: Any) -> Iterator[Any]:
    """The batches of every process, on the main process in batch order: process r's ``local`` yields its
    ``shard_batches`` (batches r, r + P, ...); round k gathers batch k*P + r from each process r. On the
    main process this yields all ``n_batches`` batches in the order one process would; elsewhere it yields
    nothing and just drives ``local`` (iterate it to the end on every process). The main process may stop
    early (close the generator, e.g. a score that has enough images): the others stop at the next round
    without computing their next batch. With one process: ``local`` itself."""
    if state.num_processes == 1:
        yield from local
        return
    rounds = -(-n_batches // state.num_processes)
    gathered_rounds = 0
    try:
        for k in range(rounds):
            go = [True]
            dist.broadcast_object_list(go, src=0)  # the main process's "more, please"
            if not go[0]:
                return
            gathered = gather_on_main(next(local, None), state)
            gathered_rounds = k + 1
            if state.is_main_process:
                yield from (b for b in gathered if b is not None)
    finally:
        if state.is_main_process and gathered_rounds < rounds:  # closed early: the others wait for round k + 1
            dist.broadcast_object_list([False], src=0)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from rank ``src`` when torch.distributed is initialised (no-op otherwise)."""
    if distributed():
        dist.broadcast(t, src)
    return t


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum/mean/max) when torch.distributed is initialised (no-op otherwise)."""
    if distributed():
        if op == "max":
            dist.all_reduce(t, dist.ReduceOp.MAX)
        else:
            dist.all_reduce(t, dist.ReduceOp.SUM)
            if op == "mean":
                t /= dist.get_world_size()
    return t


def all_ranks_any(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on any (one all-reduce; the flag itself with one process).
    Per-rank decisions to skip a backward or to stop would leave the other ranks waiting in a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
