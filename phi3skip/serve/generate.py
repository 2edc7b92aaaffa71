"""Generation with skipped layers, laid out as gpt-fast's generate.py: `prefill` runs the prompt into the
static KV cache and gives the first token; `decode_one_token` is one step (the compiled, CUDA-graph-replayed
unit); `decode_n_tokens` is the loop, which streams tokens and stops rows on their stop tokens. Sampling is in
sampling.py, self-speculative decoding in speculative.py; the design notes are in docs/generation.md.

    gen = Generator(model, skip=(30, 28), compile=True)
    out = gen.generate([ids_a, ids_b], max_new_tokens=128, sampling=Sampling(temperature=0.7, top_p=0.9),
                       stop_ids=stop_ids, on_tokens=lambda row, ids: ...)
    out.tokens, out.decode_tokens_per_s, out.layers_run

A step is one function per (kind, skip set): "decode" samples the next token with `skip`, "draft" with the
draft's skip set, "verify" scores several tokens with `skip`. Each (kind, tokens per step, LongRoPE factor set,
sampling) gets its static inputs and its callable once, in the workspace's one step table.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import torch
from torch import nn

from ..core.cli import UserError
from ..model.bypass import merged
from ..model.config import Phi3Config
from ..model.kv_cache import KVCache
from ..model import kernels as _kernels
from ..model.model import Phi3ForCausalLM
from ..model.quant import quantize_model, use_kernels
from ..model.skipsets import check_draft_skip, validate_skip
from .sampling import Sampling, logits_to_probs, sample
from .speculative import speculative_decode
from .stream import GenerationResult, TokenStream

COMPILE_MODES = ("blocks", "step")


class NonFiniteLogits(UserError):
    """The model's logits hold NaN or Inf: damaged weights, or an overflow in a low-precision dtype."""


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


# The workspace and its steps ------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Step:
    """One step function: its static inputs (CUDA graphs and compiled steps read them at fixed addresses) and
    the zero-argument callable that reads them. "decode"/"draft" return (token [B], probs [B, V] or None),
    "verify" returns (logits or probs [B, T, V],)."""

    def __init__(self, gen: "Generator", ws: "_Workspace", kind: str, T: int, long: bool, s: Sampling,
                 blocks: list | None):
        dev = ws.device
        self.tokens = torch.zeros(ws.batch, T, dtype=torch.long, device=dev)
        self.input_pos = torch.arange(T, device=dev)
        self.positions = torch.zeros(ws.batch, T, dtype=torch.long, device=dev) if ws.padded else None
        model, skip, cache, bypasses = gen.model, gen.skip_sets[kind], ws.caches[kind], gen.bypasses[kind]

        def step() -> tuple:
            h = model.hidden_states(self.tokens, skip, input_pos=self.input_pos, cache=cache,
                                    positions=self.positions, key_mask=ws.key_mask, long_rope=long, blocks=blocks,
                                    bypasses=bypasses)
            if kind == "verify":
                logits = model.lm_head(h)
                return (logits if s.greedy else logits_to_probs(logits, s),)
            return sample(model.lm_head(h[:, -1]), s)

        self.fn: Callable[[], tuple] = step

    def load(self, ws: "_Workspace", slot: int) -> None:
        """Point the static inputs at slots slot..slot+T-1 of ws.seq (device ops only, no sync)."""
        T = self.tokens.shape[1]
        self.tokens.copy_(ws.seq[:, slot:slot + T])
        if T == 1:
            self.input_pos.fill_(slot)
        else:
            torch.arange(slot, slot + T, out=self.input_pos)
        if self.positions is not None:
            torch.sub(self.input_pos[None], ws.pad, out=self.positions)
            self.positions.clamp_(min=0)

    def __call__(self) -> tuple:
        return self.fn()


class _Workspace:
    """Everything sized by (batch, cache length): the caches, the token buffer, and the step table."""

    def __init__(self, gen: "Generator", batch: int, max_len: int, padded: bool):
        model, dev, dt = gen.model, gen.device, gen.dtype
        self.batch, self.max_len, self.padded, self.device = batch, max_len, padded, dev
        cache = KVCache(model.config, batch, max_len, gen.layers, dt, dev)
        self.caches: dict[str, KVCache | None] = {"decode": cache, "verify": cache, "draft": None}
        if gen.draft_layers is not None:
            shared = {i: cache[i] for i in gen.shared_layers}
            self.caches["draft"] = KVCache(model.config, batch, max_len, gen.draft_layers, dt, dev, shared=shared)
        if gen.compile == "step" and dev.type == "cuda":  # cudagraph trees: cache buffers at fixed addresses
            for c in (self.cache, self.draft_cache):
                for kv in (c.layers.values() if c is not None else ()):
                    torch._dynamo.mark_static_address(kv.k)
                    torch._dynamo.mark_static_address(kv.v)
        self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=dev)  # prompt and generated tokens
        self.pad = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # left padding of each row
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=dev) if padded else None
        self.steps: dict[tuple, _Step | _Graph] = {}  # (kind, T, long, sampling) -> the step, ready to run

    @property
    def cache(self) -> KVCache:
        return self.caches["decode"]

    @property
    def draft_cache(self) -> KVCache | None:
        return self.caches["draft"]

    def positions(self, T: int) -> torch.Tensor | None:
        """Rotary positions of slots 0..T-1 (prefill), None without padding."""
        if not self.padded:
            return None
        return (torch.arange(T, device=self.device)[None] - self.pad).clamp(min=0)


class _Graph:
    """A step captured in a CUDA graph: it loads its inputs as the step does, and runs as one replay."""

    def __init__(self, fn: "_Step"):
        self.load = fn.load
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


def set_weight_layout(model: nn.Module, column_major: bool) -> None:
    """Store every nn.Linear weight column-major (W^T contiguous: the same shape and values) or row-major again.

    On the CPU each decode step is a few-row matrix product per weight, and MKL streams x @ W^T from the
    column-major layout faster than from nn.Linear's row-major one: on one thread here SmolLM2's decode step
    took 86 ms instead of 100 ms (`benchmarks/bench_generate.py --only steps`). The Generator sets it on the
    CPU (`column_major=None`). In place through .data, so tied weights stay tied and names are unchanged;
    saving writes contiguous tensors as always.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                if column_major and w.is_contiguous():
                    w.data = w.data.t().contiguous().t()
                elif not column_major and not w.is_contiguous():
                    w.data = w.data.contiguous()


class Generator:
    """Generation for one model, skip set and (optionally) draft skip set. On the CPU it stores the model's fp32
    Linear weights column-major for MKL (`set_weight_layout`; column_major=False keeps them row-major), or with
    kernels=True runs them through phi3skip's fp32 kernel (`quant.use_kernels`). A quantized model
    (`from_pretrained(..., quantize=)`) runs its own kernels. Bypasses with
    per-depth deltas run merged, as made at construction (`_merged_bypasses`)."""

    def __init__(self, model: Phi3ForCausalLM, skip: Sequence[int] | None = (), *,
                 draft_skip: Sequence[int] | None = None, lookahead: int = 4, compile: bool | str = False,
                 cuda_graphs: bool | None = None, sync_every: int | None = None, column_major: bool | None = None,
                 kernels: bool | None = None):
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
            # layers below it see the same inputs in draft and verifier: below it, the same slots (a bypass too
            # runs the same only at the same depth, `SkipAdapters.variant`)
            first_diff = next(i for i in range(L) if model.slot(i, skipped) != model.slot(i, d))
            self.shared_layers = [i for i in self.draft_layers if i < first_diff]
        # the values each step passes to the model: checked here, once, not on every decode step
        self.skip_sets = {"decode": skipped, "verify": skipped, "draft": d if draft_skip is not None else None}
        self.lookahead = lookahead
        if compile is True:
            compile = "blocks"
        if compile not in (False, None, *COMPILE_MODES):
            raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)} (or False), got {compile!r}")
        self.compile = compile or None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cuda = self.device.type == "cuda"
        # fp32 on the CPU: MKL's one-row products on column-major weights by default; kernels=True runs them through
        # phi3skip's fp32 kernel (row-major), which measured no faster here (12.6-14.9 against 14.3-15.0 tokens/s,
        # docs/benchmarks.md). Quantized Linears always use their kernels.
        self.kernels = bool(kernels)
        if self.kernels:
            if cuda or not _kernels.available():
                raise UserError("kernels=True: phi3skip's CPU kernels are for CPU models and are not built here")
            use_kernels(model)
        if column_major is None:
            column_major = not cuda and not self.kernels
        set_weight_layout(model, column_major=column_major)
        self.bypasses = self._merged_bypasses(column_major)
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
        self._ws: _Workspace | None = None
        rot = model.rotary
        self.has_long = rot.has_long
        self.original_max = rot.original_max

    def _merged_bypasses(self, column_major: bool) -> dict[str, dict[int, nn.Module] | None]:
        """Each kind's skip set's bypasses with their per-depth deltas folded in (`bypass.merged`, the same
        numbers, without recomputing W + B A at every step), made once: a Generator serves the weights it was
        built with. None (the model's own, as the block loop finds them) without per-depth deltas."""
        adapters = self.model.skip_adapters
        if adapters is None or not adapters.depth_rank:
            return dict.fromkeys(self.skip_sets)
        out = {kind: None if s is None else merged(adapters, s) for kind, s in self.skip_sets.items()}
        mode = getattr(self.model, "quantization", None)
        for b in (b for bs in out.values() if bs for b in bs.values()):
            if mode:
                quantize_model(b, mode)
            elif self.kernels:
                use_kernels(b)
            set_weight_layout(b, column_major)
        return out

    # Public API -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), on_tokens: Callable[[int, list[int]], None] | None = None,
                 seed: int | None = None) -> GenerationResult:
        """Generate up to max_new_tokens after each prompt (token id lists). on_tokens(row, ids) receives new
        tokens as they reach the host (stop tokens excluded). Speculative generation runs prompts one by one."""
        prompts = check_request(self.model.config, prompts, max_new_tokens)
        stop = {int(t) for t in stop_ids}
        if self.draft_skip is None:
            return self._generate_batch(prompts, max_new_tokens, sampling, stop, on_tokens, seed)

        results = []
        for row, p in enumerate(prompts):
            cb = None if on_tokens is None else (lambda _r, ids, row=row: on_tokens(row, ids))
            results.append(speculative_decode(self, p, max_new_tokens, sampling, stop, cb,
                                              None if seed is None else seed + row))
        out = results[0]
        for r in results[1:]:
            out.tokens += r.tokens
            out.finish += r.finish
            for f in ("prompt_tokens", "ttft_s", "decode_s", "compile_s", "drafted", "accepted", "reprefills"):
                setattr(out, f, getattr(out, f) + getattr(r, f))
        return out

    def _generate_batch(self, prompts: list[list[int]], N: int, s: Sampling, stop: set[int],
                        on_tokens: Callable | None, seed: int | None) -> GenerationResult:
        B, P = len(prompts), max(map(len, prompts))
        pads = [P - len(p) for p in prompts]
        ws = self.workspace(B, P + N, any(pads))
        ws.seq[:, :P].copy_(torch.tensor([[0] * k + p for k, p in zip(pads, prompts)]))
        ws.pad.copy_(torch.tensor(pads)[:, None])
        if ws.key_mask is not None:
            ws.key_mask.copy_(torch.arange(ws.max_len, device=self.device)[None] >= ws.pad)
        long, longs = self.rope_sets(P, P + N - 2)
        compile_s = self.warm(ws, [("decode", 1)], longs, s)
        if seed is not None:
            torch.manual_seed(seed)
        stream = TokenStream(B, P, stop, on_tokens)
        t0 = time.perf_counter()
        tok, _ = sample(self.prefill(ws, P, long), s)
        ws.seq[:, P].copy_(tok)
        stream.flush(ws.seq, 1)
        t1 = time.perf_counter()
        reprefills = self.decode_n_tokens(ws, P, N, long, s, stream)
        t2 = time.perf_counter()
        return GenerationResult(stream.tokens, stream.finish, sum(map(len, prompts)), t1 - t0, t2 - t1, compile_s,
                                len(self.layers), self.num_layers, self.skip, reprefills=reprefills)

    # Prefill, one step, the loop ----------------------------------------------------------------------
    def prefill(self, ws: _Workspace, T: int, long: bool, kind: str = "decode") -> torch.Tensor:
        """Run slots 0..T-1 through the model with kind's skip set (eagerly: the length varies), filling its
        cache; logits of the last slot [B, V]."""
        skip = self.skip_sets[kind]
        h = self.model.hidden_states(ws.seq[:, :T], skip, input_pos=torch.arange(T, device=self.device),
                                     cache=ws.caches[kind], positions=ws.positions(T), key_mask=ws.key_mask,
                                     long_rope=long, bypasses=self.bypasses[kind])
        logits = self.model.lm_head(h[:, -1])
        if not bool(torch.isfinite(logits).all()):  # one check per prefill; NaN would decode as garbage or nothing
            where = f" skipping {sorted(skip, reverse=True)}" if skip else ""
            raise NonFiniteLogits(f"the model gives non-finite logits (NaN/Inf) on this prompt{where}: its weights "
                                  f"hold NaN/Inf or overflow in {str(logits.dtype).removeprefix('torch.')}; check the "
                                  f"checkpoint, or try --dtype float32")
        return logits

    def decode_one_token(self, ws: _Workspace, slot: int, long: bool, s: Sampling) -> torch.Tensor:
        """Feed the token at `slot` (every row) and sample the next one: [B], on the device."""
        return self.step(ws, "decode", slot, 1, long, s)[0]

    def decode_n_tokens(self, ws: _Workspace, P: int, N: int, long: bool, s: Sampling,
                        stream: "TokenStream") -> int:
        """Decode until every row has N tokens or has stopped (the first one, at slot P, comes from the
        prefill); returns how many LongRoPE re-prefills it ran."""
        reprefills = 0
        g = 1  # tokens generated per row; the last one (slot P + g - 1) is fed next
        while g < N and not stream.all_done:
            slot = P + g - 1
            if self.crosses_original(slot, long):
                long = True
                tok = self.reprefill_long(ws, slot + 1, s)
                reprefills += 1
            else:
                tok = self.decode_one_token(ws, slot, long, s)
            ws.seq[:, slot + 1].copy_(tok)
            g += 1
            if g % self.sync_every == 0 or g == N:
                stream.flush(ws.seq, g)
        stream.flush(ws.seq, g)
        return reprefills

    # LongRoPE ----------------------------------------------------------------------------------------
    def rope_sets(self, P: int, last_slot: int) -> tuple[bool, list[bool]]:
        """The LongRoPE factor set of a P-token prefill, and every set the steps up to `last_slot` may use."""
        long = self.has_long and self.model.rotary.use_long(P - 1)
        later = not long and self.has_long and last_slot + 1 > self.original_max
        return long, [long] + ([True] if later else [])

    def crosses_original(self, slot: int, long: bool) -> bool:
        """Feeding `slot` takes the sequence past original_max_position_embeddings with the short factors still
        in the cache: transformers drops its cache there and re-prefills with the long factors."""
        return self.has_long and not long and slot >= self.original_max

    def reprefill_long(self, ws: _Workspace, n: int, s: Sampling) -> torch.Tensor:
        """The cache dropped and slots 0..n-1 prefilled again with the long factors (the draft's too, when
        there is one): no cache ever mixes the two sets. Returns the token at slot n [B]."""
        tok, _ = sample(self.prefill(ws, n, True), s)
        if self.draft_skip is not None:
            self.prefill(ws, n, True, kind="draft")
        return tok

    # Steps -------------------------------------------------------------------------------------------
    def step(self, ws: _Workspace, kind: str, slot: int, T: int, long: bool, s: Sampling) -> tuple:
        """Run kind's step on the T tokens at slots slot.. of ws.seq (see `_Step` for what it returns)."""
        key = (kind, T, long, s)
        run = ws.steps.get(key)
        if run is None:
            step = self._build_step(ws, kind, T, long, s)
            step.load(ws, slot)  # before a capture: its warm-up runs write these slots' own keys and values
            run = ws.steps[key] = _Graph(step) if self.cuda_graphs else step
        else:
            run.load(ws, slot)
        return run()

    def eager_step(self, ws: _Workspace, kind: str, slot: int, T: int, long: bool, s: Sampling) -> tuple:
        """A one-off step of an unusual length, run eagerly on the plain layers (nothing compiled or kept)."""
        step = _Step(self, ws, kind, T, long, s, None)
        step.load(ws, slot)
        return step()

    def _build_step(self, ws: _Workspace, kind: str, T: int, long: bool, s: Sampling) -> _Step:
        """The step as configured: eager, with compiled layers, or compiled whole."""
        step = _Step(self, ws, kind, T, long, s, None if self.compile == "step" else self.blocks)
        if self.compile == "step":
            _raise_recompile_limit()
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            step.fn = torch.compile(step.fn, fullgraph=True, dynamic=False, mode=mode)
        return step

    def workspace(self, batch: int, need: int, padded: bool) -> _Workspace:
        """Reuse the last workspace when it fits exactly (compiled code and graphs stay valid), else a new one."""
        max_len = _round_up(need, 64)
        ws = self._ws
        if ws is None or (ws.batch, ws.max_len, ws.padded) != (batch, max_len, padded):
            self._ws = ws = None  # free the old caches, steps and graphs first
            ws = self._ws = _Workspace(self, batch, max_len, padded)
        return ws

    def warm(self, ws: _Workspace, kinds: list[tuple[str, int]], longs: list[bool], s: Sampling) -> float:
        """Compile / capture the steps before the clock starts (their cache writes at slot 0.. are overwritten
        by the prefill that follows)."""
        if not (self.compile or self.cuda_graphs):
            return 0.0
        t0 = time.perf_counter()
        for long in longs:
            for kind, T in kinds:
                self.step(ws, kind, 0, T, long, s)
        _sync(self.device)
        return time.perf_counter() - t0


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
    gen_kw = {k: kw.pop(k) for k in ("draft_skip", "lookahead", "compile", "cuda_graphs", "sync_every", "column_major",
                                     "kernels")
              if k in kw}
    return Generator(model, skip, **gen_kw).generate(prompts, max_new_tokens, **kw)


__all__ = ["Generator", "GenerationResult", "NonFiniteLogits", "Sampling", "TokenStream", "generate",
           "set_weight_layout", "check_request", "check_draft_skip", "sample", "logits_to_probs"]
