"""Run code on 2 CPU processes with the gloo backend: API functions (``spawn``) or the CLI
under ``torchrun`` (``torchrun``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn, world: int, port: int, out: str, args: tuple, timeout: float) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      CURVLAB_DIST_TIMEOUT=str(timeout))
    torch.set_num_threads(1)
    from curvlab import distributed

    distributed.init(backend="gloo")
    try:
        result = fn(rank, *args)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def spawn(fn, *args, world: int = 2, tmp_path: Path, timeout: float = 60.0) -> list:
    """``fn(rank, *args)`` on ``world`` processes in one gloo group (``fn`` importable at module
    level); returns every rank's (``torch.save``-able) result, rank 0 first."""
    port = free_port()
    mp.spawn(_child, args=(fn, world, port, str(tmp_path), args, timeout), nprocs=world,
             join=True)
    return [torch.load(f"{tmp_path}/rank{r}.pt", weights_only=False) for r in range(world)]


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 240.0,
             env: dict[str, str] | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m curvlab ARGS`` (captured output)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CURVLAB_DIST_TIMEOUT": "30",
                "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "curvlab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)
