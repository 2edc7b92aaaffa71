"""Skip-layer distillation: the chunked forward-KL loss, the sequential and nested schedules, one step.

The teacher is the frozen full model, the student a trainable copy. One step on a batch:

    loss = KL(T || S_full) + w * KL(T || S_skip) [+ c * CE(S_full, y)]

KL(T || S) = tau^2 * mean over tokens of sum_v p_T(v) (log p_T(v) - log p_S(v)), with p = softmax(logits / tau),
S_full the student with every layer and S_skip the student with this step's skip set. Both student passes run
the blocks before the first skipped layer once (`Phi3ForCausalLM.forward_branches`), and the loss projects hidden
states onto the vocabulary a chunk of tokens at a time, in fp32, computing the gradient as it goes (`chunked_kd_loss`):
neither model's B x T x V logits exist at once, and nothing vocabulary-sized is kept for backward.

Schedules (`Schedule`), over candidate layers l_1, l_2, ..., l_K (default L-2, L-4, ...):
- sequential: phase j trains for `steps_per_phase` steps with S_skip skipping l_1..l_j (the original recipe's
  order: earlier layers stay skipped while the next one is made skippable);
- nested: every step skips the first k candidates, so every prefix of the list stays good. `k_dist` uniform:
  one k in 0..K drawn from (seed, step) (k = 0 makes S_skip = S_full, and the loss is (1 + w) KL(T || S_full));
  sandwich (the slimmable-networks rule): two skip passes each step, the deepest set (all K) and one k drawn
  from 1..K-1, beside the full pass.
Skip sets depend only on the step, so every rank of a sharded job runs the same blocks.

With `--train-scope adapters` the base stays frozen and the full pass *is* the teacher: `adapter_step` runs it
once without gradient, recording the residual stream, and each skip pass restarts from it at its lowest
skipped layer with only the skip adapters (phi3skip/model/bypass.py) trainable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..core.cli import UserError
from ..model.cost import block_weights, head_weights

SCHEDULES = ("sequential", "nested")
K_DISTS = ("uniform", "sandwich", "harmonic")
IGNORE_INDEX = -100
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# Schedules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Which layers the small pass skips at each optimizer step.

    sequential: `len(layers)` phases of `steps_per_phase` steps; nested: one phase of `steps_per_phase` steps.
    """

    kind: str
    layers: tuple[int, ...]
    steps_per_phase: int
    seed: int = 0
    k_dist: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)}")
        if self.k_dist not in K_DISTS:
            raise UserError(f"unknown k distribution {self.k_dist!r}; use one of {', '.join(K_DISTS)}")
        if self.steps_per_phase < 1:
            raise UserError(f"a schedule needs at least one step per phase, got {self.steps_per_phase}")

    @property
    def num_phases(self) -> int:
        return len(self.layers) if self.kind == "sequential" else 1

    @property
    def total_steps(self) -> int:
        return self.num_phases * self.steps_per_phase

    def phase(self, step: int) -> int:
        return min(step // self.steps_per_phase, self.num_phases - 1)

    def phase_start(self, phase: int) -> int:
        return phase * self.steps_per_phase

    def current_layers(self, phase: int) -> tuple[int, ...]:
        """The layers being made skippable in a phase (sequential: l_j; nested: all); around:R trains around them."""
        return self.layers[phase:phase + 1] if self.kind == "sequential" else self.layers

    def phase_skip(self, phase: int) -> tuple[int, ...]:
        """The largest skip set of a phase (sequential: l_1..l_j; nested: all candidates)."""
        return self.layers[:phase + 1] if self.kind == "sequential" else self.layers

    def skip(self, step: int, micro: int = 0) -> tuple[int, ...]:
        """Layers the small pass skips at optimizer step `step`, micro-batch `micro` (same on every rank)."""
        if self.kind == "sequential":
            return self.phase_skip(self.phase(step))
        k = int(np.random.default_rng([self.seed, step, micro]).integers(0, len(self.layers) + 1))
        return self.layers[:k]

    def skip_sets(self, step: int, micro: int = 0) -> list[tuple[int, ...]]:
        """The skip passes of a step: one set (uniform), or two for nested schedules with
        sandwich: the deepest set and one drawn uniformly below it (the deepest is the speculative draft);
        harmonic: two depths drawn without replacement with P(k) ~ 1/k (users operate at small k)."""
        if self.kind == "sequential" or self.k_dist == "uniform":
            return [self.skip(step, micro)]
        K = len(self.layers)
        if K == 1:
            return [self.layers]
        rng = np.random.default_rng([self.seed, step, micro])
        if self.k_dist == "harmonic":
            p = 1.0 / np.arange(1, K + 1)
            ks = rng.choice(np.arange(1, K + 1), size=2, replace=False, p=p / p.sum())
            return [self.layers[:int(k)] for k in sorted(ks, reverse=True)]
        k = int(rng.integers(1, K))
        return [self.layers, self.layers[:k]]


# What trains ---------------------------------------------------------------------------------------------------
def block_index(name: str) -> int | None:
    """Block number of a parameter name (wrappers such as `_orig_mod.` or `_checkpoint_wrapped_module.` allowed)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def trainable_blocks(scope: str, num_layers: int, skip: Sequence[int], current: Sequence[int]) -> frozenset[int] | None:
    """Blocks that train under `--train-scope` (None: every parameter, embeddings and head included).

    scope: `all`; `around:R` (blocks within R of each layer in `current`, the layers being made skippable
    now); or block indices and ranges such as `24-31` or `26,27,29`. The scope must hold a block that runs
    in the small pass: a skipped block gets no gradient from the skip term.
    """
    scope = scope.strip().lower()
    if scope == "all":
        return None
    try:
        if scope.startswith("around:"):
            r = int(scope.split(":", 1)[1])
            if r < 0:
                raise ValueError
            blocks = {i for c in current for i in range(c - r, c + r + 1) if 0 <= i < num_layers}
        else:
            blocks = set()
            for part in scope.replace(" ", "").split(","):
                lo, _, hi = part.partition("-")
                blocks.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--train-scope {scope!r}: use all, around:R (R >= 0), or blocks like 24-31 or 26,27,29") from None
    bad = sorted(i for i in blocks if not 0 <= i < num_layers)
    if bad or not blocks:
        raise UserError(f"--train-scope {scope!r}: blocks must be in 0..{num_layers - 1}")
    if not blocks - set(skip):
        raise UserError(f"--train-scope {scope!r} trains only blocks the small pass skips ({sorted(blocks)}): they get "
                        f"no gradient from the skip term; include blocks around them, e.g. around:2")
    return frozenset(blocks)


def set_trainable(model: nn.Module, blocks: frozenset[int] | None) -> list[nn.Parameter]:
    """requires_grad on the parameters of `blocks` only (all when None); returns the trainable parameters."""
    out = []
    for name, p in model.named_parameters():
        train = blocks is None or block_index(name) in blocks
        p.requires_grad_(train)
        if train:
            out.append(p)
    return out


# The loss ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    """temperature tau; kd_weight w of the skip term; ce_weight c of the optional next-token CE on S_full;
    chunk tokens per vocabulary chunk (None: about 64 MiB of fp32 logits); dtype of the vocabulary projections
    (None: the student head's); align_weight of the hidden-state alignment of skip adapters (`rejoin_mse`)."""

    temperature: float = 1.0
    kd_weight: float = 0.01
    ce_weight: float = 0.0
    chunk: int | None = None
    dtype: torch.dtype | None = None
    align_weight: float = 0.0


def default_chunk(vocab_size: int, budget: int = 1 << 24) -> int:
    """Tokens per chunk so that one fp32 chunk of logits holds about `budget` numbers (64 MiB)."""
    return max(16, budget // vocab_size)


def kd_chunk(hidden: torch.Tensor, weight: torch.Tensor, teacher_logp: torch.Tensor, teacher_p: torch.Tensor,
             cfg: LossConfig, kl_weight: float, n_tokens: int, labels: torch.Tensor | None = None, n_ce: int = 1,
             grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One student pass over one chunk of tokens: values and a hand-derived gradient, inputs left untouched.

    With logits s = hidden @ weight.T (fp32 after the product), q = softmax(s / tau) and the teacher's p at tau,
    returns the chunk's sum over tokens of KL(p || q); of CE(s, labels) (None without labels or ce_weight;
    IGNORE_INDEX tokens add nothing); and, when `grad`, the gradient with respect to s [n, V] (fp32) of the
    chunk's share of the loss, kl_weight * tau^2 / n_tokens * KL + ce_weight / n_ce * CE.
    """
    tau = cfg.temperature
    with_ce = labels is not None and cfg.ce_weight != 0
    s = (hidden @ weight.T).float()
    log1 = torch.log_softmax(s, dim=-1) if with_ce and tau != 1 else None  # CE is on the unscaled logits
    logq = torch.log_softmax(s.div_(tau), dim=-1)  # s is this function's own buffer: scaled in place
    del s
    kl = torch.sum(teacher_p * (teacher_logp - logq))
    ce = None
    if with_ce:
        valid = labels != IGNORE_INDEX
        y0 = torch.where(valid, labels, 0)[:, None]
        ce = -((logq if log1 is None else log1).gather(1, y0).squeeze(1) * valid).sum()
    if not grad:
        return kl, ce, None
    # d KL / d s = tau * (q - p) per token; d CE / d s = softmax(s) - onehot(y). In place on logq: no more buffers.
    kd = kl_weight * tau / n_tokens
    if with_ce:
        rows = (valid.to(logq.dtype) * (cfg.ce_weight / n_ce))[:, None]  # ignored tokens get no CE gradient
    if with_ce and log1 is None:  # tau == 1: both terms share softmax(s) = q
        g = logq.exp_().mul_(rows + kd).sub_(teacher_p, alpha=kd)
    else:
        g = logq.exp_().mul_(kd).sub_(teacher_p, alpha=kd)
        if with_ce:
            g.add_(log1.exp_().mul_(rows))
    if with_ce:
        g.scatter_add_(1, y0, -rows)
    return kl, ce, g


class _ChunkedKD(torch.autograd.Function):
    """Forward KL (plus optional CE) over vocabulary chunks; the gradient is computed in forward and stored.

    Stored for backward: d loss / d hidden for each student pass [N, H] and d loss / d W [V, H] (fp32), never
    anything of size N x V. `cfg` has its chunk and dtype resolved; `weights` are the passes' KL weights.
    """

    @staticmethod
    def forward(ctx, cfg: LossConfig, weights: tuple[float, ...], labels, teacher_hidden, teacher_weight,
                student_weight, *student_hiddens):
        need_w, *need_h = ctx.needs_input_grad[-1 - len(student_hiddens):]  # the student's are the last inputs
        N, dev, tau = teacher_hidden.shape[0], teacher_hidden.device, cfg.temperature
        ws, wt = student_weight.to(cfg.dtype), teacher_weight.to(cfg.dtype)
        with_ce = cfg.ce_weight != 0 and labels is not None
        n_ce = max(1, int((labels != IGNORE_INDEX).sum())) if with_ce else 1
        kl = torch.zeros(len(student_hiddens), dtype=torch.float32, device=dev)
        ce = torch.zeros((), dtype=torch.float32, device=dev)
        grad_w = torch.zeros(student_weight.shape, dtype=torch.float32, device=dev) if need_w else None
        grad_h = [torch.empty_like(h) if need else None for h, need in zip(student_hiddens, need_h)]
        for a in range(0, N, cfg.chunk):
            b = min(N, a + cfg.chunk)
            logp = torch.log_softmax((teacher_hidden[a:b].to(cfg.dtype) @ wt.T).float().div_(tau), dim=-1)
            p = logp.exp()
            for j, h in enumerate(student_hiddens):
                hc = h[a:b].to(cfg.dtype)
                y = labels[a:b] if with_ce and j == 0 else None  # CE on the full pass only
                kl_j, ce_j, g = kd_chunk(hc, ws, logp, p, cfg, weights[j], N, y, n_ce, grad=need_w or need_h[j])
                kl[j] += kl_j
                if ce_j is not None:
                    ce += ce_j
                if g is None:
                    continue
                gd = g.to(cfg.dtype)
                del g
                if need_h[j]:
                    grad_h[j][a:b] = (gd @ ws).to(h.dtype)
                if need_w:
                    grad_w += gd.T @ hc
                del gd
            del logp, p
        kl.mul_(tau * tau / N)
        ce.div_(n_ce)
        total = sum(w * kl[j] for j, w in enumerate(weights)) + cfg.ce_weight * ce
        ctx.save_for_backward(grad_w, *grad_h)
        ctx.weight_dtype = student_weight.dtype
        stats = torch.cat([kl, ce[None]])
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, grad_stats):
        grad_w, *grad_h = ctx.saved_tensors
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        gh = [None if g is None else g * grad_total.to(g.dtype) for g in grad_h]
        return (None, None, None, None, None, gw, *gh)


def chunked_kd_loss(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                    student_hiddens: Sequence[torch.Tensor], student_weight: torch.Tensor,
                    weights: Sequence[float], temperature: float = 1.0, labels: torch.Tensor | None = None,
                    ce_weight: float = 0.0, chunk: int | None = None,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j weights[j] * KL(T || S_j) + ce_weight * CE(S_0, labels), in chunks of tokens, fp32 softmax.

    Hidden states are [N, H] (or [B, T, H], flattened); weights are the [V, H] output projections. The vocabulary
    projections run in `dtype` (default: the student weight's), everything after them in fp32. Returns the loss
    (differentiable in the student hiddens and weight) and detached stats [KL_0, ..., KL_{n-1}, CE].
    """
    H = teacher_hidden.shape[-1]
    teacher_hidden = teacher_hidden.reshape(-1, H)
    student_hiddens = [h.reshape(-1, H) for h in student_hiddens]
    if labels is not None:
        labels = labels.reshape(-1)
    if len(weights) != len(student_hiddens):
        raise ValueError(f"{len(weights)} weights for {len(student_hiddens)} student passes")
    cfg = LossConfig(float(temperature), ce_weight=float(ce_weight),
                     chunk=int(chunk or default_chunk(student_weight.shape[0])), dtype=dtype or student_weight.dtype)
    return _ChunkedKD.apply(cfg, tuple(float(w) for w in weights), labels, teacher_hidden.detach(),
                            teacher_weight.detach(), student_weight, *student_hiddens)


# One step ------------------------------------------------------------------------------------------------------
class SkipKL:
    """Mean per-token KL(full model || model skipping a set) on fixed token batches [B, T].

    The full model's distribution is computed once and kept (tokens x vocabulary, fp32: meant for a few
    thousand calibration tokens); KL(p || q) = sum p log p - sum p log q, the first sum a constant. A set is
    run from `start` on given residual streams (default: its lowest layer, from the full model's streams), so
    a deep set costs only the layers above it.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, xs: Sequence[torch.Tensor]):
        w = model.lm_head.weight
        self.model, self.xs = model, [x.to(w.device) for x in xs]
        self.probs, self.negent = [], 0.0
        for x in self.xs:
            logp = torch.log_softmax((model.hidden_states(x).flatten(0, 1) @ w.T).float(), dim=-1)
            self.probs.append(logp.exp())
            self.negent += float((self.probs[-1] * logp).sum())
            del logp
        self.count = sum(x.numel() for x in self.xs)
        self._full: list[list[torch.Tensor]] | None = None

    def full_streams(self) -> list[list[torch.Tensor]]:
        """The full model's residual streams of every batch (`model.residuals`), computed on first use."""
        if self._full is None:
            with torch.no_grad():
                self._full = [self.model.residuals(x) for x in self.xs]
        return self._full

    @torch.no_grad()
    def __call__(self, skip: Sequence[int], start: int | None = None,
                 streams: Sequence[torch.Tensor] | None = None) -> float:
        skip = list(skip)
        if start is None:
            start = min(skip, default=0)
            streams = [t[start] for t in self.full_streams()]
        w = self.model.lm_head.weight
        cross = 0.0
        for h, p in zip(streams, self.probs):
            logq = torch.log_softmax((self.model.hidden_from(start, h, skip).flatten(0, 1) @ w.T).float(), dim=-1)
            cross += float((p * logq).sum())
        return (self.negent - cross) / self.count


STATS = ("loss", "kl_full", "kl_skip", "ce")


def distill_step(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 skips: Sequence[Sequence[int]], cfg: LossConfig, loss_scale: float = 1.0,
                 backward: bool = True) -> torch.Tensor:
    """Teacher forward, the full student pass and one pass per skip set, the loss, and its backward (scaled by
    `loss_scale`, e.g. 1/accum). Each skip pass has weight w; an empty set adds its w to the full pass.

    Returns detached stats [loss, kl_full, kl_skip, ce] (see STATS; kl_skip is the mean over the skip passes)
    without a device sync.
    """
    with torch.no_grad():
        ht = teacher.hidden_states(x)
    sets = [tuple(s) for s in skips if tuple(s)]
    w_full = 1.0 + cfg.kd_weight * (len(skips) - len(sets))
    hs = student.forward_branches(x, [()] + sets)
    loss, stats = chunked_kd_loss(ht, teacher.lm_head.weight, hs, student.lm_head.weight,
                                  [w_full] + [cfg.kd_weight] * len(sets), cfg.temperature,
                                  y if cfg.ce_weight else None, cfg.ce_weight, cfg.chunk, cfg.dtype)
    if backward:
        (loss * loss_scale).backward()
    kl_skip = stats[1:1 + len(sets)].mean() if sets else stats[0]
    return torch.stack([loss.detach(), stats[0], kl_skip, stats[-1]])


def adapter_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, skips: Sequence[Sequence[int]],
                 cfg: LossConfig, loss_scale: float = 1.0, backward: bool = True) -> torch.Tensor:
    """One step of skip-adapter training over a frozen base (the full model is the teacher, exactly).

    The full forward runs once without gradient and records the residual stream; each skip set restarts from
    it at its lowest skipped layer, so the blocks below run once for all passes. Gradient reaches only the
    skip adapters. With `cfg.align_weight` each skip pass adds align_weight * kd_weight * `rejoin_mse` to the
    loss. Stats as `distill_step` (kl_full is 0: the full path is the teacher).
    """
    sets = [tuple(s) for s in skips if tuple(s)]
    if not sets:  # only the full path: it is the teacher, nothing to learn or to run
        return torch.zeros(len(STATS), device=x.device)
    with torch.no_grad():
        trace = model.residuals(x)
        ht = model.model.norm(trace[-1])
    traces = [[] if cfg.align_weight else None for _ in sets]  # each pass's residuals, for the alignment only
    hs = [model.hidden_from(min(s), trace[min(s)], s, trace=t) for s, t in zip(sets, traces)]
    w = model.lm_head.weight
    loss, stats = chunked_kd_loss(ht, w, hs, w, [cfg.kd_weight] * len(sets), cfg.temperature,
                                  chunk=cfg.chunk, dtype=cfg.dtype)
    if cfg.align_weight:
        loss = loss + cfg.align_weight * cfg.kd_weight * sum(
            rejoin_mse(trace[min(s):], t, s) for s, t in zip(sets, traces))
    if backward:
        (loss * loss_scale).backward()
    return torch.stack([loss.detach(), torch.zeros_like(stats[0]), stats[:len(sets)].mean(), stats[-1]])


def rejoin_mse(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], skip: Sequence[int]) -> torch.Tensor:
    """Hidden-state alignment where skipped layers rejoin the stack (LLM-Streamline's idea): at each layer r
    that runs right after a skipped one (or the stack's output), the mean squared error between the student's
    and the teacher's residual streams entering it, each dimension over the teacher's RMS on these tokens (a few
    massive dimensions would otherwise be all the loss). Both lists start at the same layer, min(skip)."""
    lo, out = min(skip), []
    for j in range(1, len(student)):
        if lo + j - 1 in skip and lo + j not in skip:
            t = teacher[j].detach()
            rms = t.pow(2).mean(dim=(0, 1)).sqrt().clamp_min(1e-6)
            out.append(((student[j] - t) / rms).pow(2).mean())
    return torch.stack(out).sum()


# Cost ------------------------------------------------------------------------------------------------------------
def forward_flops(config, seq_len: int, blocks: int, heads: int) -> float:
    """Forward FLOPs per token of `blocks` decoder blocks and `heads` vocabulary projections.

    Matmuls count 2 per weight; attention 4 * heads * head_dim * T per block (PaLM's 12*L*H*Q*T over fwd+bwd).
    """
    return blocks * (2 * block_weights(config) + 4 * config.num_attention_heads * config.hd * seq_len) \
        + heads * 2 * head_weights(config)


def step_flops_per_token(config, seq_len: int, skip: Sequence[int]) -> float:
    """Model FLOPs per token of one distillation step: teacher forward + student forward and backward (x3),
    counting the blocks `forward_branches` really runs (the skip branch only from its first skipped layer)."""
    L = config.num_hidden_layers
    branch = len([i for i in range(min(skip), L) if i not in skip]) if skip else 0
    teacher = forward_flops(config, seq_len, L, 1)
    student = forward_flops(config, seq_len, L + branch, 2 if skip else 1)
    return teacher + 3 * student
