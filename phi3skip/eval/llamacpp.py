"""Run a GGUF in llama.cpp itself (through `llama-cpp-python`, an optional dependency): every position's logits,
perplexity on token windows, greedy decode speed (several models alternated). What the tests, scripts/check_gguf.py and the benchmarks use to
hold our GGUF writer to the engine it writes for.

    from phi3skip.eval import llamacpp
    scores = llamacpp.logits("model.gguf", [1, 2, 3])           # np.float32 [3, V]
    ppl = llamacpp.perplexity("model.gguf", windows)             # windows: token id rows, as phi3skip scores them

llama.cpp picks LongRoPE's factors by its context size (n_ctx) rather than by the sequence's length, and runs the
phi3 architecture without its sliding window: windows are scored in a context of their own length, and tests stay
inside the window, where both rules agree with Phi-3's.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..core.cli import UserError
from .evaluate import perplexity_ci

_ERRORS: list[str] = []  # llama.cpp's error lines since the last load, for the one-line message
_LOGGER = None  # the installed log callback (kept alive: llama.cpp holds a pointer to it)


def require() -> object:
    """The binding, with llama.cpp's log kept off the terminal (its warnings would interleave with ours) and its
    errors kept for `load`'s message."""
    global _LOGGER
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama.cpp's Python binding is needed: pip install llama-cpp-python (it builds llama.cpp "
                        "from source with cmake and a C++ compiler, ~5 minutes on 2 cores; pip keeps the wheel)") from None
    if _LOGGER is None:
        @llama_cpp.llama_log_callback
        def log(level, text, user_data):  # ggml levels: 4 is an error
            if level == 4 and text:
                _ERRORS.append(text.decode("utf-8", "replace").strip())

        _LOGGER = log
        llama_cpp.llama_log_set(_LOGGER, None)
    return llama_cpp


@contextmanager
def load(path: str | os.PathLike, n_ctx: int, threads: int = 1, all_logits: bool = True,
         repack: bool = False) -> Iterator[object]:
    """A llama.cpp model and context for `path`, freed on exit (its logs silenced); keys and values cached in
    F32 (the default F16 cache rounds them).

    repack: llama.cpp's extra CPU buffer types (repacked and AMX kernels; llama-cli's default, `--no-repack` turns
    them off). Off by default: on an AMX CPU of ours, its Q8_0 AMX kernel crashes (SIGSEGV in
    ggml_backend_amx_mul_mat) on any batch of more than one token; one token at a time it runs."""
    llama_cpp = require()
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such GGUF file")
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = repack
        return p

    low.llama_model_default_params = params  # the binding has no argument for it; restored below
    _ERRORS.clear()
    try:
        llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                              logits_all=all_logits, n_threads=threads, n_threads_batch=threads, verbose=False,
                              type_k=0, type_v=0)  # GGML_TYPE_F32
    except (ValueError, RuntimeError) as e:
        why = next((m for m in _ERRORS if "error loading" in m), _ERRORS[-1] if _ERRORS else str(e))
        raise UserError(f"{path}: llama.cpp cannot load it ({why})") from None
    finally:
        low.llama_model_default_params = defaults
    try:
        yield llm
    finally:
        llm.close()


def logits(path: str | os.PathLike, ids: Sequence[int], threads: int = 1) -> np.ndarray:
    """llama.cpp's logits at every position of one sequence [T, V] (float32)."""
    with load(path, len(ids), threads) as llm:
        return _scores(llm, ids)


def _scores(llm, ids: Sequence[int]) -> np.ndarray:
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def perplexity(path: str | os.PathLike, windows: Iterable[Sequence[int]], threads: int = 1) -> float:
    """exp(mean next-token negative log-likelihood) over the windows, each scored from its start (no context
    carried across windows), as phi3skip.eval.evaluate scores token windows."""
    windows = [list(map(int, w)) for w in windows]
    nll, n = 0.0, 0
    with load(path, max(map(len, windows)), threads) as llm:
        for w in windows:
            s = _scores(llm, w)[:-1].astype(np.float64)
            top = s.max(-1, keepdims=True)
            logz = (top[:, 0] + np.log(np.exp(s - top).sum(-1)))
            nll += float((logz - s[np.arange(len(w) - 1), w[1:]]).sum())
            n += len(w) - 1
    return math.exp(nll / n)


@dataclass
class Speed:
    tokens_per_s: float  # median over repeats
    runs: list[float]


class Decoder:
    """A GGUF loaded in llama.cpp for greedy decoding, one token per call (llama.cpp's default kernels, which
    decode one token at a time without fault: see `load`); each `run` times the decode steps after the prompt (fed
    a token at a time, untimed) and keeps what it decoded in `tokens`: the greedy token after the prompt, then one per
    timed step (`new_tokens` + 1 in all). Opened once and warmed up, so alternated runs of several models time
    decoding only.

    Each next token is the argmax of the last position's logits, read with `llama_get_logits_ith` (opened without
    every position's logits, llama-cpp-python's `Llama.scores` is never written by `eval`)."""

    def __init__(self, path: str | os.PathLike, prompt: Sequence[int], new_tokens: int, threads: int = 1):
        self.prompt, self.new_tokens = [int(t) for t in prompt], new_tokens
        self.tokens: list[int] = []
        self._ctx = load(path, len(self.prompt) + new_tokens + 1, threads, all_logits=False, repack=True)
        self.llm = self._ctx.__enter__()
        self._vocab = self.llm.n_vocab()  # read once: _next runs every timed step
        self.run()  # warm-up: pages the weights in

    def _next(self) -> int:
        """The greedy token after what was fed: the argmax of the last evaluated position's logits."""
        row = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self._vocab,))
        return int(row.argmax())

    def run(self) -> float:
        """Greedy decoding after the prompt; returns the tokens/s of its `new_tokens` timed steps."""
        llm = self.llm
        llm.reset()
        for t in self.prompt:
            llm.eval([t])
        tokens = [self._next()]
        t0 = time.perf_counter()
        for _ in range(self.new_tokens):
            llm.eval([tokens[-1]])
            tokens.append(self._next())
        dt = time.perf_counter() - t0
        self.tokens = tokens
        return self.new_tokens / dt

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


def decode_speeds(paths: Sequence[str | os.PathLike], prompt: Sequence[int], new_tokens: int, threads: int = 1,
                  repeats: int = 3) -> list[Speed]:
    """Greedy decode tokens/s of each GGUF in llama.cpp: all loaded and warmed up once, then `repeats` runs of
    each, alternated so that a drift of the machine's speed hits all alike; medians."""
    decoders: list[Decoder] = []
    try:
        for p in paths:
            decoders.append(Decoder(p, prompt, new_tokens, threads))
        runs = [[] for _ in decoders]
        for _ in range(repeats):
            for d, r in zip(decoders, runs):
                r.append(d.run())
    finally:
        for d in decoders:
            d.close()
    return [Speed(float(np.median(r)), r) for r in runs]


def weight_macs(path: str | os.PathLike) -> int:
    """Multiply-adds per token of a GGUF's weight matrices (every 2-D tensor, once; the token embedding only when
    it is also the output, tied): the per-token work that decoding reads from memory, whatever the tensor type."""
    from gguf import GGUFReader

    tensors = {t.name: int(np.prod(t.shape)) for t in GGUFReader(path).tensors if len(t.shape) >= 2}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)  # a row lookup, not a product
    return sum(tensors.values())


@dataclass(frozen=True)
class Shape:
    """What a GGUF says it is: its architecture, vocabulary, hidden size and number of blocks."""
    arch: str
    vocab: int
    hidden: int
    blocks: int


def shape(path: str | os.PathLike) -> Shape:
    """A GGUF's `Shape`, read from its metadata (no tensor is loaded); a file that does not hold it is one line."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        arch = str(fields["general.architecture"].contents())
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = (int(fields[f"{arch}.vocab_size"].contents()) if f"{arch}.vocab_size" in fields else
                 len(tokens.data) if tokens is not None else None)
        out = Shape(arch, vocab, int(fields[f"{arch}.embedding_length"].contents()),
                    int(fields[f"{arch}.block_count"].contents()))
    except (KeyError, ValueError, TypeError, OSError, IndexError) as e:
        raise UserError(f"{path}: not a GGUF model whose architecture, sizes and vocabulary can be read "
                        f"({type(e).__name__}: {e})") from None
    if out.vocab is None:
        raise UserError(f"{path}: the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    return out


def check_shape(path: str | os.PathLike, config, skip: Sequence[int] | None, bypassed: Sequence[int] = ()) -> Shape:
    """Refuse, one line each, a GGUF that cannot be the export of this student's skip set `skip`: another
    vocabulary, hidden size or number of blocks (the layers kept plus the bypasses), or another architecture (phi3
    for a plain set, deci for a bypassed one). skip None: an export of any of its skip sets (vocabulary, hidden
    size)."""
    got = shape(path)
    fix = "check --model, --skip/--num-skip and --gguf: scripts/export.py writes the GGUF of a skip set"
    if got.vocab != config.vocab_size:
        raise UserError(f"{path}: a vocabulary of {got.vocab:,} tokens, the student's has {config.vocab_size:,}: "
                        f"not an export of this student; {fix}")
    if got.hidden != config.hidden_size:
        raise UserError(f"{path}: hidden size {got.hidden}, the student's is {config.hidden_size}: not an export of "
                        f"this student; {fix}")
    if skip is None:
        return got
    blocks = config.num_hidden_layers - len(set(skip)) + len(bypassed)
    arch = "deci" if bypassed else "phi3"
    shown = ",".join(map(str, skip)) or "none"
    if got.blocks != blocks:
        raise UserError(f"{path}: {got.blocks} blocks, where skip set {shown} exports as {blocks} ("
                        f"{config.num_hidden_layers - len(set(skip))} kept layers + {len(bypassed)} bypasses): "
                        f"another skip set's GGUF; {fix}")
    if got.arch != arch:
        raise UserError(f"{path}: llama.cpp's {got.arch} architecture, where skip set {shown} exports as {arch}; {fix}")
    return got


@dataclass
class Check:
    """An exported GGUF run in llama.cpp beside phi3skip's own model skipping the same layers."""
    ppl: float  # llama.cpp's
    ppl_ours: float  # phi3skip's, the student skipping the set
    tokens: int
    speed: Speed | None = None  # llama.cpp decode of this GGUF
    speed_against: Speed | None = None  # ... and of the reference GGUF (the exported full model)
    ideal: float | None = None  # the reference's weight_macs over this GGUF's

    def lines(self, name: str, against: str | None = None) -> list[str]:
        out = [f"llama.cpp {name}: perplexity {self.ppl:.4f} on {self.tokens:,} held-out tokens, phi3skip "
               f"{self.ppl_ours:.4f} for the same skip set ({100 * (self.ppl / self.ppl_ours - 1):+.2f}%)"]
        if self.speed is not None and self.speed_against is not None and self.ideal is not None:
            ratio = self.speed.tokens_per_s / self.speed_against.tokens_per_s
            out.append(f"llama.cpp decode: {self.speed.tokens_per_s:.1f} tokens/s against {self.speed_against.tokens_per_s:.1f} "
                       f"for {against}: {ratio:.3f}x, {100 * ratio / self.ideal:.0f}% of the ideal {self.ideal:.3f}x "
                       "(their weights' multiply-adds per token)")
        return out


def check(student, skip: Sequence[int], gguf: str | os.PathLike, batches: Sequence[tuple],
          against: str | os.PathLike | None = None, prompt: Sequence[int] = (), new_tokens: int = 0,
          threads: int = 1, repeats: int = 3) -> Check:
    """Score `gguf` in llama.cpp on `batches` ((x, y) token windows, as phi3skip.eval.evaluate takes them) beside
    `student` skipping `skip`; with `against` and `new_tokens`, time both GGUFs' decoding (median of `repeats`,
    alternated) and give the ratio their per-token work predicts."""
    windows = [w for x, y in batches for w in np.concatenate([x.cpu().numpy(), y[:, -1:].cpu().numpy()], 1).tolist()]
    res = Check(perplexity(gguf, windows, threads), perplexity_ci(student, batches, skip).ppl,
                sum(len(w) - 1 for w in windows))
    if against is not None and new_tokens:
        res.speed, res.speed_against = decode_speeds([gguf, against], prompt, new_tokens, threads, repeats)
        res.ideal = weight_macs(against) / weight_macs(gguf)
    return res


__all__ = ["require", "load", "logits", "perplexity", "Decoder", "decode_speeds", "Speed", "weight_macs", "check",
           "Check", "Shape", "shape", "check_shape"]
