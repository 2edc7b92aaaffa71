"""Least-squares initialisation of the skip bypasses (phi3skip.model.bypass), before distillation trains them.

ReplaceMe's idea: the linear map that best replaces a block, by least squares on calibration activations, here
fitted to what the bypass's MLP (the block's most active channels) leaves of the block's update, then checked
by its skip set's KL from the full model (`SkipKL`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.bypass import Bypass
from ..model.model import Phi3ForCausalLM
from ..model.skipsets import SkipSet
from .distill import SkipKL

# Least-squares initialisation -------------------------------------------------------------------------------
# Massive activations: a few residual dimensions carry values 100x the rest (Sun et al., 2024). Near the output a
# block moves them by hundreds, and a linear map that predicts that move imperfectly can wreck the final norm's
# scale: on SmolLM2 the least-squares bypass of layer 28 gives 15x the teacher's perplexity where a plain skip
# gives 4.5x, and the same map leaving its largest output dimension alone 1.8x. So each fit is checked.
SPARE = (0, 1, 2)  # candidate forms: the map leaving the block's 0, 1 or 2 largest output dimensions untouched


@torch.no_grad()
def fit_lstsq(model: Phi3ForCausalLM, batches: Sequence[torch.Tensor], order: Sequence[int],
              ridge: float = 1e-4, progress=None, check: Sequence[torch.Tensor] = ()) -> dict[int, str]:
    """Set each bypass, in `order`, to replace its block on the inputs it will get: the layers before it in
    `order` skipped and bypassed. Its MLP keeps the block's most active MLP channels (`copy_channels`); its
    linear map is the rank-r least-squares map from its normalised input to what those leave of the block's
    update (the full model's residual after the layer minus the residual entering it and the MLP's output).

    batches: token id tensors [B, T]. Ridge is relative to the mean diagonal of X^T X.
    check: other token batches; when given, each bypass keeps the form (`SPARE`, or none: a plain skip) that
    gives its skip set, order[:k+1], the lowest KL from the full model on them. Returns {layer: form chosen}.
    """

    adapters = model.skip_adapters
    traces = [model.residuals(x.to(model.lm_head.weight.device)) for x in batches]
    score = SkipKL(model, check) if check else None
    forms: dict[int, str] = {}
    for k, layer in enumerate(order):
        skip = list(order[:k])
        lo = min(skip + [layer])
        inputs: list[torch.Tensor] = []
        for t in traces:
            _restart(model, lo, t[lo], skip, layer, inputs)
        byp = adapters.bypass[str(layer)]
        mlp = copy_channels(byp, model.model.layers[layer], inputs)
        if byp.down is None:  # attention dropped: the MLP starts as the block's channels; no map to fit
            forms[layer] = _keep_or_skip(byp, score, order[:k + 1])
            if progress is not None:
                progress(layer)
            continue
        w, xtx, moved = lstsq_map(byp, inputs, [t[layer + 1] - mlp(x) for t, x in zip(traces, inputs)], ridge)
        candidates = [(f"least squares, sparing {n} massive dims" if n else "least squares", n)
                      for n in (SPARE if score is not None else (0,))]
        if score is not None:
            candidates.append(("none (plain skip)", None))
        kept = None if byp.mlp is None else byp.mlp.down_proj.weight.clone()
        trials = []
        for name, spare in candidates:
            w_s = None if spare is None else w.clone()
            if spare:
                w_s[:, moved.topk(spare).indices] = 0
            if score is not None:
                _load(byp, w_s, xtx, kept)
            trials.append((score(order[:k + 1]) if score is not None else 0.0, name, w_s))
        _, forms[layer], best = min(trials, key=lambda t: t[0])
        _load(byp, best, xtx, kept)
        if progress is not None:
            progress(layer)
    return forms


def _keep_or_skip(byp: Bypass, score: SkipKL | None, skip: Sequence[int]) -> str:
    """A map-less bypass keeps its copied MLP channels, or, when `score` finds the plain skip's KL lower, none."""
    kept = byp.mlp.down_proj.weight.clone()
    if score is None:
        return "its block's MLP channels"
    with_mlp = score(skip)
    byp.mlp.down_proj.weight.zero_()
    if score(skip) < with_mlp:
        return "none (plain skip)"
    byp.mlp.down_proj.weight.copy_(kept)
    return "its block's MLP channels"


@torch.no_grad()
def copy_channels(byp: Bypass, block: nn.Module, inputs: Sequence[torch.Tensor]):
    """Load into the bypass's MLP the m channels of `block`'s MLP with the largest mean |activation| x |down
    column| on the bypass's inputs (fed through the block's post-attention norm, as the bypass will be), the
    channels that move the residual most. Returns the bypass MLP as a function of the slot's input."""
    if byp.mlp is None:
        return lambda x: torch.zeros_like(x)
    gate_up, down = block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight
    width = down.shape[1]
    score = torch.zeros(width, dtype=torch.float64, device=down.device)
    for x in inputs:
        gate, up = F.linear(byp.mlp_norm(x), gate_up).chunk(2, dim=-1)
        score += (up * F.silu(gate)).abs().reshape(-1, width).sum(0).double()
    keep = (score * down.norm(dim=0).double()).topk(byp.mlp.down_proj.weight.shape[1]).indices.sort().values
    byp.mlp.gate_up_proj.weight.copy_(torch.cat([gate_up[keep], gate_up[width + keep]]))
    byp.mlp.down_proj.weight.copy_(down[:, keep])
    return lambda x: byp.mlp(byp.mlp_norm(x))


@torch.no_grad()
def lstsq_map(byp: Bypass, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], ridge: float = 1e-4
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares map w [H, H] (fp64) from the bypass's normalised inputs to `targets - inputs` (what the
    skipped block should add to land on the full model's residual stream), the inputs' X^T X, and the RMS by
    which the block moves each residual dimension."""
    xtx = xty = None
    sq, n = 0.0, 0
    for x, y in zip(inputs, targets):
        a = byp.norm(x).reshape(-1, x.shape[-1]).double()
        b = (y - x).reshape(-1, x.shape[-1]).double()
        xtx = a.T @ a if xtx is None else xtx + a.T @ a
        xty = a.T @ b if xty is None else xty + a.T @ b
        sq, n = sq + b.pow(2).sum(0), n + b.shape[0]
    xtx += ridge * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx, xty), xtx, (sq / n).sqrt()


def _load(byp: Bypass, w: torch.Tensor | None, xtx: torch.Tensor, mlp_down: torch.Tensor | None) -> None:
    """Load map w and the MLP's down projection into the bypass, or none (w None: the bypass adds nothing,
    a plain skip)."""
    if w is None:
        byp.up.weight.zero_()
    else:
        set_map(byp, w, xtx)
    if byp.mlp is not None:
        byp.mlp.down_proj.weight.copy_(mlp_down if w is not None else torch.zeros_like(mlp_down))


def set_map(byp: Bypass, w: torch.Tensor, xtx: torch.Tensor) -> None:
    """Load the best rank-r approximation of map w into the bypass."""
    down, up = reduced_rank(w, xtx, byp.down.weight.shape[0])
    byp.down.weight.copy_(down.T)
    byp.up.weight.copy_(up.T)


@torch.no_grad()
def fit_one(byp: Bypass, block: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
            ridge: float = 1e-4) -> None:
    """Set one bypass to replace `block` on these inputs: its MLP channels copied, its linear map the rank-r
    least-squares map from its normalised inputs to what they leave of `targets - inputs`."""
    mlp = copy_channels(byp, block, inputs)
    w, xtx, _ = lstsq_map(byp, inputs, [y - mlp(x) for x, y in zip(inputs, targets)], ridge)
    set_map(byp, w, xtx)


def reduced_rank(w: torch.Tensor, xtx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (D [H, r], U [r, H]) of the regression w in the data's metric: the top right singular
    vectors V of the fitted values X w give w ~ (w V) V^T (reduced-rank regression)."""
    # (X w)^T (X w) = w^T X^T X w: its top eigenvectors are those right singular vectors, without X itself.
    evals, evecs = torch.linalg.eigh(w.T @ xtx @ w)
    v = evecs[:, -rank:]
    return (w @ v).float(), v.T.float()


def _restart(model: Phi3ForCausalLM, lo: int, x: torch.Tensor, skip: Sequence[int], stop: int,
             out: list[torch.Tensor]) -> None:
    """Run from layer `lo` (residual x) skipping `skip` up to layer `stop`; append the residual entering it."""
    trace: list[torch.Tensor] = []
    slots = torch.arange(x.shape[1], device=x.device)
    cos, sin = model.rotary_tables(slots, x.dtype)
    model.run_layers(x, cos, sin, slots, SkipSet.of(skip, model.num_layers), start=lo, stop=stop, trace=trace)
    out.append(trace[-1])
