"""Sampling without host synchronisation: transformers' warpers (temperature, top-k, top-p), then a draw.

`draw` takes argmax(p / E) with E ~ Exp(1), a sample of p that the host never waits for; greedy is argmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.cli import UserError


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (top_k and top_p are then ignored). Applied in transformers' order: temperature,
    top-k, top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise UserError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"top-p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Probabilities [..., V] in fp32 after temperature, top-k and top-p (transformers' warpers)."""
    logits = logits.float() / s.temperature
    V = logits.shape[-1]
    if s.top_k is not None and s.top_k < V:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        # Keep the most likely tokens while the mass before them is below top_p (always the first one).
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        before = p.cumsum(-1) - p
        sorted_logits = sorted_logits.masked_fill(before >= s.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(-1)


def draw(weights: torch.Tensor) -> torch.Tensor:
    """Index drawn in proportion to non-negative (not necessarily normalised) weights [..., V], without a host
    synchronisation: argmax(w / E) with E ~ Exp(1)."""
    e = torch.empty_like(weights).exponential_(1).clamp_min_(1e-30)
    return (weights / e).argmax(-1)


def sample(logits: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens [...] from logits [..., V], and the sampling distribution (None when greedy)."""
    if s.greedy:
        return logits.argmax(-1), None
    probs = logits_to_probs(logits, s)
    return draw(probs), probs
