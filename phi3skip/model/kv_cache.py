"""The static, preallocated KV cache. Skipped layers get none: a skip set saves their memory too."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .config import Phi3Config


class LayerKV(nn.Module):
    """One layer's keys and values, [B, n_kv, max_len, hd], written in place at the given slots."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, hd] at `slots` [T]; return the whole cache (masking hides unwritten slots)."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class KVCache(nn.Module):
    """Per-layer caches for the layers that run. `shared` lends another cache's layers (self-speculative
    decoding: layers below the first skipped one compute the same keys in draft and verifier)."""

    def __init__(self, config: Phi3Config, batch: int, max_len: int, layers: Iterable[int],
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 shared: Mapping[int, LayerKV] | None = None):
        super().__init__()
        self.max_len, self.batch = max_len, batch
        shared = shared or {}
        self.layers = nn.ModuleDict({
            str(i): shared[i] if i in shared else
            LayerKV(batch, config.num_key_value_heads, max_len, config.hd, dtype, device)
            for i in sorted(set(layers))
        })

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.layers

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[str(layer)]

    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.layers]

    def reset(self) -> None:
        for kv in self.layers.values():
            kv.k.zero_()
            kv.v.zero_()
