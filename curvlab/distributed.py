"""Data parallelism on ``torch.distributed`` (``torchrun``): shards, reductions, rank 0 I/O.

The model is replicated (it must fit on one device); the data are sharded. Every batch of an
analysis or a training step is split by rows across the ``W`` processes (rank ``r`` takes rows
``[r·B/W, (r+1)·B/W)``, :meth:`Batch.shard`), each rank runs the curvature products, gradients and
losses of its rows with the unwrapped local model (``torch.func`` transforms do not compose with
DDP/FSDP wrappers), and one ``all_reduce`` (sum) per product combines them. Losses are sums of
token cross-entropies divided by the token count of *all* ranks, so that the reduced result is the
single-process result on the union of the shards. Vectors of Lanczos, CG and the preconditioner
comparison are replicated: every rank runs the same iteration on the same reduced products (the
all-reduced buffer is identical on every rank), so no further communication is needed; only rank
0 writes files.

The process group is created from the ``torchrun`` environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) by :func:`init`: NCCL when CUDA is available
(device ``cuda:LOCAL_RANK``), gloo otherwise (``CURVLAB_DIST_BACKEND`` overrides). Collectives
time out after ``timeout`` seconds
(``CURVLAB_DIST_TIMEOUT``, default 600) so that a dead or diverging rank gives an error instead of
a hang. Outside ``torchrun`` every function here is a no-op on one process.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from curvlab.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0


def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher setting ``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and on a single process): the rank that prints and writes files."""
    return rank() == 0


def timeout_seconds() -> float:
    value = os.environ.get("CURVLAB_DIST_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"CURVLAB_DIST_TIMEOUT must be a number of seconds, got {value!r}"
                          ) from None


def init(timeout: float | None = None, backend: str | None = None) -> bool:
    """Join the ``torchrun`` process group (idempotent). Returns whether it runs distributed.

    ``backend``: ``CURVLAB_DIST_BACKEND`` if set, else :func:`default_backend`. With NCCL the
    current device is set to ``cuda:LOCAL_RANK`` (one GPU per process).
    """
    if not launched():
        return False
    if active():
        return True
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed")
    seconds = timeout_seconds() if timeout is None else timeout
    backend = backend or os.environ.get("CURVLAB_DIST_BACKEND") or default_backend()
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return True


def default_backend() -> str:
    """``cpu:gloo,cuda:nccl`` when every process of this node can have its own GPU (CPU tensors
    over gloo, CUDA tensors over NCCL, so ``--device cpu`` keeps working on a GPU machine), else
    ``gloo`` (no CUDA, or more processes than GPUs: they share the GPUs, over gloo)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def shutdown(wait: bool = True) -> None:
    """Leave the process group (if any). ``wait``: first a barrier, so that no rank tears its
    connections down while another still uses them; pass False on an error path, where another
    rank may be gone."""
    if dist.is_available() and dist.is_initialized():
        # objects in reference cycles that hold the group (a DDP wrapper) must go first: if
        # they outlive destroy_process_group, the group's destructor runs at interpreter exit
        # and can abort the process ("terminate called without an active exception")
        gc.collect()
        if wait and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        dist.destroy_process_group()


def _nccl() -> bool:
    return active() and "nccl" in str(dist.get_backend())


def default_device() -> str:
    """``cuda:LOCAL_RANK`` under a distributed run with NCCL, else ``cuda`` or ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if _nccl() else "cuda"
    return "cpu"


def local_device(requested: str) -> str:
    """The device this process uses when ``requested`` was asked for on every rank: under
    ``torchrun`` with NCCL any CUDA device means this process's GPU, ``cuda:LOCAL_RANK`` (NCCL
    needs one GPU per process); otherwise ``requested`` itself."""
    if _nccl() and str(requested).startswith("cuda"):
        return default_device()
    return requested


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, with one collective (a flat buffer)."""
    if not active() or not tensors:
        return
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over ranks (a new tensor; the input is left alone)."""
    if not active():
        return value
    out = value.detach().clone().contiguous()
    dist.all_reduce(out)
    return out


def sum_scalars(*values: float) -> tuple[float, ...]:
    """Python numbers summed over ranks (float64, one collective)."""
    if not active():
        return tuple(float(v) for v in values)
    # CPU tensors go over gloo (alone or beside NCCL); NCCL alone needs a CUDA tensor
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def fingerprint(obj: Any) -> str:
    """A short hash of a JSON-able description of a configuration."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(what: str, obj: Any) -> None:
    """Raise a :class:`ConfigError` on every rank unless all ranks hold the same ``obj``
    (compared by :func:`fingerprint`); the message names the first rank that differs."""
    if not active():
        return
    mine = fingerprint(obj)
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, (mine, obj))
    for r, (fp, theirs) in enumerate(everyone):
        if fp != everyone[0][0]:
            detail = _first_difference(everyone[0][1], theirs)
            raise ConfigError(f"rank {r} has a different {what} than rank 0{detail}; every "
                              "torchrun process must be started with the same arguments")


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return f" ({k}: {a.get(k)!r} on rank 0, {b.get(k)!r} there)"
    return ""


def shard_rows(total: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The row range ``[start, stop)`` of ``rank_`` among ``total`` rows (contiguous, sizes
    differing by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if total < w:
        raise ConfigError(f"a batch of {total} sequences cannot be split across {w} processes; "
                          f"use a batch size of at least {w}")
    base, extra = divmod(total, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)
