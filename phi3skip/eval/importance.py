"""Per-layer importance: what skipping one layer does to the output, and block influence.

For each layer alone skipped: the KL divergence of the skipped model from the full one (per token, the same
loss the distillation uses) and the perplexity change. Block influence (ShortGPT) is 1 - cos(block input, block
output), averaged over tokens: a block that barely changes its residual stream scores near 0. Layers rank by
KL, least important first: it is zero only for a layer that changes nothing, while a perplexity change can be
negative by chance.

The recommended skip order is conditional (`greedy_order`, as SLEB removes blocks): the first layer is the one
whose removal adds the least KL, each next one the layer whose removal adds the least KL *given those already
removed*. Layers interact (skipping two neighbours costs more than the sum of each alone), so this order beats
the one-at-a-time ranking at every depth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..train.bypass_init import fit_one
from ..train.distill import SkipKL, chunked_kd_loss
from .evaluate import Batch, perplexity


@dataclass
class LayerImportance:
    layer: int
    kl: float  # mean per-token KL(full || this layer skipped)
    ppl_skip: float  # perplexity with this layer alone skipped
    ppl_increase: float  # ppl_skip - full perplexity
    block_influence: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def block_influence(model: nn.Module, batches: Sequence[Batch]) -> list[float]:
    """Mean over tokens of 1 - cos(input, output) of every block, from one full forward per batch."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def hook(i: int):
        def fn(module, args, output):
            cos = F.cosine_similarity(args[0].float(), output.float(), dim=-1)
            sums[i] += (1 - cos).sum().double().cpu()
        return fn

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(layers)]
    try:
        for x, _ in batches:
            model.hidden_states(x.to(model.lm_head.weight.device))
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


@torch.no_grad()
def skip_kl(model: nn.Module, batches: Sequence[Batch], skip: Sequence[int],
            full_hidden: list[torch.Tensor] | None = None) -> float:
    """Mean per-token KL(model || model skipping `skip`) over the batches."""
    w = model.lm_head.weight
    total, count = 0.0, 0
    for j, (x, _) in enumerate(batches):
        x = x.to(w.device)
        hf = full_hidden[j] if full_hidden is not None else model.hidden_states(x)
        _, stats = chunked_kd_loss(hf, w, [model.hidden_states(x, skip)], w, [1.0])
        total += float(stats[0]) * x.numel()
        count += x.numel()
    return total / max(count, 1)


def rank_layers(model: nn.Module, batches: Sequence[Batch], candidates: Sequence[int] | None = None,
                progress=None) -> tuple[float, list[LayerImportance]]:
    """Full perplexity and the candidates (default: every layer) ranked least important first.

    The order is by KL from the full model, ties broken by block influence.
    """
    n = model.config.num_hidden_layers
    candidates = list(range(n)) if candidates is None else list(candidates)
    full = perplexity(model, batches)
    influence = block_influence(model, batches)
    with torch.no_grad():
        hidden = [model.hidden_states(x.to(model.lm_head.weight.device)) for x, _ in batches]
    ranking = []
    for layer in candidates:
        ppl = perplexity(model, batches, skip=(layer,))
        kl = skip_kl(model, batches, (layer,), hidden)
        ranking.append(LayerImportance(layer, kl, ppl, ppl - full, influence[layer]))
        if progress is not None:
            progress(layer)
    ranking.sort(key=lambda r: (r.kl, r.block_influence))
    return full, ranking


def recommended_order(ranking: Sequence[LayerImportance], k: int | None = None) -> list[int]:
    """The first k layers of a ranking (all when k is None): the skip order `train.py --layers auto` uses."""
    order = [r.layer for r in ranking]
    return order if k is None else order[:k]


def format_table(full: float, ranking: Sequence[LayerImportance]) -> str:
    lines = [f"full model perplexity {full:.3f}", "",
             "| rank | layer | KL(full || skipped) | ppl skipping it | increase | block influence |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(ranking, 1):
        lines.append(f"| {i} | {r.layer} | {r.kl:.4f} | {r.ppl_skip:.3f} | {r.ppl_increase:+.3f} | "
                     f"{r.block_influence:.4f} |")
    return "\n".join(lines)


@torch.no_grad()
def greedy_order(model: nn.Module, batches: Sequence[Batch], k: int, candidates: Sequence[int] | None = None,
                 progress=None, bypass_fit: Sequence[torch.Tensor] | None = None,
                 shortlist: int | None = None) -> list[tuple[int, float]]:
    """The first k layers to skip, each chosen given those before it: [(layer, KL of the set so far)].

    Each candidate set S + {c} is scored by its mean per-token KL from the full model (`evaluate.SkipKL`). The
    residual stream of the model skipping S is recorded once per pick; candidate c restarts from it at layer c
    (the layers below c are the same with or without c), so a deep candidate costs only the layers above it.

    shortlist: after the first pick, score only the `shortlist` candidates whose skipping added the least KL
    when last scored (lazy greedy on stale marginal costs: a layer far from cheap given S rarely becomes the
    cheapest given S + {c}); None scores every candidate every time.

    bypass_fit: score each layer as it will be served, replaced by its skip adapter (the model must carry one
    for every candidate, `bypass.attach`), fitted by least squares on these token batches [B, T] given the
    layers already chosen; the chosen layers' bypasses keep their fits. Ranks which layers a linear map
    replaces best, not which matter least. Fit and score on different tokens: scored on its own fitting
    tokens, a bypass's overfit makes a layer look replaceable.
    """
    n = model.config.num_hidden_layers
    candidates = list(range(n)) if candidates is None else list(candidates)
    if not 1 <= k <= len(candidates):
        raise ValueError(f"k must be in 1..{len(candidates)}, got {k}")
    if shortlist is not None and shortlist < 1:
        raise ValueError(f"shortlist must be at least 1, got {shortlist}")
    w = model.lm_head.weight
    score = SkipKL(model, [x for x, _ in batches])
    bypass = bypass_fit is not None
    fit_xs = [x.to(w.device) for x in bypass_fit] if bypass else []
    full: list[list[torch.Tensor]] = []  # the full model's residual streams: the first pick's, nothing skipped
    chosen: list[tuple[int, float]] = []
    skip: list[int] = []
    added: dict[int, float] = {}  # the KL each candidate added to the set it was last scored with
    for _ in range(k):
        traces = [model.residuals(x, skip) for x in score.xs]
        fit_traces = [model.residuals(x, skip) for x in fit_xs]
        full = full or fit_traces
        pool = [c for c in candidates if c not in skip]
        if shortlist is not None and added:
            pool = sorted(pool, key=added.__getitem__)[:shortlist]
        scores: list[tuple[int, float]] = []
        for c in pool:
            if bypass:
                fit_one(model.skip_adapters.bypass[str(c)], model.model.layers[c], [t[c] for t in fit_traces],
                        [f[c + 1] for f in full])
            above = [i for i in skip if i > c] + [c]
            scores.append((c, score(above, c, [t[c] for t in traces])))
        base = chosen[-1][1] if chosen else 0.0
        added.update((c, kl - base) for c, kl in scores)
        best = min(scores, key=lambda s: s[1])
        skip.append(best[0])
        chosen.append(best)
        if progress is not None:
            progress(best)
    return chosen
