"""Rotary position tables: plain RoPE, LongRoPE (short/long factors, attention factor), partial rotary."""
from __future__ import annotations

import torch
from torch import nn

from .config import Phi3Config


class Rotary(nn.Module):
    """cos/sin for given positions, computed exactly as transformers' Phi-3 does (fp32, then cast).

    LongRoPE picks its factor list per forward call: long when max(position) + 1 > original_max_position_embeddings.
    """

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.scaling = config.attention_factor
        self.original_max = config.original_max_position_embeddings
        self.has_long = config.rope_scaling is not None
        short, long = self._inv_freqs()
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("inv_freq_short", short, persistent=False)
        self.register_buffer("inv_freq_long", long, persistent=False)

    def _inv_freqs(self) -> tuple[torch.Tensor, torch.Tensor]:
        d, rs = self.config.rotary_dim, self.config.rope_scaling
        base = self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
        short = torch.tensor(rs.short_factor, dtype=torch.float32) if rs else torch.ones(d // 2)
        long = torch.tensor(rs.long_factor, dtype=torch.float32) if rs else torch.ones(d // 2)
        return 1.0 / (short * base), 1.0 / (long * base)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the frequencies; transformers' tables stay fp32, so must ours.
        super()._apply(fn, recurse)
        dev = self.inv_freq_short.device
        if self.inv_freq_short.dtype != torch.float32 and dev.type != "meta":
            short, long = self._inv_freqs()
            self.inv_freq_short, self.inv_freq_long = short.to(dev), long.to(dev)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the tables in place (after `to_empty` from the meta device)."""
        short, long = self._inv_freqs()
        self.inv_freq_short.copy_(short)
        self.inv_freq_long.copy_(long)

    def use_long(self, max_pos: int) -> bool:
        """Whether a call whose largest position is `max_pos` uses the long factors."""
        return self.has_long and max_pos + 1 > self.original_max

    def forward(self, pos: torch.Tensor, dtype: torch.dtype, long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [T] or [B, T] integer positions -> cos, sin of shape [1 or B, 1, T, rotary_dim] in `dtype`."""
        inv_freq = self.inv_freq_long if long else self.inv_freq_short
        freqs = pos.float()[..., None] * inv_freq  # elementwise, not matmul: bit-equal to transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scaling, emb.sin() * self.scaling
        if pos.dim() == 1:
            cos, sin = cos[None], sin[None]
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [B, H, T, hd] (rotate-half form); the rest pass through."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
