"""What this machine can honour: the upper bounds of counts that a command turns into threads, repeats or memory.

One place for them, so every command and benchmark bounds `--threads` by the same CPU count, a seed by what numpy
and torch take, and an allocation by the same reading of free memory, before anything is allocated.
"""
from __future__ import annotations

import os

from .cli import Range, UserError

# numpy's legacy seeding (np.random.seed, RandomState) takes 0 <= seed < 2**32; torch.manual_seed takes less than
# 2**64: the narrower is every command's rule. A seed of 2**64 was a traceback.
SEED = Range(0, 2**32 - 1, note="what numpy and torch seed with")
# Timed runs repeated: 1000 runs of anything this project times take hours, more is a typo (1e9 ran without end).
REPEATS = Range(1, 1000, note="timed runs: more would run for days")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(what: str = "this machine's CPUs") -> Range:
    """1..the CPU count: more threads than CPUs only contend (and 100000 made libgomp crash)."""
    n = cpu_count()
    return Range(1, n, note=f"{what}: {n}")


def available_memory() -> int | None:
    """Bytes of memory free for a new allocation: /proc/meminfo's MemAvailable (page cache that can be dropped
    counted in), else the free physical pages; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_memory(flag: str, value: object, need: float, what: str) -> None:
    """One line, before anything is allocated, when `need` bytes (the estimate for `what` that `flag value` asks
    for) exceed the memory this machine has available."""
    have = available_memory()
    if have is not None and need > have:
        raise UserError(f"{flag} {value}: {what} needs about {gib(need)} of memory and this machine has "
                        f"{gib(have)} available; lower {flag}")


def memory_bound(bytes_each: float, what: str, low: int = 1) -> Range:
    """low..the largest count whose `bytes_each` per unit fit in the available memory (no upper bound where it is not
    known): a number-table entry for a count that is held in memory as a whole."""
    have = available_memory()
    if have is None:
        return Range(low)
    return Range(low, max(low, int(have // bytes_each)), note=f"{what}: {gib(have)} of memory available")


def forward_bytes(batch: int, seq: int, vocab: int, hidden: int, intermediate: int, elem: int = 4) -> int:
    """An estimate of one forward's peak activations: the logits [batch, seq, vocab] in float32 (twice: the
    log-softmax beside them) and a block's largest tensors (the MLP's gate and up halves, attention's q, k, v)."""
    return batch * seq * (2 * vocab * 4 + (2 * intermediate + 4 * hidden) * elem)


def held_tokens() -> Range:
    """--max-tokens of a command that holds the tokens it scores in memory (int64 inputs and targets: 16 bytes a
    token), bounded by the memory available."""
    return memory_bound(16, "the scored tokens are held in memory, 16 bytes each")
