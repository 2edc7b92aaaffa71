"""What a training run reports about itself (torchtitan's components/metrics.py): metrics.jsonl, the progress bar
with its ETA, peak memory, and the GPU peak FLOP/s that MFU is measured against.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ..core.distributed import Env
from ..core.paths import atomic_write_text


class Metrics:
    """metrics.jsonl on rank 0; a resumed run drops the lines after its checkpoint's step.

    Never written through a symlink (whatever it points at stays as it was): the kept lines are written to a new file
    renamed over the name, and appends open it with O_NOFOLLOW."""

    def __init__(self, path: Path, env: Env, resume_step: int | None):
        self.f = None
        if not env.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            atomic_write_text(path, "".join(line + "\n" for line in kept_rows(path, resume_step)))
        else:
            path.unlink(missing_ok=True)  # a symlink itself, not its target
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        self.f = os.fdopen(fd, "a", buffering=1)

    def write(self, **row) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def kept_rows(path: Path, resume_step: int) -> list[str]:
    """The lines of a metrics.jsonl up to `resume_step`; a line that is not a row with an integer step (a damaged
    file) is dropped, and a symlink is not ours to read: nothing of it is kept."""
    if path.is_symlink() or not path.is_file():
        return []
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step <= resume_step:
            keep.append(line)
    return keep


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
