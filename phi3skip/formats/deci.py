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


ATTENTION = ("gqa", "linear", "no_op")  # a block's own attention; a bypass's map; none (attention dropped)
FFN_MULTIPLE = 256  # every Nemotron-NAS reader rounds int(2 ffn_mult H / 3) up to a multiple of this


@dataclass(frozen=True)
class Slot:
    """One block of the exported model: the student's `layer`, run as itself or as its bypass."""
    layer: int
    attention: str  # one of ATTENTION
    ffn: int  # FFN channels (intermediate size) as the student has them

    @property
    def bypass(self) -> bool:
        return self.attention != "gqa"


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
            slots.append(Slot(i, "gqa", cfg.intermediate_size))
        elif i in bypasses:
            byp = bypasses[i]
            if byp.down is not None:
                w = byp.up.weight.detach().float() @ byp.down.weight.detach().float()  # [H, H], rounded once
                out.update({p + "input_layernorm.weight": byp.norm.weight.detach(),
                            p + "self_attn.linear_attn.weight": w.to(byp.up.weight.dtype)})
            if byp.mlp is not None:
                out[p + "post_attention_layernorm.weight"] = byp.mlp_norm.weight.detach()
                out.update(_ffn(p, byp.mlp.gate_up_proj.weight.detach(), byp.mlp.down_proj.weight.detach()))
                slots.append(Slot(i, "linear" if byp.down is not None else "no_op", byp.mlp.down_proj.weight.shape[1]))
            else:
                H, like = cfg.hidden_size, byp.norm.weight
                out[p + "post_attention_layernorm.weight"] = torch.ones_like(like)
                out.update(_ffn(p, like.new_zeros(2 * ZERO_FFN, H), like.new_zeros(H, ZERO_FFN)))
                slots.append(Slot(i, "linear", ZERO_FFN))
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


def engines(slots: Sequence[Slot]) -> str:
    """Who computes a heterogeneous-block export (read in the engines' sources; llama.cpp, its converter and mlx-lm
    run in the tests): blocks whose attention is dropped are in every Nemotron-NAS reader; a linear map is not in
    vLLM's or SGLang's."""
    if any(s.attention == "linear" for s in slots):
        return ("llama.cpp and Ollama (the GGUF, `deci` architecture; or this folder through llama.cpp's own "
                "converter); mlx-lm (this folder, its linear-attention weights renamed `self_attn.linear`); "
                "TensorRT-LLM reads the layout (not run here); not vLLM nor SGLang (their nemotron_nas has no "
                "linear-attention block), nor transformers (no DeciLM of its own)")
    return ("vLLM, SGLang and TensorRT-LLM (this folder: nemotron_nas, attention-free blocks); llama.cpp and Ollama "
            "(the GGUF, `deci` architecture; or this folder through llama.cpp's own converter); mlx-lm (this folder); "
            "not transformers (no DeciLM of its own)")


def padded(width: int) -> int:
    """An FFN's width as Nemotron-NAS readers compute it: rounded up to a multiple of FFN_MULTIPLE."""
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def ffn_mult(width: int, hidden: int) -> float:
    """The `ffn_mult` whose reading by every Nemotron-NAS reader (intermediate = int(2 ffn_mult H / 3) rounded up to
    a multiple of 256; mlx-lm rounds ffn_mult to 6 decimals first) is `padded(width)`: the plain 3 P / 2 H when
    that reads back exactly, else the middle of the interval that rounds up to P."""
    target = padded(width)
    read = lambda m: padded(int(2 * m * hidden / 3))  # noqa: E731
    for m in (3 * target / (2 * hidden), 3 * (target - FFN_MULTIPLE / 2) / (2 * hidden)):
        if read(m) == target and read(round(m, 6)) == target:
            return round(m, 6)
    raise ValueError(f"no ffn_mult reads back as {target} channels at hidden size {hidden}")


def nvidia_state(state: dict[str, torch.Tensor], slots: Sequence[Slot]) -> dict[str, torch.Tensor]:
    """`export_state`'s tensors as NVIDIA's checkpoints hold them: each FFN zero-padded to `padded` channels (zero
    rows of gate and up, zero columns of down: silu(0) * 0 adds exactly nothing, so the function is the same)."""
    out = dict(state)
    for n, s in enumerate(slots):
        extra = padded(s.ffn) - s.ffn
        if not extra:
            continue
        p = f"model.layers.{n}.mlp."
        for name in ("gate_proj.weight", "up_proj.weight"):
            t = out[p + name]
            out[p + name] = torch.cat([t, t.new_zeros(extra, t.shape[1])])
        t = out[p + "down_proj.weight"]
        out[p + "down_proj.weight"] = torch.cat([t, t.new_zeros(t.shape[0], extra)], 1)
    return out


def padding_cost(slots: Sequence[Slot], hidden: int) -> tuple[int, int]:
    """(FFN weights as the student has them, FFN weights after the padding), over every block."""
    return (sum(3 * s.ffn * hidden for s in slots), sum(3 * padded(s.ffn) * hidden for s in slots))


def config_dict(config: Phi3Config, slots: Sequence[Slot], dtype: str) -> dict[str, Any]:
    """config.json in NVIDIA's Nemotron-NAS layout: per-block `block_configs`, attention a grouped-query attention
    (`n_heads_in_group`), `replace_with_linear` (a bypass's map) or `no_op` (dropped); FFN by `ffn_mult`, which
    every reader turns into the padded width (`nvidia_state`)."""
    c = config
    group = c.num_attention_heads // c.num_key_value_heads

    def attention(s: Slot) -> dict[str, Any]:
        return {"no_op": s.attention == "no_op", "replace_with_linear": s.attention == "linear",
                "n_heads_in_group": group if s.attention == "gqa" else None}

    blocks = [{"attention": attention(s),
               "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult(s.ffn, c.hidden_size)}}
              for s in slots]
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hidden_size": c.hidden_size,
            "num_hidden_layers": len(slots), "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.hd, "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
            "max_position_embeddings": context_length(c), "vocab_size": c.vocab_size,
            "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "torch_dtype": dtype, "block_configs": blocks,
            "phi3skip": {"layers": [s.layer for s in slots], "bypass": [s.layer for s in slots if s.bypass],
                         "attention_dropped": [s.layer for s in slots if s.attention == "no_op"],
                         "ffn_channels": [s.ffn for s in slots]}}


__all__ = ["Slot", "ATTENTION", "bypassed", "check", "context_length", "export_state", "config_dict",
           "nvidia_state", "padded", "ffn_mult", "padding_cost", "engines", "ZERO_FFN", "FFN_MULTIPLE"]
