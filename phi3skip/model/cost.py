"""Per-token decode cost of a skip set: multiply-adds and bytes read, from the config and the bypasses' shape.

Recipes differ in what a skipped slot still runs (a small bypass, the whole MLP with only attention dropped, or
nothing), so their quality is compared at equal cost on this axis. One decode step of batch 1 at `context`:

    multiply-adds  every weight matmul that runs (q/k/v/o and the MLP of each running block, each skipped slot's
                   bypass: its rank-r map and m MLP channels, the lm_head) + attention's q.k and p.v over the
                   keys each running block attends (the context, capped by a sliding window)
    bytes read     those weights and the norms' (at `dtype_bytes` each) + each running block's keys and values
                   over the same keys (at `kv_dtype_bytes`); a skipped slot has no KV cache

The embedding is a row lookup (no multiply-adds; its one row is not counted), as in llamacpp.weight_macs; the
elementwise work (norms, RoPE, softmax, SwiGLU's product) is left out. Pure integer arithmetic: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping

from .config import Phi3Config
from .skipsets import validate_skip

DEFAULT_CONTEXT = 1024
Bytes = int | Fraction  # a quantized type's bytes per weight need not be whole (q8_0: 34/32)


@dataclass(frozen=True)
class BypassShape:
    """What a skipped slot of `layers` runs instead of its block (phi3skip.model.bypass): a rank-r linear map on its
    own norm (none when r = 0: attention dropped), then a SwiGLU MLP of m channels on another (none when m = 0)."""

    rank: int
    mlp: int
    layers: frozenset[int]

    @classmethod
    def from_description(cls, d: Mapping[str, Any] | None) -> "BypassShape | None":
        """From skip.json's "adapters" entry (= SkipAdapters.describe()); None when there is none."""
        if not d:
            return None
        if d.get("kind", "bypass") != "bypass":
            raise ValueError(f"skip adapters of kind {d.get('kind')!r}: the cost model knows only 'bypass'")
        return cls(int(d["rank"]), int(d.get("mlp") or 0), frozenset(int(i) for i in d["layers"]))

    def weights(self, hidden: int) -> int:
        """Matrix weights, = multiply-adds per token: (2 r + 3 m) H."""
        return (2 * self.rank + 3 * self.mlp) * hidden

    def norm_weights(self, hidden: int) -> int:
        return hidden * ((1 if self.rank else 0) + (1 if self.mlp else 0))


@dataclass(frozen=True)
class CostFraction:
    """A skip set's cost as a fraction of the full model's (exact)."""

    macs: Fraction
    bytes: Fraction


@dataclass(frozen=True)
class TokenCost:
    weight_macs: int  # = matrix weights read
    attention_macs: int  # q.k and p.v
    weight_bytes: Bytes  # matrices and norms
    kv_bytes: Bytes

    @property
    def macs(self) -> int:
        return self.weight_macs + self.attention_macs

    @property
    def bytes(self) -> Bytes:
        return self.weight_bytes + self.kv_bytes

    def fraction_of(self, full: "TokenCost") -> CostFraction:
        return CostFraction(Fraction(self.macs, full.macs), Fraction(self.bytes) / Fraction(full.bytes))


# The pieces, per token ---------------------------------------------------------------------------------------
def attention_weights(cfg: Phi3Config) -> int:
    return (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.hd * cfg.hidden_size  # qkv + o


def block_weights(cfg: Phi3Config) -> int:
    """A decoder block's matrix weights (= its weight multiply-adds per token)."""
    return attention_weights(cfg) + 3 * cfg.hidden_size * cfg.intermediate_size


def head_weights(cfg: Phi3Config) -> int:
    """The lm_head (tied or not: a tied one is the embedding table, read whole here)."""
    return cfg.vocab_size * cfg.hidden_size


def attended_keys(cfg: Phi3Config, context: int) -> int:
    """Keys one query attends at this context (Phi-3's window counts the query itself)."""
    return context if cfg.sliding_window is None else min(context, cfg.sliding_window)


def attention_macs(cfg: Phi3Config, keys: int) -> int:
    """One block's q.k and p.v for one query over `keys` keys (every query head; GQA shares k/v, not work)."""
    return 2 * cfg.num_attention_heads * cfg.hd * keys


def kv_bytes(cfg: Phi3Config, layers: int, keys: int, dtype_bytes: Bytes) -> Bytes:
    """KV cache read by `layers` running blocks over `keys` cached positions each."""
    return 2 * layers * cfg.num_key_value_heads * cfg.hd * keys * dtype_bytes


# A skip set ---------------------------------------------------------------------------------------------------
def token_cost(cfg: Phi3Config, skip: Iterable[int] = (), bypass: BypassShape | None = None,
               context: int = DEFAULT_CONTEXT, dtype_bytes: Bytes = 2, kv_dtype_bytes: Bytes | None = None
               ) -> TokenCost:
    """Per-token decode cost of the model `cfg` skipping `skip`; each skipped layer in `bypass.layers` runs its
    bypass, any other skipped layer nothing."""
    if context < 1:
        raise ValueError(f"context {context}: must be at least 1 token")
    skipped = validate_skip(skip, cfg.num_hidden_layers)
    H = cfg.hidden_size
    running = cfg.num_hidden_layers - len(skipped)
    bypassed = len(skipped & bypass.layers) if bypass is not None else 0
    slot = bypass.weights(H) if bypassed else 0
    keys = attended_keys(cfg, context)
    weight_macs = running * block_weights(cfg) + bypassed * slot + head_weights(cfg)
    norms = running * 2 * H + (bypassed * bypass.norm_weights(H) if bypassed else 0) + H  # + the final norm
    return TokenCost(weight_macs=weight_macs, attention_macs=running * attention_macs(cfg, keys),
                     weight_bytes=(weight_macs + norms) * dtype_bytes,
                     kv_bytes=kv_bytes(cfg, running, keys, dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes))


def cost_fraction(cfg: Phi3Config, skip: Iterable[int] = (), bypass: BypassShape | None = None,
                  context: int = DEFAULT_CONTEXT, dtype_bytes: Bytes = 2, kv_dtype_bytes: Bytes | None = None
                  ) -> CostFraction:
    """token_cost of the skip set over the full model's (no layer skipped, so no bypass runs)."""
    kw = dict(context=context, dtype_bytes=dtype_bytes, kv_dtype_bytes=kv_dtype_bytes)
    return token_cost(cfg, skip, bypass, **kw).fraction_of(token_cost(cfg, (), None, **kw))


def model_cost(model, skip: Iterable[int] = (), context: int = DEFAULT_CONTEXT) -> TokenCost:
    """token_cost of a loaded Phi3ForCausalLM (its config, its skip adapters, its weights' dtype for both)."""
    adapters = getattr(model, "skip_adapters", None)
    bypass = BypassShape.from_description(adapters.describe()) if adapters is not None else None
    mode = getattr(model, "quantization", None)  # bytes a weight: int8 1 (+ a row's scale), int4 a half + 4 / 32
    size = {"int8": 1, "int4": Fraction(5, 8)}.get(mode, model.lm_head.weight.element_size())
    return token_cost(model.config, skip, bypass, context, size)


__all__ = ["BypassShape", "CostFraction", "TokenCost", "token_cost", "cost_fraction", "model_cost", "kv_bytes",
           "attended_keys", "block_weights", "head_weights", "DEFAULT_CONTEXT"]
