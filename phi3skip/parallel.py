"""Process group, FSDP2 wrapping, per-block torch.compile and activation checkpointing.

In torchtitan's order, each a small function: activation checkpointing wraps each block, `torch.compile`
compiles each block, then `fully_shard` shards each block and finally the root (embeddings, final norm and
head), with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). Without torchrun there is no process
group and nothing is sharded: `python train.py` runs in one process on a CPU or one GPU.

Every rank must call the sharded blocks in the same order: callers derive skip decisions from the step.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
# Imported before any process group exists: on import, torch.distributed.fsdp binds the current default group
# into a default argument (ShardedGradScaler's), which would keep that group alive past `close`.
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .cli import UserError
from .config import Phi3Config
from .model import Phi3ForCausalLM
from .rope import Rotary

# Methods other than forward that run a model; FSDP must all-gather around them as around forward.
FORWARD_METHODS = ("hidden_states", "forward_branches", "residuals", "hidden_from")


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

    device: "cuda", "cpu" or None (CUDA when available).
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if not launched_by_torchrun():
        return Env(device=torch.device("cuda", torch.cuda.current_device()) if kind.startswith("cuda")
                   else torch.device("cpu"))
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


# Wrapping, in torchtitan's order -------------------------------------------------------------------------------
def apply_ac(model: Phi3ForCausalLM) -> None:
    """Activation checkpointing per block: only each block's input is kept; the rest is recomputed in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Phi3ForCausalLM) -> None:
    """torch.compile each block: the blocks are identical, so one compilation serves all of them."""
    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(block, fullgraph=True)


def apply_fsdp(model: Phi3ForCausalLM, mesh, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """fully_shard each block, then the root; register the model's other forward methods with FSDP.

    The root keeps its parameters (embeddings, norm, head) gathered after forward, as FSDP does for a root, so
    the chunked loss can read `lm_head.weight`; call `reshard` on a model that runs no backward (the teacher).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def parallelize(model: Phi3ForCausalLM, env: Env, *, param_dtype: torch.dtype | None, compile: bool = False,
                ac: bool = False, reshard_after_forward: bool = True) -> Phi3ForCausalLM:
    """AC -> compile -> FSDP (the last only with a process group). param_dtype: the compute dtype under FSDP."""
    if ac:
        apply_ac(model)
    if compile:
        apply_compile(model)
    if env.distributed:
        mp_dtype = None if param_dtype == torch.float32 else param_dtype
        apply_fsdp(model, env.mesh, mp_dtype, torch.float32 if mp_dtype else None, reshard_after_forward)
    return model


def reshard(model: nn.Module) -> None:
    """Free a sharded model's gathered parameters (a no-op without FSDP)."""
    fn = getattr(model, "reshard", None)
    if callable(fn):
        fn()


def build_sharded(config: Phi3Config, state_dict: Mapping[str, torch.Tensor] | None, env: Env, *,
                  dtype: torch.dtype, prepare: Callable[[Phi3ForCausalLM], None] | None = None,
                  **parallel_kw) -> Phi3ForCausalLM:
    """A sharded model whose weights come from rank 0 (`state_dict` there, None elsewhere), stored in `dtype`.

    Built on the meta device, wrapped, materialised shard by shard, then filled by broadcast from rank 0: only
    rank 0 ever holds the full weights. `prepare` runs on the bare model first (e.g. to bind forward methods).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to(dtype)
    if prepare is not None:
        prepare(model)
    parallelize(model, env, **parallel_kw)
    model.to_empty(device=env.device)
    set_model_state_dict(model, dict(state_dict) if env.is_main and state_dict is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.rotary = Rotary(config).to(env.device)  # derived fp32 tables, not in the state dict
    return model


def clean_name(fqn: str) -> str:
    """A parameter name without the wrappers that compile and activation checkpointing add."""
    return fqn.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def full_state_dict(model: nn.Module, env: Env) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU (None on other ranks), under their plain names."""
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {clean_name(k): v for k, v in sd.items()} if env.is_main else None
    return {clean_name(k): v.detach().cpu() for k, v in model.state_dict().items()}


def grad_norm_clip(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm (DTensor gradients under FSDP included); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of known GPUs, for MFU (None when unknown or on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                       ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None
