"""What a training run reports about itself (torchtitan's components/metrics.py): metrics.jsonl, the progress bar
with its ETA, peak memory, and the GPU peak FLOP/s that MFU is measured against.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from .distributed import Env


class Metrics:
    """metrics.jsonl on rank 0; a resumed run drops the lines after its checkpoint's step."""

    def __init__(self, path: Path, env: Env, resume_step: int | None):
        self.f = None
        if not env.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None:
            path.unlink(missing_ok=True)
        self.f = open(path, "a", buffering=1)

    def write(self, **row) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


class Progress:
    """A one-line progress bar with ETA on rank 0's terminal (stderr), redrawn at most 4 times a second."""

    def __init__(self, total: int, start: int, env: Env):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.on = env.is_main and sys.stderr.isatty()
        self.last = 0.0

    def eta(self, done: int) -> str:
        rate = (time.perf_counter() - self.t0) / max(1, done - self.start)
        return fmt_time(rate * (self.total - done))

    def update(self, done: int, text: str) -> None:
        now = time.perf_counter()
        if not self.on or (now - self.last < 0.25 and done < self.total):
            return
        self.last = now
        width = 24
        fill = int(width * done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {text} ETA {self.eta(done)}\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")
            self.on = False  # closing twice ends the line once


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of known GPUs, for MFU (None when unknown or on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12),
                       ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12),
                       ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None
