"""Generation with skipped layers: a static KV cache, prefill separate from one-token decode, sampling without
host synchronisation, LongRoPE handled as transformers does, and lossless self-speculative decoding.

Modelled on gpt-fast's generate.py. One `Generator` per model and skip set:

    gen = Generator(model, skip=(30, 28), compile=True)
    out = gen.generate([ids_a, ids_b], max_new_tokens=128, sampling=Sampling(temperature=0.7, top_p=0.9),
                       stop_ids=stop_ids, on_tokens=lambda row, ids: ...)
    out.tokens, out.decode_tokens_per_s, out.layers_run

Design
- The KV cache is preallocated for the layers that run (a skipped layer has none) and written in place at the
  slots of the tokens fed. Several prompts run as one left-padded batch: padding slots are masked out and the
  rotary positions of each row start at its first real token.
- `compile`: "blocks" (also `True`) wraps each decoder layer in torch.compile: one compilation serves every
  layer and every skip set. On CUDA each decode step (embedding, layers, head, sampling) is then captured in a
  CUDA graph, so a token costs one graph launch: what mode="reduce-overhead" does, but a new skip set costs a
  capture (milliseconds) instead of a recompilation. "step" compiles the whole decode step instead, gpt-fast's
  way (fullgraph, mode reduce-overhead on CUDA). On CUDA both turn on inductor's coordinate-descent tuning, as
  gpt-fast does. Prefill always runs eagerly (its length varies).
- Sampling draws argmax(p / E), E ~ Exp(1): a sample of p with no host synchronisation. The host reads the
  new tokens every `sync_every` steps (1 on CPU, 8 on CUDA) to stream them and to stop on stop tokens.
- LongRoPE: the factor set depends on the largest position. When the sequence first crosses
  original_max_position_embeddings the cache is dropped and the whole sequence re-prefilled with the long
  factors, exactly when transformers' Phi-3 does; no cache mixes the two sets. The sliding window is the
  model's attention mask.
- Self-speculative decoding (`draft_skip`): the same weights with more layers skipped draft `lookahead` tokens
  one at a time; the model with `skip` scores them all in one forward. Greedy: drafts are kept while they equal
  the verifier's argmax, so the output is plain greedy output token for token. Sampling: a draft x is kept with
  probability min(1, p(x)/q(x)), the first rejected one is redrawn from max(p - q, 0), so the output
  distribution is the verifier's. Layers below the first layer that only the draft skips compute the same keys
  and values in both models: the draft borrows the verifier's cache for them. Speculative decoding runs one
  prompt at a time.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .cli import UserError
from .config import Phi3Config
from .kv_cache import KVCache
from .model import Phi3ForCausalLM
from .skipsets import check_draft_skip, validate_skip

COMPILE_MODES = ("blocks", "step")


class NonFiniteLogits(UserError):
    """The model's logits hold NaN or Inf: damaged weights, or an overflow in a low-precision dtype."""


# Sampling -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (top_k and top_p are then ignored). Applied in transformers' order: temperature,
    top-k, top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise UserError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"top-p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Probabilities [..., V] in fp32 after temperature, top-k and top-p (transformers' warpers)."""
    logits = logits.float() / s.temperature
    V = logits.shape[-1]
    if s.top_k is not None and s.top_k < V:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        # Keep the most likely tokens while the mass before them is below top_p (always the first one).
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        before = p.cumsum(-1) - p
        sorted_logits = sorted_logits.masked_fill(before >= s.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(-1)


def draw(weights: torch.Tensor) -> torch.Tensor:
    """Index drawn in proportion to non-negative (not necessarily normalised) weights [..., V], without a host
    synchronisation: argmax(w / E) with E ~ Exp(1)."""
    e = torch.empty_like(weights).exponential_(1).clamp_min_(1e-30)
    return (weights / e).argmax(-1)


def sample(logits: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens [...] from logits [..., V], and the sampling distribution (None when greedy)."""
    if s.greedy:
        return logits.argmax(-1), None
    probs = logits_to_probs(logits, s)
    return draw(probs), probs


def accept_drafts(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target: torch.Tensor,
                  greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance for M independent rounds, on the device, no host synchronisation.

    drafts [M, K] drafted tokens; draft_probs [M, K, V] their distributions q (None when greedy);
    target [M, K+1, V] the verifier's logits (greedy) or probabilities p (sampling) at the K+1 positions.
    Returns (accepted [M], next [M]): how many drafts are kept, and the token that follows them (the
    verifier's correction at the first rejection, or its bonus token when all K are kept).
    """
    M, K = drafts.shape
    if greedy:
        best = target.argmax(-1)
        n = (drafts == best[:, :K]).long().cumprod(-1).sum(-1)
        return n, best.gather(-1, n[:, None])[:, 0]
    assert draft_probs is not None
    p_d = target[:, :K].gather(-1, drafts[..., None])[..., 0]
    q_d = draft_probs.gather(-1, drafts[..., None])[..., 0]
    keep = torch.rand_like(p_d) * q_d <= p_d  # u <= p(x) / q(x)
    n = keep.long().cumprod(-1).sum(-1)
    q_ext = torch.cat([draft_probs, torch.zeros_like(target[:, :1])], 1)  # q = 0 at the bonus position
    idx = n[:, None, None].expand(M, 1, target.shape[-1])
    p_n, q_n = target.gather(1, idx)[:, 0], q_ext.gather(1, idx)[:, 0]
    residual = (p_n - q_n).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: never rejected
    return n, draw(residual)


# Results ------------------------------------------------------------------------------------------------
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


# The engine ---------------------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Graph:
    """One CUDA-graph-captured call of a zero-argument function whose inputs are static tensors."""

    def __init__(self, fn: Callable[[], object]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles, autotunes, allocates) off the capture
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # a private memory pool: outputs survive other graphs' replays
            self.out = fn()

    def __call__(self) -> object:
        self.graph.replay()
        return self.out


class _Workspace:
    """Everything sized by (batch, cache length): the caches, the token buffer and the static step inputs
    (CUDA graphs read their inputs from fixed addresses)."""

    def __init__(self, gen: "Generator", batch: int, max_len: int, padded: bool):
        model, dev, dt = gen.model, gen.device, gen.dtype
        self.batch, self.max_len, self.padded = batch, max_len, padded
        self.cache = KVCache(model.config, batch, max_len, gen.layers, dt, dev)
        self.draft_cache = None
        if gen.draft_layers is not None:
            shared = {i: self.cache[i] for i in gen.shared_layers}
            self.draft_cache = KVCache(model.config, batch, max_len, gen.draft_layers, dt, dev, shared=shared)
        if gen.compile == "step" and dev.type == "cuda":  # cudagraph trees: cache buffers at fixed addresses
            for c in (self.cache, self.draft_cache):
                for kv in (c.layers.values() if c is not None else ()):
                    torch._dynamo.mark_static_address(kv.k)
                    torch._dynamo.mark_static_address(kv.v)
        self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=dev)  # prompt and generated tokens
        self.pad = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # left padding of each row
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=dev) if padded else None
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.graphs: dict[tuple, _Graph] = {}
        self.device = dev

    def inputs(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Static (tokens [B, T], input_pos [T], positions [B, T] or None) for steps of T tokens."""
        if T not in self._inputs:
            dev = self.device
            self._inputs[T] = (torch.zeros(self.batch, T, dtype=torch.long, device=dev),
                               torch.arange(T, device=dev),
                               torch.zeros(self.batch, T, dtype=torch.long, device=dev) if self.padded else None)
        return self._inputs[T]

    def load(self, slot: int, T: int) -> None:
        """Point the static inputs for T tokens at slots slot..slot+T-1 (device ops only, no sync)."""
        tokens, input_pos, positions = self.inputs(T)
        tokens.copy_(self.seq[:, slot:slot + T])
        if T == 1:
            input_pos.fill_(slot)
        else:
            torch.arange(slot, slot + T, out=input_pos)
        if positions is not None:
            torch.sub(input_pos[None], self.pad, out=positions)
            positions.clamp_(min=0)

    def positions(self, T: int) -> torch.Tensor | None:
        """Rotary positions of slots 0..T-1 (prefill), None without padding."""
        if not self.padded:
            return None
        return (torch.arange(T, device=self.device)[None] - self.pad).clamp(min=0)


def check_request(cfg: Phi3Config, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Prompts as lists of ints, checked: non-empty, ids in the vocabulary, and prompt + new tokens within the
    context (max_position_embeddings). Raises UserError naming the problem."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts:
        raise UserError("no prompt given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        where = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
        if not p:
            raise UserError(f"{where} is empty (no tokens)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"{where} has token id {bad[0]} outside the vocabulary (0..{cfg.vocab_size - 1})")
        out.append(p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max new tokens must be an integer >= 1, got {max_new_tokens!r}")
    longest = max(map(len, out))
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                        f"of {cfg.max_position_embeddings} tokens (max_position_embeddings); ask for at most "
                        f"{max(cfg.max_position_embeddings - longest, 0)} new tokens")
    return out


class Generator:
    """Generation for one model, skip set and (optionally) draft skip set. See the module docstring."""

    def __init__(self, model: Phi3ForCausalLM, skip: Sequence[int] | None = (), *,
                 draft_skip: Sequence[int] | None = None, lookahead: int = 4, compile: bool | str = False,
                 cuda_graphs: bool | None = None, sync_every: int | None = None):
        self.model = model.eval()
        cfg = model.config
        L = self.num_layers = cfg.num_hidden_layers
        skipped = validate_skip(skip, L)
        self.skip = tuple(sorted(skipped, reverse=True))
        self.layers = [i for i in range(L) if i not in skipped]
        self.draft_skip: tuple[int, ...] | None = None
        self.draft_layers: list[int] | None = None
        self.shared_layers: list[int] = []
        if draft_skip is not None:
            d = check_draft_skip(skipped, draft_skip, L, lookahead)
            self.draft_skip = tuple(sorted(d, reverse=True))
            self.draft_layers = [i for i in range(L) if i not in d]
            first_diff = min(d - skipped)  # layers below it see the same inputs in draft and verifier
            self.shared_layers = [i for i in self.draft_layers if i < first_diff]
        self.lookahead = lookahead
        if compile is True:
            compile = "blocks"
        if compile not in (False, None, *COMPILE_MODES):
            raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)} (or False), got {compile!r}")
        self.compile = compile or None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cuda = self.device.type == "cuda"
        self.cuda_graphs = bool(self.compile == "blocks" and cuda) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not cuda:
            raise UserError("CUDA graphs need a CUDA device")
        self.sync_every = sync_every or (8 if cuda else 1)
        self.blocks: list[nn.Module] | None = None
        if self.compile and cuda:
            # gpt-fast's setting: tunes the generated kernels' launch parameters. On an H100 it took the
            # Phi-3-mini decode from 66% to 73% of the memory-bandwidth limit (compilation 7 s -> 17 s).
            import torch._inductor.config as inductor_config

            inductor_config.coordinate_descent_tuning = True
        if self.compile == "blocks":
            _raise_recompile_limit()
            self.blocks = [torch.compile(b, fullgraph=True, dynamic=False) for b in model.model.layers]
        self._compiled_steps: dict[tuple, Callable] = {}
        self._ws: _Workspace | None = None
        rot = model.rotary
        self.has_long = rot.has_long
        self.original_max = rot.original_max

    # Forward passes ---------------------------------------------------------------------------------
    def _logits(self, ws: _Workspace, T: int, skip: tuple[int, ...], cache: KVCache, long: bool,
                last_only: bool, blocks: list | None) -> torch.Tensor:
        tokens, input_pos, positions = ws.inputs(T)
        h = self.model.hidden_states(tokens, skip, input_pos=input_pos, cache=cache, positions=positions,
                                     key_mask=ws.key_mask, long_rope=long, blocks=blocks)
        return self.model.lm_head(h[:, -1] if last_only else h)

    def _eager(self, ws: _Workspace, kind: str, T: int, long: bool, s: Sampling,
               blocks: list | None) -> Callable[[], tuple]:
        """The zero-argument step reading ws's static inputs for T tokens:
        "decode"/"draft": (token [B], probs [B, V] or None); "verify": (logits or probs [B, T, V],)."""
        draft = kind == "draft"
        skip = self.draft_skip if draft else self.skip
        cache = ws.draft_cache if draft else ws.cache

        def step() -> tuple:
            if kind == "verify":
                logits = self._logits(ws, T, skip, cache, long, False, blocks)
                return (logits if s.greedy else logits_to_probs(logits, s),)
            return sample(self._logits(ws, T, skip, cache, long, True, blocks), s)

        return step

    def _fn(self, ws: _Workspace, kind: str, T: int, long: bool, s: Sampling) -> Callable[[], tuple]:
        """The step as configured: eager, with compiled layers, or compiled whole (cached per shape)."""
        if self.compile != "step":
            return self._eager(ws, kind, T, long, s, self.blocks)
        key = (id(ws), kind, T, long, s)
        if key not in self._compiled_steps:
            _raise_recompile_limit()
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            step = self._eager(ws, kind, T, long, s, None)
            self._compiled_steps[key] = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
        return self._compiled_steps[key]

    def _step(self, ws: _Workspace, kind: str, slot: int, T: int, long: bool, s: Sampling) -> tuple:
        """Run a decode/draft/verify step on the T tokens at slots slot.. (inputs loaded from ws.seq)."""
        ws.load(slot, T)
        key = (kind, T, long, s)
        if self.cuda_graphs:
            graph = ws.graphs.get(key)
            if graph is None:
                graph = ws.graphs[key] = _Graph(self._fn(ws, kind, T, long, s))
            return graph()
        return self._fn(ws, kind, T, long, s)()

    def _prefill(self, ws: _Workspace, T: int, long: bool, draft: bool = False) -> torch.Tensor:
        """Run slots 0..T-1 through the model (eagerly), filling its cache; logits of the last slot [B, V]."""
        tokens = ws.seq[:, :T]
        skip, cache = (self.draft_skip, ws.draft_cache) if draft else (self.skip, ws.cache)
        h = self.model.hidden_states(tokens, skip, input_pos=torch.arange(T, device=self.device), cache=cache,
                                     positions=ws.positions(T), key_mask=ws.key_mask, long_rope=long)
        logits = self.model.lm_head(h[:, -1])
        if not bool(torch.isfinite(logits).all()):  # one check per prefill; NaN would decode as garbage or nothing
            raise NonFiniteLogits(f"the model gives non-finite logits (NaN/Inf) on this prompt"
                                  f"{f' skipping {list(skip)}' if skip else ''}: its weights hold NaN/Inf or "
                                  f"overflow in {str(logits.dtype).removeprefix('torch.')}; check the checkpoint, "
                                  f"or try --dtype float32")
        return logits

    # Public API -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), on_tokens: Callable[[int, list[int]], None] | None = None,
                 seed: int | None = None) -> GenerationResult:
        """Generate up to max_new_tokens after each prompt (token id lists). on_tokens(row, ids) receives new
        tokens as they reach the host (stop tokens excluded). Speculative generation runs prompts one by one."""
        prompts = self._check(prompts, max_new_tokens)
        stop = {int(t) for t in stop_ids}
        if self.draft_skip is None:
            return self._generate_batch(prompts, max_new_tokens, sampling, stop, on_tokens, seed)
        results = []
        for row, p in enumerate(prompts):
            cb = None if on_tokens is None else (lambda _r, ids, row=row: on_tokens(row, ids))
            results.append(self._generate_speculative(p, max_new_tokens, sampling, stop, cb,
                                                      None if seed is None else seed + row))
        out = results[0]
        for r in results[1:]:
            out.tokens += r.tokens
            out.finish += r.finish
            for f in ("prompt_tokens", "ttft_s", "decode_s", "compile_s", "drafted", "accepted", "reprefills"):
                setattr(out, f, getattr(out, f) + getattr(r, f))
        return out

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return check_request(self.model.config, prompts, max_new_tokens)


    def _workspace(self, batch: int, need: int, padded: bool) -> _Workspace:
        """Reuse the last workspace when it fits exactly (compiled code and graphs stay valid), else a new one."""
        max_len = _round_up(need, 64)
        ws = self._ws
        if ws is None or (ws.batch, ws.max_len, ws.padded) != (batch, max_len, padded):
            self._ws = ws = None  # free the old caches and graphs first
            self._compiled_steps.clear()
            ws = self._ws = _Workspace(self, batch, max_len, padded)
        return ws

    def _uses_long_later(self, last_slot: int) -> bool:
        return self.has_long and last_slot + 1 > self.original_max

    def _warm(self, ws: _Workspace, kinds: list[tuple[str, int]], longs: list[bool], s: Sampling) -> float:
        """Compile / capture the decode steps before the clock starts (their cache writes at slot 0.. are
        overwritten by the prefill that follows)."""
        if not (self.compile or self.cuda_graphs):
            return 0.0
        t0 = time.perf_counter()
        for long in longs:
            for kind, T in kinds:
                self._step(ws, kind, 0, T, long, s)
        _sync(self.device)
        return time.perf_counter() - t0

    def _generate_batch(self, prompts: list[list[int]], N: int, s: Sampling, stop: set[int],
                        on_tokens: Callable | None, seed: int | None) -> GenerationResult:
        B, P = len(prompts), max(map(len, prompts))
        pads = [P - len(p) for p in prompts]
        ws = self._workspace(B, P + N, any(pads))
        ws.seq[:, :P].copy_(torch.tensor([[0] * k + p for k, p in zip(pads, prompts)]))
        ws.pad.copy_(torch.tensor(pads)[:, None])
        if ws.key_mask is not None:
            ws.key_mask.copy_(torch.arange(ws.max_len, device=self.device)[None] >= ws.pad)
        long = self.has_long and self.model.rotary.use_long(P - 1)
        longs = [long] + ([True] if not long and self._uses_long_later(P + N - 2) else [])
        compile_s = self._warm(ws, [("decode", 1)], longs, s)
        if seed is not None:
            torch.manual_seed(seed)
        stream = _Stream(B, P, stop, on_tokens)
        t0 = time.perf_counter()
        tok, _ = sample(self._prefill(ws, P, long), s)
        ws.seq[:, P].copy_(tok)
        stream.flush(ws.seq, 1)
        t1 = time.perf_counter()
        reprefills = 0
        g = 1  # tokens generated per row; the last one (slot P + g - 1) is fed next
        while g < N and not stream.all_done:
            slot = P + g - 1
            if self.has_long and not long and slot >= self.original_max:
                long = True  # transformers drops the cache here and re-prefills with the long factors
                tok, _ = sample(self._prefill(ws, slot + 1, long), s)
                reprefills += 1
            else:
                tok, _ = self._step(ws, "decode", slot, 1, long, s)
            ws.seq[:, slot + 1].copy_(tok)
            g += 1
            if g % self.sync_every == 0 or g == N:
                stream.flush(ws.seq, g)
        stream.flush(ws.seq, g)
        t2 = time.perf_counter()
        return GenerationResult(stream.tokens, stream.finish, sum(map(len, prompts)), t1 - t0, t2 - t1, compile_s,
                                len(self.layers), self.num_layers, self.skip, reprefills=reprefills)

    def _generate_speculative(self, prompt: list[int], N: int, s: Sampling, stop: set[int],
                              on_tokens: Callable | None, seed: int | None) -> GenerationResult:
        P, K = len(prompt), self.lookahead
        ws = self._workspace(1, P + N + K, False)  # drafts may run K - 1 slots past the last kept token
        ws.seq[0, :P].copy_(torch.tensor(prompt))
        long = self.has_long and self.model.rotary.use_long(P - 1)
        longs = [long] + ([True] if not long and self._uses_long_later(P + N - 2) else [])
        compile_s = self._warm(ws, [("decode", 1), ("draft", 1), ("draft", 2), ("verify", K + 1)], longs, s)
        if seed is not None:
            torch.manual_seed(seed)
        stream = _Stream(1, P, stop, on_tokens)
        V = self.model.config.vocab_size
        q_buf = None if s.greedy else torch.zeros(1, K, V, device=self.device)
        d_buf = torch.zeros(1, K, dtype=torch.long, device=self.device)
        ar = torch.arange(K + 1, device=self.device)
        t0 = time.perf_counter()
        tok, _ = sample(self._prefill(ws, P, long), s)
        ws.seq[0, P].copy_(tok[0])
        self._prefill(ws, P, long, draft=True)
        draft_len = P  # slots the draft cache holds (the verifier's always runs up to the token fed next)
        stream.flush(ws.seq, 1)
        t1 = time.perf_counter()
        g, drafted, accepted, reprefills = 1, 0, 0, 0
        while g < N and not stream.all_done:
            n = P + g  # tokens so far; the last one, at slot n - 1, is in neither cache yet
            # Always K drafts (tokens past N are dropped): one step shape, so one compiled graph.
            k = K
            if self.has_long and not long:
                if n - 1 >= self.original_max:  # crossing: both caches re-prefilled with the long factors
                    long = True
                    tok, _ = sample(self._prefill(ws, n, long), s)
                    self._prefill(ws, n, long, draft=True)
                    draft_len, reprefills = n, reprefills + 1
                    ws.seq[0, n].copy_(tok[0])
                    g += 1
                    stream.flush(ws.seq, g)
                    continue
                k = min(k, self.original_max - n)  # no round may reach the crossing slot
            if k <= 0:  # next to the crossing: one plain verifier step (the draft cache is re-prefilled next)
                tok, _ = self._step(ws, "decode", n - 1, 1, long, s)
                ws.seq[0, n].copy_(tok[0])
                g += 1
                stream.flush(ws.seq, g)
                continue
            # Draft k tokens; its first step also feeds tokens the draft cache lacks (slots draft_len..n-1).
            for j in range(k):
                start = draft_len if j == 0 else n - 1 + j
                T = n + j - start
                if T in (1, 2):
                    d, q = self._step(ws, "draft", start, T, long, s)
                else:  # rare (after plain steps): an eager catch-up forward
                    ws.load(start, T)
                    d, q = self._eager(ws, "draft", T, long, s, None)()
                d_buf[:, j].copy_(d)
                if q_buf is not None:
                    q_buf[:, j].copy_(q)
                ws.seq[0, n + j].copy_(d[0])
            draft_len = n + k - 1
            (target,) = self._step(ws, "verify", n - 1, k + 1, long, s)
            n_acc, nxt = accept_drafts(d_buf[:, :k], None if q_buf is None else q_buf[:, :k], target, s.greedy)
            # Slots n.. get the kept drafts then the next token (later slots are overwritten before use).
            ws.seq[0, n:n + k + 1].copy_(torch.where(ar[:k + 1] < n_acc, ws.seq[0, n:n + k + 1], nxt))
            a = int(n_acc)  # the one host synchronisation per round
            drafted += k
            accepted += a
            draft_len = min(draft_len, n + a)  # the draft cache is valid up to the last kept draft
            g += a + 1
            stream.flush(ws.seq, min(g, N))
        g = min(g, N)
        stream.flush(ws.seq, g)
        t2 = time.perf_counter()
        res = GenerationResult(stream.tokens, stream.finish, P, t1 - t0, t2 - t1, compile_s, len(self.layers),
                               self.num_layers, self.skip, draft_skip=self.draft_skip,
                               draft_layers_run=len(self.draft_layers), lookahead=K, drafted=drafted,
                               accepted=accepted, reprefills=reprefills)
        return res


class _Stream:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _raise_recompile_limit(n: int = 64) -> None:
    """Decode compiles one graph per step shape (1 token, 2, lookahead + 1), padding and LongRoPE factor set:
    more than dynamo's default of 8 per function."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            with contextlib.suppress(Exception):
                setattr(cfg, name, n)


def generate(model: Phi3ForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             skip: Sequence[int] | None = (), **kw) -> GenerationResult:
    """One-shot `Generator(model, skip, ...).generate(prompts, max_new_tokens, ...)`."""
    gen_kw = {k: kw.pop(k) for k in ("draft_skip", "lookahead", "compile", "cuda_graphs", "sync_every") if k in kw}
    return Generator(model, skip, **gen_kw).generate(prompts, max_new_tokens, **kw)


__all__ = ["Generator", "GenerationResult", "Sampling", "generate", "check_request", "check_draft_skip", "sample",
           "logits_to_probs", "draw", "accept_drafts"]
