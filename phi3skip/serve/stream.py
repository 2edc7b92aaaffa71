"""What generation gives back: `GenerationResult` (tokens, finish reasons, timings) and `TokenStream`, the host
side that reads new tokens, cuts rows at their stop tokens and calls back. Shared by plain and speculative
decoding (generate.py, speculative.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each prompt, stop token excluded
    finish: list[str]  # "stop" (a stop token came) or "length" (max_new_tokens reached)
    prompt_tokens: int
    ttft_s: float  # time to first token (prefill and first sample), after any compilation
    decode_s: float  # from the first token to the last
    compile_s: float  # compilation and CUDA-graph capture before the clock starts
    layers_run: int
    num_layers: int
    skip: tuple[int, ...]
    draft_skip: tuple[int, ...] | None = None
    draft_layers_run: int | None = None
    lookahead: int | None = None
    drafted: int = 0
    accepted: int = 0
    reprefills: int = 0  # LongRoPE cache drops

    @property
    def new_tokens(self) -> int:
        """Generated tokens, stop tokens included."""
        return sum(len(t) + (f == "stop") for t, f in zip(self.tokens, self.finish))

    @property
    def decode_tokens(self) -> int:
        """Tokens produced after each prompt's first one (the first comes from the prefill)."""
        return sum(max(len(t) + (f == "stop") - 1, 0) for t, f in zip(self.tokens, self.finish))

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def summary(self) -> str:
        skip = ",".join(map(str, self.skip)) or "none"
        parts = [f"prompt tokens {self.prompt_tokens}", f"new tokens {self.new_tokens}",
                 f"time to first token {self.ttft_s:.3f} s", f"decode {self.decode_tokens_per_s:.1f} tokens/s",
                 f"layers run {self.layers_run}/{self.num_layers} (skip {skip})"]
        if self.draft_skip is not None:
            rate = self.acceptance_rate
            parts.append(f"speculative: draft runs {self.draft_layers_run}/{self.num_layers} layers, "
                         f"lookahead {self.lookahead}, acceptance "
                         + (f"{rate:.1%} ({self.accepted}/{self.drafted})" if rate is not None else "n/a"))
        if self.compile_s:
            parts.append(f"compile {self.compile_s:.1f} s")
        return " | ".join(parts)


class TokenStream:
    """Host side of generation: reads new tokens, cuts each row at its first stop token, calls back."""

    def __init__(self, batch: int, prompt_len: int, stop: set[int], on_tokens: Callable | None):
        self.P, self.stop, self.cb = prompt_len, stop, on_tokens
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finish = ["length"] * batch
        self.done = [False] * batch
        self.read = 0  # generated tokens already read

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def flush(self, seq: torch.Tensor, upto: int) -> None:
        if upto <= self.read:
            return
        chunk = seq[:, self.P + self.read:self.P + upto].tolist()
        self.read = upto
        for r, ids in enumerate(chunk):
            if self.done[r]:
                continue
            new = []
            for t in ids:
                if t in self.stop:
                    self.done[r], self.finish[r] = True, "stop"
                    break
                new.append(t)
            if new:
                self.tokens[r] += new
                if self.cb is not None:
                    self.cb(r, new)
