"""Weight-only quantization for decoding: int8 (one scale per output channel) and int4 (blocks of 32 input channels
with a scale and an offset each, llama.cpp q4_1's blocks), for every Linear: the blocks', the lm_head and the bypasses'. Activations stay
in the model's dtype: one scale per token broke this model's massive activations (3.3x the perplexity with torch's
dynamic int8 Linear), so only the weights are rounded.

    model = phi3skip.from_pretrained(folder, dtype=torch.float32, quantize="int8")   # quantized as read
    quantize_model(model, "int4")                                                   # or a model in memory

Skip sets are untouched: any set runs, chosen per call. On the CPU, few-row products (decode and verify steps)
run the kernels of `kernels.py`; more rows (a prefill, an evaluation) and other devices run a plain matrix product
of the dequantized weight (int8 as gpt-fast writes it, `F.linear(x, q.to(x.dtype)) * scale`, which torch.compile
fuses into one kernel on CUDA). A tied embedding shares the lm_head's quantized matrix (a row looked up is
dequantized), so the model holds one copy of it, as llama.cpp's q8_0 does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import GROUP

MODES = ("int8", "int4")


# Quantizers: fp weights [N, K] -> (q, scale) ------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q in [-127, 127], w ~ q * scale[:, None]."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, refits: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of 32 input channels, 4-bit codes c in 0..15 standing for c * scale + offset (fp16 scale and offset a
    block: llama.cpp's q4_1 block, whose nibbles are packed as here: byte j of a block holds value j in its low
    nibble and value j + 16 in its high one) -> (uint8 [N, K/2], fp16 scale [N, K/32], fp16 offset [N, K/32]).

    The block's range [min, max] sets scale and offset, rounded to fp16 before the codes are chosen. `refits` > 0
    adds rounds of least squares for scale and offset given the codes, each kept where it lowers the block's
    squared error: on the demo's student two rounds cut the weight error 11% but raised perplexity (stdlib 10.7185
    -> 10.7264, prose 16.7957 -> 17.0251; the extremes they clip matter more than the mean error), so none by
    default. An offset, not q4_0's symmetric codes: the symmetric form's weight error was 8.5x larger here (the
    embedding's rows are not centred) and its perplexity +34% against fp32 on code (docs/benchmarks.md).
    """
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"int4 needs input widths that are multiples of {GROUP}, got {K}")
    x = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale, offset = _half((hi - lo) / 15), _half(lo)
    codes = _codes(x, scale, offset)
    for _ in range(refits):
        cm, xm = codes.mean(-1, keepdim=True), x.mean(-1, keepdim=True)
        var = ((codes - cm) ** 2).sum(-1, keepdim=True)
        fit = torch.where(var > 0, ((codes - cm) * (x - xm)).sum(-1, keepdim=True) / var.clamp(min=1e-30), scale)
        fit = _half(fit)
        off = _half(xm - fit * cm)
        new = _codes(x, fit, off)
        better = _sq_error(x, new, fit, off) < _sq_error(x, codes, scale, offset)
        scale, offset, codes = (torch.where(better, a, b) for a, b in ((fit, scale), (off, offset), (new, codes)))
    c = codes.to(torch.uint8)
    packed = c[..., :GROUP // 2] | (c[..., GROUP // 2:] << 4)
    return (packed.reshape(N, K // 2).contiguous(), scale.squeeze(-1).half().contiguous(),
            offset.squeeze(-1).half().contiguous())


def _half(t: torch.Tensor) -> torch.Tensor:
    """Rounded to fp16 (what is stored), back in fp32 for the arithmetic."""
    return t.clamp(-65504, 65504).half().float()


def _codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    return torch.round((x - offset) / safe).clamp_(0, 15)


def _sq_error(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return ((x - codes * scale - offset) ** 2).sum(-1, keepdim=True)


def dequantize(mode: str, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the codes stand for, [N, K] in dtype (rows of an embedding: q, scale, offset indexed alike)."""
    if mode == "int8":
        return (q.to(torch.float32) * scale[..., None]).to(dtype)
    lo, hi = (q & 15), (q >> 4)
    codes = torch.cat([lo.unflatten(-1, (-1, GROUP // 2)), hi.unflatten(-1, (-1, GROUP // 2))], dim=-1)
    return (codes.to(torch.float32) * scale.float()[..., None] + offset.float()[..., None]).flatten(-2).to(dtype)


def mode_for(mode: str, in_features: int) -> str:
    """The mode a Linear of this input width gets: int4 needs whole blocks of 32, a narrower or odd width (a small
    bypass's rank) stays int8, as llama.cpp falls back to another type for rows that are not whole blocks."""
    return "int8" if mode == "int4" and in_features % GROUP else mode


ROW_CHUNK = 4096  # rows quantized at a time: the temporaries of a 49k-row embedding would be 3x its fp32 size


def quantize_weight(mode: str, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(codes, scales) of a weight [N, K] in `mode`, (codes, scales, offsets) for int4; int8 where int4 cannot hold
    its width (`mode_for`)."""
    mode = mode_for(mode, w.shape[1])
    w = w.contiguous()  # a column-major weight (the Generator's CPU layout) gives row-major codes all the same
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}: one of {', '.join(MODES)}")
    fn = quantize_int8 if mode == "int8" else quantize_int4
    parts = [fn(w[i:i + ROW_CHUNK]) for i in range(0, w.shape[0], ROW_CHUNK)]  # rows are quantized independently
    return tuple(torch.cat(p) for p in zip(*parts)) if len(parts) > 1 else parts[0]


# Modules -------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A bias-free Linear whose weight is stored quantized: buffers `weight` (int8 [N, K], or uint8 [N, K/2] for
    int4), `scale` (fp32 [N], or fp16 [N, K/32]) and, for int4, `offset` (fp16 [N, K/32]). Its output is in x's
    dtype."""

    def __init__(self, in_features: int, out_features: int, mode: str, device: torch.device | str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantization {mode!r}: one of {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        int8 = mode == "int8"
        self.register_buffer("weight", torch.empty(out_features, in_features if int8 else in_features // 2,
                                                   dtype=torch.int8 if int8 else torch.uint8, device=device))
        if int8:
            self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
            self.offset = None
        else:
            blocks = (out_features, in_features // GROUP)
            self.register_buffer("scale", torch.empty(blocks, dtype=torch.float16, device=device))
            self.register_buffer("offset", torch.empty(blocks, dtype=torch.float16, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor, mode: str) -> "QuantLinear":
        mode = mode_for(mode, w.shape[1])
        m = cls(w.shape[1], w.shape[0], mode, device="meta")
        m.load_packed(quantize_weight(mode, w.detach()))
        return m

    def load_packed(self, packed: tuple[torch.Tensor, ...]) -> None:
        """Take `quantize_weight`'s tensors as the buffers."""
        self.weight, self.scale = packed[0], packed[1]
        if self.mode == "int4":
            self.offset = packed[2]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.mode, self.weight, self.scale, self.offset, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x):
            if self.mode == "int8":
                return kernels.linear_q8(x, self.weight, self.scale)
            return kernels.linear_q4(x, self.weight, self.scale, self.offset)
        if self.mode == "int8":  # gpt-fast's form: the scale applied to the product, not to the weight
            return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class QuantEmbedding(nn.Module):
    """A tied embedding looked up in the lm_head's quantized matrix (no state of its own: the head's buffers are the
    only copy). A looked-up row is dequantized into `dtype`."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: its buffers are saved and moved once, as the lm_head's
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:  # what code that reads the embedding's size or device sees
        return self.head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head
        return dequantize(h.mode, h.weight[ids], h.scale[ids], None if h.offset is None else h.offset[ids], self.dtype)


class KernelLinear(nn.Linear):
    """An nn.Linear (same parameter, same state dict) whose few-row, no-grad products on the CPU run the fp32 kernel:
    what `Generator(..., kernels=True)` makes of the model's Linears (`use_kernels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is None and w.is_contiguous() and kernels.usable(x) and not (torch.is_grad_enabled() and
                                                                                  w.requires_grad):
            return kernels.linear_f32(x, w)
        return F.linear(x, w, self.bias)


def _children(module: nn.Module):
    for parent in module.modules():
        for name, child in parent.named_children():
            yield parent, name, child


def use_kernels(module: nn.Module) -> int:
    """Make every plain nn.Linear of `module` a `KernelLinear` in place (its class only: weights, names, training
    unchanged); returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = KernelLinear
            n += 1
    return n


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Linear of `model` (and its children: a Phi3ForCausalLM, a bypass) by a QuantLinear, in place.

    A Phi3ForCausalLM with tied embeddings gets a `QuantEmbedding` sharing the quantized lm_head. Bypasses with
    per-depth deltas stay in their dtype (their weights are sums made per skip set: a Generator quantizes the merged
    ones). Sets `model.quantization`. On the meta device only the modules' shapes change (for loading).
    """
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}: one of {', '.join(MODES)}")
    adapters = getattr(model, "skip_adapters", None)
    keep = {id(m) for m in adapters.modules()} if adapters is not None and adapters.depth_rank else set()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embed_dtype = dtype or (model.model.embed_tokens.weight.dtype if tied else None)
    for parent, name, child in list(_children(model)):
        if isinstance(child, nn.Linear) and id(child) not in keep:
            if child.bias is not None:
                raise ValueError(f"{name}: quantized Linears have no bias")
            m = mode_for(mode, child.in_features)
            if child.weight.is_meta:
                q = QuantLinear(child.in_features, child.out_features, m, device="meta")
            else:
                q = QuantLinear.from_weight(child.weight, m)
            setattr(parent, name, q)
    if tied:
        model.model.embed_tokens = QuantEmbedding(model.lm_head, embed_dtype)
    kernels.available()  # built (or found unbuildable) now, before any forward, compiled or not, asks
    model.quantization = mode
    return model


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights a forward reads: quantized codes and scales, other parameters (norms, embeddings)."""
    seen, n = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen and not t.is_meta:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


__all__ = ["MODES", "mode_for", "QuantLinear", "QuantEmbedding", "KernelLinear", "quantize_model", "quantize_weight",
           "quantize_int8", "quantize_int4", "dequantize", "use_kernels", "weight_bytes"]
