"""Evaluation of the speed/quality knob: perplexity (with bootstrap intervals) and decode speed per skip set.

Perplexity = exp(mean next-token cross-entropy), the cross-entropy computed in fp32 over chunks of tokens
(hidden states projected onto the vocabulary a chunk at a time), so no B x T x V logits tensor ever exists.
Every skip set is scored on the same token windows, and the confidence interval resamples those windows.
"""
from __future__ import annotations

import math
import os
import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.cli import UserError
from ..core.distributed import Env, all_reduce
from ..core.paths import atomic_output
from ..data.tokens import eval_batches
from ..model.quant import QuantLinear
from ..model.skipsets import validate_skip
from ..serve.generate import Generator
from ..train.distill import default_chunk

Batch = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def window_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, skip: Sequence[int] = (),
               chunk: int | None = None) -> torch.Tensor:
    """Next-token negative log-likelihood summed over each window: fp32 [B], no device sync.

    x, y: [B, T] inputs and targets. Under FSDP, `model.hidden_states` must be registered as a forward method
    (`parallel.apply_fsdp` does it), and every rank must make the same calls.
    """
    h = model.hidden_states(x.to(model.lm_head.weight.device), skip)
    weight = model.lm_head.weight  # read after the forward: under FSDP it is gathered only then
    if isinstance(model.lm_head, QuantLinear):
        weight = model.lm_head.dequantized(h.dtype)
    B, T = y.shape
    h = h.reshape(-1, h.shape[-1]).to(weight.dtype)
    y = y.reshape(-1).to(h.device)
    chunk = chunk or default_chunk(weight.shape[0])
    nll = torch.empty(B * T, dtype=torch.float32, device=weight.device)
    for a in range(0, h.shape[0], chunk):
        logits = (h[a:a + chunk] @ weight.T).float()
        nll[a:a + chunk] = F.cross_entropy(logits, y[a:a + chunk], reduction="none")
    return nll.view(B, T).sum(1)


def token_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, skip: Sequence[int] = (),
              chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (fp32 scalar tensor, no device sync) and the token count."""
    return window_nll(model, x, y, skip, chunk).sum(), y.numel()


def as_batches(data: torch.Tensor | Iterable[Batch]) -> Iterable[Batch]:
    """A LongTensor [N, T+1] of token windows -> one batch (inputs, targets); an iterable of batches as is."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[1] < 2:
            raise ValueError(f"tokens must be [N, T+1] with T >= 1, got shape {tuple(data.shape)}")
        return [(data[:, :-1], data[:, 1:])]
    return data


def perplexity(model: nn.Module, data: torch.Tensor | Iterable[Batch], skip: Sequence[int] = (),
               chunk: int | None = None) -> float:
    """exp(mean cross-entropy) of `model` skipping `skip`, over token windows or (inputs, targets) batches."""
    total, count = 0.0, 0
    for x, y in as_batches(data):
        nll, n = token_nll(model, x, y, skip, chunk)
        total += float(nll)
        count += n
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return math.exp(total / count)


def distributed_perplexity(model: nn.Module, batches: Sequence[Batch], skip: Sequence[int], env: Env,
                           ctx: ContextManager = nullcontext()) -> float:
    """`perplexity` with the batches split across ranks, each forward under `ctx` (e.g. autocast). Every rank
    makes the same number of calls (sharded blocks run in step) and gets the same result."""
    mine = batches[env.rank::env.world_size]
    tot = torch.zeros(2, dtype=torch.float64, device=env.device)  # summed NLL, tokens
    for i in range(math.ceil(len(batches) / env.world_size)):
        x, y = mine[i] if i < len(mine) else batches[0]  # a padding call keeps FSDP in step; its result is dropped
        with ctx:
            nll, n = token_nll(model, x.to(env.device), y.to(env.device), skip)
        if i < len(mine):
            tot[0] += nll.double()
            tot[1] += n
    all_reduce(tot, env)
    return math.exp(tot[0].item() / tot[1].item())


def val_batches(path, batch_size: int, seq_len: int, max_tokens: int | None = None,
                vocab_size: int | None = None) -> list[Batch]:
    """The validation batches of a token file, in memory (so several models and skip sets see the same text)."""
    return list(eval_batches(path, batch_size, seq_len, max_tokens=max_tokens, vocab_size=vocab_size))


# The speed/quality knob ----------------------------------------------------------------------------------------
@dataclass
class Perplexity:
    ppl: float
    low: float  # bootstrap confidence interval over windows
    high: float
    tokens: int


def bootstrap_interval(window_nll: torch.Tensor, tokens_per_window: int, samples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of exp(mean NLL) when the windows are resampled with replacement."""
    n = window_nll.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (samples, n), generator=g)
    ppl = torch.exp(window_nll.double()[idx].sum(1) / (n * tokens_per_window))
    a = (1 - level) / 2
    return float(torch.quantile(ppl, a)), float(torch.quantile(ppl, 1 - a))


def perplexity_ci(model: nn.Module, batches: Sequence[Batch], skip: Sequence[int] = (),
                  samples: int = 1000, seed: int = 0) -> Perplexity:
    """Perplexity with a 95% bootstrap interval; the batches must hold windows of one length."""
    nll = torch.cat([window_nll(model, x, y, skip).cpu() for x, y in batches])
    T = batches[0][1].shape[1]
    low, high = bootstrap_interval(nll, T, samples, seed=seed)
    return Perplexity(math.exp(float(nll.double().sum()) / (nll.numel() * T)), low, high, nll.numel() * T)


def decode_speed(model: nn.Module, skip: Sequence[int], prompt: Sequence[int], new_tokens: int = 32,
                 repeats: int = 5) -> float:
    """Median greedy decode tokens/s (batch 1, static cache) of `model` skipping `skip`.

    On the CPU it runs on one thread: batch-1 decode is memory-bound, and a second thread that shares a core
    with anything else makes the timings swing by 2x (threads wait on each other every matrix-vector product).
    """
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    try:
        gen = Generator(model, skip)
        gen.generate([list(prompt)], 2)  # warm-up
        rates = [gen.generate([list(prompt)], new_tokens).decode_tokens_per_s for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    return statistics.median(rates)


@dataclass
class SkipSetResult:
    skip: tuple[int, ...]
    layers_run: int
    student: dict[str, Perplexity]  # dataset name -> perplexity
    teacher: dict[str, Perplexity] | None  # the teacher with the same layers skipped naively
    tokens_per_s: float | None  # decode speed of the student with this skip set

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_skip_sets(student: nn.Module, datasets: dict[str, Sequence[Batch]], skip_sets: Sequence[Sequence[int]],
                       teacher: nn.Module | None = None, speed_prompt: Sequence[int] | None = None,
                       speed_tokens: int = 32, progress: Callable[[str], None] | None = None) -> list[SkipSetResult]:
    """Perplexity of the student (and the naively skipped teacher) on every dataset, and decode speed, per set."""
    L = student.config.num_hidden_layers
    checked = [validate_skip(s, L) for s in skip_sets]  # every set, before the first measurement
    results = []
    for s, skip in zip(skip_sets, checked):
        res = SkipSetResult(tuple(s), L - len(skip), {}, {} if teacher is not None else None, None)
        for name, batches in datasets.items():
            res.student[name] = perplexity_ci(student, batches, skip)
            if teacher is not None:
                res.teacher[name] = perplexity_ci(teacher, batches, skip)
        if speed_prompt is not None:
            res.tokens_per_s = decode_speed(student, skip, speed_prompt, speed_tokens)
        if progress is not None:
            progress(summary_line(res))
        results.append(res)
    return results


def summary_line(r: SkipSetResult) -> str:
    parts = [f"skip {','.join(map(str, r.skip)) or 'none':>20s}"]
    for name, p in r.student.items():
        t = f" (teacher {r.teacher[name].ppl:.2f})" if r.teacher else ""
        parts.append(f"{name} ppl {p.ppl:.2f}{t}")
    if r.tokens_per_s:
        parts.append(f"{r.tokens_per_s:.1f} tok/s")
    return " | ".join(parts)


def markdown_table(results: Sequence[SkipSetResult]) -> str:
    """Perplexity [95% interval] per dataset for student and naive teacher, relative speed, per skip set."""
    names = list(results[0].student)
    head = ["skip", "layers run"]
    for n in names:
        head += [f"{n}: student", f"{n}: teacher, naive skip"] if results[0].teacher is not None else [f"{n}"]
    head += ["decode tok/s", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = full_model(results).tokens_per_s
    for r in results:
        row = [",".join(map(str, r.skip)) or "none", str(r.layers_run)]
        for n in names:
            row.append(_ppl(r.student[n]))
            if r.teacher is not None:
                row.append(_ppl(r.teacher[n]))
        row += [f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "-",
                f"{r.tokens_per_s / base:.2f}x" if r.tokens_per_s and base else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def full_model(results: Sequence[SkipSetResult]) -> SkipSetResult:
    """The result without skipped layers: speedups are against it, wherever it is in the list."""
    for r in results:
        if not r.skip:
            return r
    raise ValueError("the results have no full-model (skip none) entry to compare against")


def _ppl(p: Perplexity) -> str:
    return f"{p.ppl:.2f} [{p.low:.2f}, {p.high:.2f}]"


def pyplot():
    """matplotlib.pyplot, headless; one clear line when the optional extra is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install -e '.[plot]' (or pass --no-plot)") from None
    return plt


def plot(results: Sequence[SkipSetResult], path: str | os.PathLike) -> Path:
    """Perplexity against decode speed: the naive teacher curve and the distilled student curve, per dataset."""
    plt = pyplot()
    names = list(results[0].student)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    full = full_model(results)
    base = full.tokens_per_s
    for ax, name in zip(axes[0], names):
        xs = [r.tokens_per_s / base if r.tokens_per_s and base else full.layers_run / r.layers_run for r in results]
        if results[0].teacher is not None:
            ax.plot(xs, [r.teacher[name].ppl for r in results], "o--", color="tab:gray", label="teacher, naive skip")
        ax.plot(xs, [r.student[name].ppl for r in results], "o-", color="tab:blue", label="distilled student")
        for x, r in zip(xs, results):
            ax.annotate(str(len(r.skip)), (x, r.student[name].ppl), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("decode speedup vs full model" if base else "L / layers run")
        ax.set_ylabel(f"perplexity ({name})")
        ax.set_title(f"{name}: layers skipped next to each point", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure through a temporary sibling and a rename (format from the suffix), and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
