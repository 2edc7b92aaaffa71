"""The Phi-3 decoder, with skip gates in its block loop.

Module and parameter names are those of transformers' `Phi3ForCausalLM`, so Hub state dicts load as they are.
`model(input_ids, skip=(30, 28))` runs every block except 30 and 28: a skipped block costs no compute and,
with a cache, no KV memory.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Phi3Config
from .kv_cache import KVCache, LayerKV
from .rope import Rotary, apply_rotary
from .skipsets import SkipSet

try:  # optional: used on CUDA for cache-free causal attention (training, evaluation)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order transformers uses (it matters in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def attention_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, window: int | None,
                   key_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean [B|1, 1, Tq, Tk]: key j is visible to query i iff j <= i and j > i - window, and key_mask[j].

    A query always sees its own slot, so a padding row never becomes all-masked (which gives NaNs in SDPA).
    """
    qi, kj = q_slots[:, None], k_slots[None, :]
    ok = kj <= qi
    if window is not None:
        ok = ok & (kj > qi - window)
    ok = ok[None, None]
    if key_mask is not None:
        ok = (ok & key_mask[:, None, None, :]) | (kj == qi)[None, None]
    return ok


SMALL_ATTENTION = 8  # queries up to which CPU attention over a cache runs `small_attention`


def small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention of a few queries (a decode or verify step) in plain products, grouped-query heads
    sharing their key/value head by a reshape (no copy). SDPA's CPU kernel spends ~0.1 ms of fixed cost a call on a
    one-token query, more than the products themselves on a small model. q [B, H, T, D], k, v [B, Hk, S, D],
    mask [B|1, 1, T, S] (True: visible)."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    scores = (q.reshape(B, Hk, g * T, D) @ k.transpose(-1, -2)).view(B, Hk, g, T, S) * D ** -0.5
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).view(B, Hk, g * T, S)
    return (p @ v).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.hd
        self.window = config.sliding_window
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                cache: LayerKV | None, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = apply_rotary(q.view(B, T, self.n_head, self.hd).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(B, T, self.n_kv, self.hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if cache is None and key_mask is None:
            y = self._causal(q, k, v)
        else:
            k_slots = slots
            if cache is not None:
                k, v = cache.update(slots, k, v)
                k_slots = torch.arange(k.shape[2], device=x.device)
            if key_mask is not None and key_mask.dim() == 4:  # the step's whole mask, made once for every layer
                mask = key_mask
            else:
                mask = attention_mask(slots, k_slots, self.window, key_mask)
            if T <= SMALL_ATTENTION and not x.is_cuda:
                y = small_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cache-free causal attention over consecutive slots (training, evaluation, prefill without cache)."""
        T, W = q.shape[2], self.window
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # flash-attn's window (left, right) admits left+1 keys; Phi-3's window counts the query: W - 1.
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                window_size=(W - 1, 0) if W is not None else (-1, -1))
            return y.transpose(1, 2)
        gqa = self.n_kv != self.n_head
        if W is None or T <= W:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        slots = torch.arange(T, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(slots, slots, W, None),
                                              enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # `swiglu` through the modules (they may be quantized)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP on given weights (gate and up fused in one [2m, H] matrix): `MLP` and a skip bypass's MLP."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(up * F.silu(gate), down)


class Block(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                cache: LayerKV | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, cache, key_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3ForCausalLM(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self.skip_adapters: nn.Module | None = None  # set by phi3skip.model.bypass.attach (skip-mode parameters)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):  # not quantized
            self.lm_head.weight = self.model.embed_tokens.weight

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain Phi3ForCausalLM state dict: without skip adapters (they are saved in their own file)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("skip_adapters.")}

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def hidden_states(self, input_ids: torch.Tensor, skip: Iterable[int] | None = (), *,
                      input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                      long_rope: bool | None = None, blocks: Sequence[Callable[..., torch.Tensor]] | None = None,
                      bypasses: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, H] (the distillation loss projects them in chunks).

        input_pos: [T] slots of these tokens in the sequence and the cache (default 0..T-1).
        positions: [T] or [B, T] rotary positions when they differ from the slots (left-padded batches).
        key_mask:  [B, S] False at padding slots, which no query may attend to.
        long_rope: LongRoPE factor choice; None decides from the largest position, as transformers does.
        blocks:    callables run in place of `self.model.layers` (same signature and order), e.g. the layers
                   wrapped by torch.compile for decoding; None runs the layers themselves.
        bypasses:  what runs in skipped slots, {layer: callable}, e.g. a Generator's merged bypasses of its skip
                   set; None: the skip adapters' for this set (`SkipAdapters.for_skip`).
        """
        skipped = SkipSet.of(skip, self.num_layers)
        if input_pos is None:
            input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        pos = input_pos if positions is None else positions
        if long_rope is None and (cache is not None or positions is not None):
            long_rope = self.rotary.use_long(int(pos.max()))  # else the prologue's T - 1: no device sync
        x, cos, sin = self._prologue(input_ids, pos, long_rope)
        if cache is not None:  # one mask for every layer's attention over the cache (they share slots and window)
            key_slots = torch.arange(cache.max_len, device=input_ids.device)
            key_mask = attention_mask(input_pos, key_slots, self.config.sliding_window, key_mask)
        x = self.run_layers(x, cos, sin, input_pos, skipped, cache=cache, key_mask=key_mask, blocks=blocks,
                            bypasses=bypasses)
        return self.model.norm(x)

    def forward_branches(self, input_ids: torch.Tensor, skips: Sequence[Iterable[int]]) -> list[torch.Tensor]:
        """Final normed hidden states [B, T, H] for several skip sets in one pass (consecutive positions).

        Sets that agree on every slot so far (`slot`) share one activation: the blocks before the first layer where
        two sets differ run once for both, and autograd sums the gradients of the branches. Equal, up to float
        rounding, to `[self.hidden_states(input_ids, s) for s in skips]`.
        """
        sets = [SkipSet.of(s, self.num_layers) for s in skips]
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        x, cos, sin = self._prologue(input_ids, slots)
        groups: list[tuple[torch.Tensor, list[int]]] = [(x, list(range(len(sets))))]  # (residual, its sets)
        for i in range(self.num_layers):  # breadth first: each block runs for every group before the next
            split = []
            for h, members in groups:
                kinds = {j: self.slot(i, sets[j]) for j in members}
                for kind in sorted(set(kinds.values())):  # the block first, then a skip (a bypass by depth)
                    side = [j for j in members if kinds[j] == kind]  # layer i computes the same for these sets
                    split.append((self.run_layers(h, cos, sin, slots, sets[side[0]], start=i, stop=i + 1), side))
            groups = split
        out: list[torch.Tensor] = [x] * len(sets)
        for h, members in groups:
            h = self.model.norm(h)
            for j in members:
                out[j] = h
        return out

    def slot(self, i: int, skipped: SkipSet) -> int:
        """What layer i's slot computes under a skip set: -1 its block, 0 nothing or a bypass every set shares,
        k > 0 a bypass at depth k (per-depth deltas, phi3skip.model.bypass). Sets with equal slots below a layer reach it
        with the same residual stream."""
        if i not in skipped:
            return -1
        adapters = self.skip_adapters
        return adapters.variant(skipped) if adapters is not None and i in adapters else 0

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   skipped: SkipSet, *, start: int = 0, stop: int | None = None,
                   cache: KVCache | None = None,
                   key_mask: torch.Tensor | None = None, blocks: Sequence[Callable[..., torch.Tensor]] | None = None,
                   trace: list[torch.Tensor] | None = None,
                   bypasses: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> torch.Tensor:
        """The block loop over layers `start` to `stop` (default: the last), `x` being the residual stream entering
        layer `start`: the skip gates.

        A skipped layer costs no compute and no cache; when the model carries skip adapters trained for this
        skip set, the skipped slot runs their small bypass instead (`bypasses`, when given: see `hidden_states`).
        `trace` collects the residual entering each layer (and the last block's output).
        """
        bypass = bypasses
        if bypass is None and self.skip_adapters is not None and skipped:
            bypass = self.skip_adapters.for_skip(skipped)
        layers = self.model.layers if blocks is None else blocks
        for i in range(start, len(layers) if stop is None else stop):
            if trace is not None:
                trace.append(x)
            if i in skipped:  # the skip gate: no attention, no MLP, no cache
                if bypass is not None and i in bypass:
                    x = bypass[i](x)
                continue
            layer_cache = None
            if cache is not None:
                if i not in cache:
                    raise ValueError(f"layer {i} runs but the KV cache has no entry for it")
                layer_cache = cache[i]
            x = layers[i](x, cos, sin, slots, layer_cache, key_mask)
        if trace is not None:
            trace.append(x)
        return x

    def residuals(self, input_ids: torch.Tensor, skip: Iterable[int] | None = ()) -> list[torch.Tensor]:
        """The residual stream entering every layer, then the last block's output (L + 1 tensors [B, T, H]),
        of the model skipping `skip`, over consecutive positions: what `hidden_from` restarts from. Entry i
        depends only on the slots below i, so it serves any skip set whose slots there are `skip`'s (`slot`)."""
        trace: list[torch.Tensor] = []
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        x, cos, sin = self._prologue(input_ids, slots)
        self.run_layers(x, cos, sin, slots, SkipSet.of(skip, self.num_layers), trace=trace)
        return trace

    def hidden_from(self, start: int, x: torch.Tensor, skip: Iterable[int] | None = (),
                    trace: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final normed hidden states of the model skipping `skip`, restarted at layer `start` from the residual
        `x` entering it (no cache, consecutive positions): the layers below `start` must run unchanged. `trace`
        collects the residual entering each layer from `start` on, then the last block's output."""
        skipped = SkipSet.of(skip, self.num_layers)
        if any(i < start for i in skipped):
            raise ValueError(f"skip {sorted(skipped)} names layers below the restart layer {start}")
        slots = torch.arange(x.shape[1], device=x.device)
        cos, sin = self.rotary_tables(slots, x.dtype)
        return self.model.norm(self.run_layers(x, cos, sin, slots, skipped, start=start, trace=trace))

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype, long_rope: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at `positions`; LongRoPE's factor, unless given, chosen from position T - 1 (right for
        consecutive positions from 0, and no device sync)."""
        if long_rope is None:
            long_rope = self.rotary.use_long(positions.shape[-1] - 1)
        return self.rotary(positions, dtype, long_rope)

    def _prologue(self, input_ids: torch.Tensor, positions: torch.Tensor, long_rope: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every forward starts with: the token embeddings and the rotary tables at `positions`."""
        x = self.model.embed_tokens(input_ids)
        return (x, *self.rotary_tables(positions, x.dtype, long_rope))

    def forward(self, input_ids: torch.Tensor, skip: Iterable[int] | None = (), **kw) -> torch.Tensor:
        """Logits [B, T, V]; keyword arguments as for `hidden_states`."""
        return self.lm_head(self.hidden_states(input_ids, skip, **kw))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init (for models built on the meta device and materialised with `to_empty`)."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        self.rotary.reset_buffers()
        self.tie_weights()
