"""Parallelising a model, in torchtitan's order, each a small function: activation checkpointing wraps each block,
`torch.compile` compiles each block in place, then `fully_shard` shards each block and finally the root
(embeddings, final norm and head), with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); and moving
whole weights into (`build_sharded`) and out of (`full_state_dict`) a sharded model. Without a process group
nothing is sharded. The process group itself and the collectives are in distributed.py.

Every rank must call the sharded blocks in the same order: callers derive skip decisions from the step.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..core.distributed import Env
from ..model.config import Phi3Config
from ..model.model import Phi3ForCausalLM
from ..model.rope import Rotary

# Methods other than forward that run a model; FSDP must all-gather around them as around forward.
FORWARD_METHODS = ("hidden_states", "forward_branches", "residuals", "hidden_from")


# Wrapping, in torchtitan's order -------------------------------------------------------------------------------
def apply_ac(model: Phi3ForCausalLM) -> None:
    """Activation checkpointing per block: only each block's input is kept; the rest is recomputed in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Phi3ForCausalLM) -> None:
    """torch.compile each block in place (torchtitan's way): the blocks are identical, so one compilation serves
    all of them, and in place no `_orig_mod.` enters the parameter names."""
    for block in model.model.layers:
        block.compile(fullgraph=True)


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
                  dtype: torch.dtype, prepare: Callable[[Phi3ForCausalLM], Any] | None = None,
                  **parallel_kw) -> Phi3ForCausalLM:
    """A sharded model whose weights come from rank 0 (`state_dict` there, None elsewhere), stored in `dtype`.

    Built on the meta device, wrapped, materialised shard by shard, then filled by broadcast from rank 0: only
    rank 0 ever holds the full weights. `prepare` runs on the bare model first (e.g. to attach skip adapters).
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


def full_state_dict(model: nn.Module, env: Env) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU (None on other ranks), under their plain names (activation
    checkpointing's wrapper drops its prefix from state dicts; blocks are compiled in place)."""
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if env.is_main else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
