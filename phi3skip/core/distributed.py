"""Process group and collectives: set-up and tear-down under torchrun, and collectives that are no-ops in one
process (torchtitan's distributed/utils.py). Without torchrun there is no process group: `python train.py` runs in
one process on a CPU or one GPU.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .cli import UserError
from .devices import pick_device


@dataclass(frozen=True)
class Env:
    """Where this process runs: its rank among `world_size`, its device, and the FSDP mesh (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init(device: str | None = None, timeout_s: float = 1800) -> Env:
    """Set up this process: a process group (NCCL on CUDA, gloo on CPU) under torchrun, else none.

    device: "cuda", "cuda:N" (one process only: torchrun gives each process cuda:LOCAL_RANK), "cpu" or None
    (CUDA when available).
    """
    dev = pick_device(device)
    launched = launched_by_torchrun()
    if dev.type == "cuda" and dev.index is not None and launched:
        raise UserError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                        f"and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if not launched:
        if dev.type == "cuda":  # the GPU named, else the current one; set, so that plain "cuda" tensors land there too
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
            torch.cuda.set_device(dev)
        return Env(device=dev)
    kind = dev.type
    # Imported before any process group exists: on import, torch.distributed.fsdp binds the current default group
    # into a default argument (ShardedGradScaler's), which would keep that group alive past `close`.
    from torch.distributed import fsdp  # noqa: F401

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if kind.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev, timeout=timedelta(seconds=timeout_s))
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,))
    return Env(rank, world, local, dev, mesh)


def close(env: Env, wait: bool = True) -> None:
    """Tear the process group down before the interpreter exits, with no communication thread left running.

    torch's DeviceMesh keeps its process groups in `_pg_registry` (and torch's caches keep the mesh alive), so
    after `destroy_process_group` gloo's threads still run while Python shuts down and C++ destroys them in no
    set order: a rank could abort at exit ("terminate called without an active exception"), failing a finished
    job. So: wait for every rank (`wait`, on the success path: no rank leaves while a peer still talks to it),
    destroy the groups, drop the mesh's references and collect the sharded models' cycles that hold the group.
    """
    if not (env.distributed and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    registry = getattr(env.mesh, "_pg_registry", None)
    if isinstance(registry, dict):
        registry.clear()
    gc.collect()  # FSDP state (in reference cycles with its modules) holds the group too


# Collectives that are no-ops in one process ------------------------------------------------------------------
def all_reduce(t: torch.Tensor, env: Env, op: str = "sum") -> torch.Tensor:
    """In place: sum, mean or max over ranks (of a tensor on env.device)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t.div_(env.world_size)
    return t


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj: Any, env: Env) -> Any:
    """Rank 0's object on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def grad_norm_clip(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm; returns the norm before clipping. Under FSDP the gradients are DTensor shards
    and the norm a collective: every rank calls this."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
