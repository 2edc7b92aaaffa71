"""A skip set with bypasses as a heterogeneous-block model: the layout of NVIDIA's Nemotron-NAS (DeciLM) checkpoints,
which llama.cpp runs as its `deci` architecture.

    from phi3skip.formats.deci import export_state
    state, slots = export_state(student, skip=(14, 13, 25))

A kept layer stays an ordinary block. A skipped layer with a trained bypass (phi3skip.model.bypass, sequential form)
becomes a block whose attention is DeciLM's "linear attention" — `wo · attn_norm(x)` added to the residual, no
keys, no values, no KV cache — with wo = up · down, followed by its narrow SwiGLU FFN on its own norm: exactly
`h = x + up(down(norm(x))); x = h + mlp(mlp_norm(h))`, with the skip set's per-depth deltas folded in
(`phi3skip.model.bypass.merged`). A skipped layer without a bypass is removed. A bypass
without MLP channels gets an FFN of ZERO_FFN channels whose down projection is zero (adds exactly 0): llama.cpp's
deci graph drops the attention output of a block with no FFN.

What runs it (read in the engines' sources, 2026-12): llama.cpp computes every block kind written here (tested:
tests/test_llama_cpp.py); vLLM's nemotron_nas has no linear-attention block, and transformers has no DeciLM of its
own (only NVIDIA's remote code), so neither runs a bypassed slot. llama.cpp's deci has no LongRoPE, no partial
rotary and no sliding window: a model that needs the first two is refused; a windowed model (Phi-3-mini-4k) is
exported with its context limited to the window, inside which the window changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..core.cli import UserError
from ..model.bypass import merged
from ..model.config import Phi3Config
from ..model.model import Phi3ForCausalLM
from ..model.skipsets import validate_skip

ZERO_FFN = 32  # channels of the zero FFN after an MLP-less bypass: one Q8_0 block per row
ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"


@dataclass(frozen=True)
class Slot:
    """One block of the exported model: the student's `layer`, run as itself or as its bypass."""
    layer: int
    bypass: bool
    ffn: int  # FFN channels (intermediate size)


def bypassed(model: Phi3ForCausalLM, skip: Sequence[int]) -> list[int]:
    """The layers of `skip` that run a trained bypass when skipped."""
    adapters = model.skip_adapters
    return sorted(i for i in skip if adapters is not None and i in adapters)


def check(config: Phi3Config, form: str | None = None) -> None:
    """Refuse, in one line, what llama.cpp's deci architecture cannot compute exactly: bypasses of another `form`
    than a block's (when given), LongRoPE, partial rotary."""
    if form is not None and form != "sequential":
        raise UserError(f"the student's bypasses are of the {form} form (saved by an earlier phi3skip): no engine's "
                        "block computes it; retrain the student (its bypasses are then blocks of llama.cpp's deci "
                        "architecture), or serve this skip set with phi3skip")
    if config.rope_scaling is not None:
        raise UserError("this model uses LongRoPE, which llama.cpp's deci architecture (the only engine layout for "
                        "bypassed skip sets) does not implement; serve this skip set with phi3skip")
    if config.rotary_dim != config.hd:
        raise UserError(f"partial rotary ({config.rotary_dim} of {config.hd} head dimensions) is not implemented "
                        "by llama.cpp's deci architecture; serve this skip set with phi3skip")


def context_length(config: Phi3Config) -> int:
    """The context the export is exact in: deci has no sliding window, so a windowed model stops at its window
    (Phi-3's window of W keys includes the query: W tokens see every earlier token)."""
    window = config.sliding_window
    return min(config.max_position_embeddings, window) if window else config.max_position_embeddings


def export_state(model: Phi3ForCausalLM, skip: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[Slot]]:
    """The student skipping `skip` as a DeciLM state dict (Hugging Face Llama names, q/k/v and gate/up apart,
    `self_attn.linear_attn.weight` for a bypass's map) and its blocks."""
    cfg, adapters = model.config, model.skip_adapters
    skipped = validate_skip(skip, cfg.num_hidden_layers)
    check(cfg, adapters.form if adapters is not None else None)
    bypasses = merged(adapters, skipped) if adapters is not None else {}  # the weights this set runs with
    base = model.base_state_dict()
    q, kv = cfg.num_attention_heads * cfg.hd, cfg.num_key_value_heads * cfg.hd
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": base["model.embed_tokens.weight"]}
    slots: list[Slot] = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{len(slots)}."
        if i not in skipped:
            src = f"model.layers.{i}."
            qkv, gate_up = base[src + "self_attn.qkv_proj.weight"], base[src + "mlp.gate_up_proj.weight"]
            out.update({p + "input_layernorm.weight": base[src + "input_layernorm.weight"],
                        p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
                        p + "self_attn.v_proj.weight": qkv[q + kv:],
                        p + "self_attn.o_proj.weight": base[src + "self_attn.o_proj.weight"],
                        p + "post_attention_layernorm.weight": base[src + "post_attention_layernorm.weight"],
                        **_ffn(p, gate_up, base[src + "mlp.down_proj.weight"])})
            slots.append(Slot(i, False, cfg.intermediate_size))
        elif i in bypasses:
            byp = bypasses[i]
            w = byp.up.weight.detach().float() @ byp.down.weight.detach().float()  # [H, H], rounded once
            out.update({p + "input_layernorm.weight": byp.norm.weight.detach(),
                        p + "self_attn.linear_attn.weight": w.to(byp.up.weight.dtype)})
            if byp.mlp is not None:
                out[p + "post_attention_layernorm.weight"] = byp.mlp_norm.weight.detach()
                out.update(_ffn(p, byp.mlp.gate_up_proj.weight.detach(), byp.mlp.down_proj.weight.detach()))
                slots.append(Slot(i, True, byp.mlp.down_proj.weight.shape[1]))
            else:
                H, like = cfg.hidden_size, byp.norm.weight
                out[p + "post_attention_layernorm.weight"] = torch.ones_like(like)
                out.update(_ffn(p, like.new_zeros(2 * ZERO_FFN, H), like.new_zeros(H, ZERO_FFN)))
                slots.append(Slot(i, True, ZERO_FFN))
    if len(slots) == 0:
        raise UserError(f"skip {sorted(skipped)} removes every layer; keep at least one")
    out["model.norm.weight"] = base["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = base["lm_head.weight"]
    return out, slots


def _ffn(prefix: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    m = gate_up.shape[0] // 2
    return {prefix + "mlp.gate_proj.weight": gate_up[:m], prefix + "mlp.up_proj.weight": gate_up[m:],
            prefix + "mlp.down_proj.weight": down}


def config_dict(config: Phi3Config, slots: Sequence[Slot], dtype: str) -> dict[str, Any]:
    """config.json in the Nemotron-NAS layout: per-block `block_configs` (attention: a grouped-query attention,
    or `replace_with_linear`; ffn: its `intermediate_size`)."""
    c = config
    group = c.num_attention_heads // c.num_key_value_heads
    blocks = [{"attention": {"no_op": False, "replace_with_linear": s.bypass,
                             "n_heads_in_group": None if s.bypass else group},
               "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": s.ffn}} for s in slots]
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hidden_size": c.hidden_size,
            "num_hidden_layers": len(slots), "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.hd, "intermediate_size": c.intermediate_size,
            "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
            "max_position_embeddings": context_length(c), "vocab_size": c.vocab_size,
            "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "torch_dtype": dtype, "block_configs": blocks,
            "phi3skip": {"layers": [s.layer for s in slots], "bypass": [s.layer for s in slots if s.bypass]}}


__all__ = ["Slot", "bypassed", "check", "context_length", "export_state", "config_dict", "ZERO_FFN"]
