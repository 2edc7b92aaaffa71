#!/usr/bin/env python
"""Decode speed of phi3skip's generation: against transformers' generate and llama.cpp (the same model exported
as f32, q8_0, q4_1 and q4_0 GGUFs, beside phi3skip's fp32, int8 and int4 weights), per skip set against the ideal L/(L-k)
in each weight mode, the exported skip sets in llama.cpp against the
exported full model (`--only llama`), with self-speculative decoding, and the cost of each step shape that
decoding runs (`--only steps`: the multi-token verify against one decode step, and the speculative ceiling that
follows). Prints ratios. llama.cpp rows need `pip install -e ".[llama]"`.

CPU (default): the converted SmolLM2-135M-Instruct (or --model DIR), fp32, batch 1, greedy, the same prompt and
length for every engine; runs are alternated and medians reported.
    python benchmarks/bench_generate.py --threads 1
    python benchmarks/bench_generate.py --quick

GPU (--gpu): a Phi-3-mini-shaped random bf16 model built on the meta device, decode tokens/s as a fraction of
the memory-bandwidth limit (weight bytes read per token / bandwidth measured by a large device copy).
Self-contained (no download); --quick finishes in about two minutes on an H100.
    python benchmarks/bench_generate.py --gpu --quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from phi3skip import Phi3Config, Phi3ForCausalLM
from phi3skip.core.cli import ArgumentParser, Range, UserError, check_range, check_ranges, run_main
from phi3skip.core.machine import REPEATS, threads
from phi3skip.model.skipsets import LOOKAHEAD
from phi3skip.model.cost import kv_bytes, model_cost
from phi3skip.model.kernels import available as kernels_built
from phi3skip.model.quant import weight_bytes
from phi3skip.serve.generate import COMPILE_MODES, GenerationResult, Generator, set_weight_layout
from phi3skip.serve.sampling import Sampling

PHI3_MINI = dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                 rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                 torch_dtype="bfloat16")
PROMPT = "Write a short story about a robot who learns to paint, in five sentences."
# Self-speculative decoding is reported on both kinds of text the student is scored on.
PROMPTS = {"prose": PROMPT,
           "code": "Write a Python function that reads a CSV file and returns its rows as a list of dicts."}
SECTIONS = ("transformers", "skip", "llama", "speculative", "steps")
MODES = ("fp32", "int8", "int4")
# llama.cpp's GGUF types of each mode's weight bytes: q4_1 holds int4's very blocks (a scale and an offset each),
# q4_0 (a scale only) is llama.cpp's smallest, fastest 4-bit type
LLAMA_PEERS = {"fp32": ("f32",), "int8": ("q8_0",), "int4": ("q4_1", "q4_0")}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def section(name: str, fn: Callable[[], None], failures: list[str]) -> None:
    """Run one part of the benchmark; a failure is reported and the rest still runs."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        failures.append(f"{name}: {type(e).__name__}: {e}")
        print(f"  [{name}] FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=4)
    print(f"  [{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def candidate_layers(L: int, folder: Path | None = None) -> list[int]:
    """A trained student's order (skip.json), else the project's default skip order: L-2, L-4, ..."""
    from phi3skip.formats.checkpoints import read_skip_profile

    trained = read_skip_profile(folder).get("layers") if folder is not None else None
    return list(trained) if trained else list(range(L - 2, 0, -2))


# CPU: against transformers on the real model -----------------------------------------------------------------
def hf_decode_rate(hf, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """transformers' generate, greedy: tokens/s between the first and the last new token (timed by a logits
    processor, which runs once per step right after each forward)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0,
                      logits_processor=LogitsProcessorList([Stamp()]))  # explicit mask: id 0 may be in the prompt
    return (n - 1) / (stamps[-1] - stamps[0]), out[0, ids.shape[1]:].tolist()


def cpu(args: argparse.Namespace) -> None:
    from phi3skip import from_pretrained
    from phi3skip.data.chat import format_chat
    from phi3skip.data.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        folder = Path(args.model)
    else:
        import benchutil  # the converted SmolLM2, cached

        folder = benchutil.smollm2_dir()
    N = args.new_tokens or (32 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 3)
    positions = Phi3Config.from_json(folder / "config.json").max_position_embeddings
    check_range("--new-tokens", N, Range(1, positions - 1, note="the model's positions less a prompt token"))
    tok = load_tokenizer(folder)
    prompts = {kind: tok.encode(format_chat(text, tok, folder), add_special_tokens=False).ids
               for kind, text in PROMPTS.items()}
    ids = prompts["prose"]
    longest = max(map(len, prompts.values()))
    check_range("--new-tokens", N, Range(1, max(1, positions - longest),
                                         note=f"the model's positions less the {longest}-token prompt"))
    model = from_pretrained(folder, dtype=torch.float32)
    L = model.config.num_hidden_layers
    x = torch.tensor([ids])
    bw = read_bandwidth()
    wbytes = model_cost(model).weight_bytes
    limit = bw / wbytes
    print(f"CPU decode benchmark: {folder.name}, {L} layers, fp32, batch 1, greedy, prompt {len(ids)} tokens, "
          f"{N} new tokens, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of {rounds} "
          f"alternated runs", flush=True)
    print(f"  memory read bandwidth {bw / 1e9:.1f} GB/s; weights read per token "
          f"{wbytes / 1e6:.0f} MB -> limit {limit:.1f} tokens/s", flush=True)
    failures: list[str] = []
    rates: dict[str, list[float]] = {}
    results: dict[str, GenerationResult] = {}
    ref_tokens: list[int] = []

    def run(name: str, gen: Generator) -> None:
        r = gen.generate([ids], N)
        rates.setdefault(name, []).append(r.decode_tokens_per_s)
        results[name] = r

    def llama_ggufs(sets: list[tuple[int, ...]], outtypes: tuple[str, ...]) -> dict[tuple, Path]:
        """The model's skip sets exported as GGUFs for llama.cpp ({} when llama-cpp-python is not installed):
        plain sets as phi3, bypassed ones as deci (phi3skip.formats.export)."""
        import importlib.util
        import tempfile

        from phi3skip.formats.export import export

        if importlib.util.find_spec("llama_cpp") is None:
            print("  llama.cpp: not measured (pip install -e \".[llama]\")", flush=True)
            return {}
        tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
        return {(s, t): export(folder, skip=",".join(map(str, s)) or "none", gguf=tmp / f"{len(s)}-{t}.gguf",
                               outtype=t, warn=lambda m: None).gguf for s in sets for t in outtypes}

    quantized: dict[str, torch.nn.Module] = {"fp32": model}

    def of_mode(mode: str) -> torch.nn.Module:
        """The model in a weight mode: fp32 as loaded, int8/int4 quantized as read (phi3skip.model.quant)."""
        if mode not in quantized:
            quantized[mode] = from_pretrained(folder, dtype=torch.float32, quantize=mode)
        return quantized[mode]

    def vs_transformers() -> None:
        import transformers

        hf = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # both run exactly N tokens
        print(f"  transformers {transformers.__version__}", flush=True)
        compiled = () if args.no_compile or args.quick else COMPILE_MODES
        with torch.no_grad():
            hf_decode_rate(hf, x, 4)  # warm-up
            gens: dict[str, Generator] = {}
            for mode in args.modes:
                m = of_mode(mode)
                tag = "phi3skip" if mode == "fp32" else f"phi3skip {mode}"
                gens[tag] = Generator(m)
                run(tag, gens[tag])
                if mode == "fp32" and kernels_built():  # phi3skip's fp32 kernel beside MKL, on a second copy
                    own = "phi3skip, fp32 kernel"  # (a Generator sets its model's weight layout)
                    gens[own] = Generator(from_pretrained(folder, dtype=torch.float32), kernels=True)
                    run(own, gens[own])
                for c in compiled:
                    name = f"{tag} compile={c}"
                    gens[name] = Generator(m, compile=c)
                    run(name, gens[name])  # compiles
                    print(f"  {name}: compiled in {results[name].compile_s:.0f} s", flush=True)
            for name in gens:
                rates[name].clear()
            from phi3skip.eval.llamacpp import Decoder

            # the CPU peers, loaded and warmed up once: same model, prompt, length and threads
            peers = tuple(t for m in args.modes for t in LLAMA_PEERS[m])
            ggufs = {f"llama.cpp {t}": Decoder(p, ids, N, torch.get_num_threads())
                     for (_, t), p in llama_ggufs([()], peers).items()}
            for _ in range(rounds):
                r, toks = hf_decode_rate(hf, x, N)
                rates.setdefault("transformers", []).append(r)
                ref_tokens[:] = toks
                for name, g in gens.items():
                    run(name, g)
                for name, dec in ggufs.items():
                    rates.setdefault(name, []).append(dec.run())
            for dec in ggufs.values():
                dec.close()
        base = median(rates["transformers"])
        same = results["phi3skip"].tokens[0] == ref_tokens if "phi3skip" in results else None
        print(f"\nvs transformers' generate (fp32 phi3skip, same tokens: {'yes' if same else 'NO' if same is not None else '-'};"
              " llama.cpp: the model exported as a GGUF, its own kernels; int8/int4: weight-only, activations fp32)")
        for name in ["transformers", *gens, *ggufs]:
            m = median(rates[name])
            print(f"  {name:30s} {m:8.1f} tokens/s   {m / base:5.2f}x transformers   {m / limit:6.1%} of the fp32 "
                  f"bandwidth limit")
        if ggufs:
            print("\neach weight mode against its llama.cpp peer (phi3skip's fastest row of the mode, eager marked)")
            for mode in args.modes:
                tag = "phi3skip" if mode == "fp32" else f"phi3skip {mode}"
                rows = {n: median(rates[n]) for n in gens if n == tag or n.startswith(tag + " compile=")}
                best = max(rows, key=rows.get)
                wb = weight_bytes(of_mode(mode))  # what a decode step reads, at least: every weight once
                for t in LLAMA_PEERS[mode]:
                    peer = median(rates[f"llama.cpp {t}"])
                    print(f"  {mode:5s} {best:30s} {rows[best]:7.1f} tokens/s = {rows[best] / peer:5.2f}x llama.cpp {t} "
                          f"({peer:.1f}); eager {rows[tag] / peer:.2f}x; {wb / 1e6:.0f} MB of weights a token: "
                          f"{rows[best] * wb / bw:.0%} of the measured bandwidth")

    def skip_sets() -> None:
        cands = candidate_layers(L, folder)
        sets = [tuple(cands[:k]) for k in (1, 2, 4, 6) if k <= len(cands)]
        import benchutil

        for mode in args.modes:
            m = of_mode(mode)
            times = benchutil.decode_seconds(m, [(), *sets], ids, N, rounds)
            full = median(times[()])
            print(f"\nskip sets ({mode} weights, eager): speedup against the full model and against the ideal "
                  "L/(L-k)")
            for s in sets:
                t = median(times[s])
                ideal = L / (L - len(s))
                print(f"  skip {','.join(map(str, s)):22s} {1 / t:8.1f} tokens/s   speedup {full / t:5.3f}x   "
                      f"ideal {ideal:5.3f}x   {(full / t) / ideal:6.1%} of ideal")
            print(f"  (full model {1 / full:.1f} tokens/s; the embedding/lm_head cost does not shrink with k)")

    def llama_skip_sets() -> None:
        # The exported skip sets in llama.cpp (bypassed sets as deci blocks) against the exported full model, and
        # the ratio their weights' multiply-adds per token predict (llamacpp.weight_macs).
        from phi3skip.eval.llamacpp import decode_speeds, weight_macs

        cands = candidate_layers(L, folder)
        sets = [()] + [tuple(cands[:k]) for k in (1, 2, 4, 6) if k <= len(cands)]
        for t in (t for m in args.modes for t in LLAMA_PEERS[m]):
            paths = llama_ggufs(sets, (t,))
            if not paths:
                return
            speeds = decode_speeds(list(paths.values()), ids, N, torch.get_num_threads(), rounds)
            times = {s: [1 / r for r in sp.runs] for (s, _), sp in zip(paths, speeds)}
            full = median(times[()])
            print(f"\nllama.cpp {t}, {torch.get_num_threads()} thread(s): exported skip sets against the exported "
                  "full model; ideal = the full model's weight multiply-adds per token / the set's")
            for (s, _), path in list(paths.items())[1:]:
                tt, ideal = median(times[s]), weight_macs(paths[((), t)]) / weight_macs(path)
                print(f"  skip {','.join(map(str, s)):22s} {1 / tt:8.1f} tokens/s   speedup {full / tt:5.3f}x   "
                      f"ideal {ideal:5.3f}x   {(full / tt) / ideal:6.1%} of ideal")
            print(f"  (full model {1 / full:.1f} tokens/s)")

    def speculative() -> None:
        # Drafts: prefixes of the trained order (the student's bypasses run in them), several lookaheads, on a
        # code and a prose prompt; the verifier is the full model, greedy, so every output must equal plain's.
        cands = candidate_layers(L, folder)
        drafts = [tuple(cands[:k]) for k in args.draft_depths if k <= len(cands)]
        configs = [(d, k) for d in drafts for k in args.lookaheads]
        measured: dict[tuple, dict[str, tuple[float, float]]] = {}
        print("\nself-speculative decoding (verifier: the full model; greedy, so lossless)")
        for kind, p_ids in ((k, prompts[k]) for k in args.prompts):
            gens = {"plain": Generator(model)} | {c: Generator(model, draft_skip=c[0], lookahead=c[1]) for c in configs}
            times: dict = {}
            res: dict = {}
            with torch.no_grad():
                for _ in range(rounds):
                    for key, g in gens.items():
                        r = g.generate([p_ids], N)
                        times.setdefault(key, []).append(r.decode_s)
                        res[key] = r
            base = median(times["plain"])
            print(f"  {kind} prompt: plain {res['plain'].decode_tokens / base:.1f} tokens/s")
            for d, k in configs:
                r, t = res[(d, k)], median(times[(d, k)])
                same = r.tokens == res["plain"].tokens
                if not same:
                    failures.append(f"speculative {kind} draft {d} K={k}: output differs from plain greedy")
                measured.setdefault((d, k), {})[kind] = (base / t, r.acceptance_rate)
                print(f"  {kind:5s} draft skip {len(d)} ({','.join(map(str, d))}) K={k}   acceptance "
                      f"{r.acceptance_rate:6.1%}   {r.decode_tokens / t:6.1f} tokens/s   speedup {base / t:5.2f}x   "
                      f"same tokens as plain greedy: {'yes' if same else 'NO'}", flush=True)
        print("  (a round costs K c_draft + 1 forwards, memory-bound; with skip adapters the drafts run the bypasses)")
        (d, k), m = max(measured.items(), key=lambda kv: statistics.geometric_mean([v for v, _ in kv[1].values()]))
        print(f"  best (geometric mean over the prompts): draft skip {','.join(map(str, d))} K={k}: "
              + ", ".join(f"{kind} {v:.2f}x" for kind, (v, _) in m.items()))
        if args.record:
            record_speculative(folder, d, k, m, N)

    def step_costs() -> None:
        # One step of each shape speculative decoding runs, timed alone: on a CPU a multi-token verify is not
        # one forward's cost, which bounds any draft. Eager in both weight layouts, and compiled modes if asked;
        # engines alternated within each round.
        cands = candidate_layers(L, folder)
        drafts = [tuple(cands[:k]) for k in args.draft_depths if k <= len(cands)]
        Ks = sorted(args.lookaheads)
        P, reps = len(ids), 7 if args.quick else 15
        engines = [("eager, column-major", None, True), ("eager, row-major", None, False)] + \
            [(f"compile={mode}", mode, True) for mode in args.steps_compile]
        s = Sampling()
        ms: dict[tuple, list[float]] = {}
        runs = []  # (engine, kind, T, draft, generator, workspace)
        with torch.no_grad():
            for name, mode, column_major in engines:
                set_weight_layout(model, column_major)
                gens = [Generator(model, draft_skip=d, lookahead=max(Ks), compile=mode, column_major=column_major)
                        for d in drafts] or [Generator(model, compile=mode, column_major=column_major)]
                for d, g in zip(drafts or [None], gens):
                    ws = g.workspace(1, P + max(Ks) + 2, False)
                    ws.seq[0, :P] = torch.tensor(ids)
                    g.prefill(ws, P, False)
                    if g.draft_skip:
                        g.prefill(ws, P, False, kind="draft")
                    if g is gens[0]:
                        runs += [(name, "decode", 1, None, g, ws)] + [(name, "verify", k + 1, None, g, ws) for k in Ks]
                    if d:
                        runs.append((name, "draft", 1, d, g, ws))
            for r in range(reps + 2):  # the first two rounds compile and warm up
                for name, mode, column_major in engines:
                    set_weight_layout(model, column_major)
                    for e, kind, T, d, g, ws in runs:
                        if e == name:
                            t0 = time.perf_counter()
                            g.step(ws, kind, P, T, False, s)
                            if r >= 2:
                                ms.setdefault((e, kind, T, d), []).append(time.perf_counter() - t0)
        set_weight_layout(model, column_major=True)  # the Generator's layout on the CPU
        print(f"\nstep costs ({P}-token context, medians of {reps}): one decode step, and each step relative to it")
        base = median(ms[(engines[0][0], "decode", 1, None)])
        for name, _, _ in engines:
            one = median(ms[(name, "decode", 1, None)])
            cells = [f"verify {k + 1}: {median(ms[(name, 'verify', k + 1, None)]) / one:.2f}" for k in Ks]
            cells += [f"draft skip {len(d)}: {median(ms[(name, 'draft', 1, d)]) / one:.2f}" for d in drafts]
            print(f"  {name:22s} decode {one * 1e3:6.1f} ms ({base / one:.2f}x eager column-major) | "
                  + " | ".join(cells))
        print("  speculative, each engine against its own plain decoding: the speedup at 100% acceptance (K + 1 "
              "tokens for K draft steps and one verify), and the acceptance 1.0x and 1.3x need")
        for name, _, _ in engines:
            one = median(ms[(name, "decode", 1, None)])
            for d in drafts:
                c = median(ms[(name, "draft", 1, d)]) / one
                for k in Ks:
                    cost = k * c + median(ms[(name, "verify", k + 1, None)]) / one
                    need = [acceptance_for(x * cost, k) for x in (1.0, 1.3)]
                    print(f"    {name:22s} draft skip {len(d)} K={k}: round {cost:.2f} steps, ceiling "
                          f"{(k + 1) / cost:.2f}x, " + ", ".join(f"{x}x needs " + (f"{a:.0%}" if a is not None else
                                                                                   "more than 100%")
                                                                 for x, a in zip((1.0, 1.3), need)))

    for name, fn in (("transformers", vs_transformers), ("skip", skip_sets), ("llama", llama_skip_sets),
                     ("speculative", speculative), ("steps", step_costs)):
        if name in args.only:
            section(name, fn, failures)
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
        sys.exit(1)


def acceptance_for(tokens: float, k: int) -> float | None:
    """The acceptance rate a whose expected tokens per round, (1 - a^(k+1)) / (1 - a), reach `tokens` (None:
    beyond k + 1, unreachable)."""
    if tokens > k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if sum(a ** i for i in range(k + 1)) < tokens else (lo, a)
    return hi


def record_speculative(folder: Path, draft: tuple[int, ...], lookahead: int, measured: dict, tokens: int) -> None:
    """Write the fastest draft into the model's skip.json ("speculative"): generate.py --speculative's default."""
    from phi3skip.formats.checkpoints import read_skip_profile
    from phi3skip.core.paths import atomic_write_text

    profile = read_skip_profile(folder)
    if not profile:
        raise UserError(f"--record: {folder} has no skip.json to record into (a student made by train.py has one)")
    profile["speculative"] = {
        "draft_skip": list(draft), "lookahead": lookahead,
        "speedup": {kind: round(v, 3) for kind, (v, _) in measured.items()},
        "acceptance": {kind: round(a, 3) for kind, (_, a) in measured.items()},
        "measured": f"benchmarks/bench_generate.py --record: CPU, {torch.get_num_threads()} thread(s), greedy, batch 1, "
                    f"{tokens} new tokens, {time.strftime('%Y-%m-%d')}"}
    atomic_write_text(folder / "skip.json", json.dumps(profile, indent=2) + "\n")
    print(f"  recorded in {folder / 'skip.json'} (generate.py --speculative's default draft)")


def read_bandwidth(mib: int = 512) -> float:
    """Bytes/s of reading a large tensor once (a sum), with the current number of threads."""
    a = torch.ones(mib * 2**20 // 4)
    a.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / median(times)


# GPU: against the memory-bandwidth limit -----------------------------------------------------------------------
def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / median(times)


def build_random(config: dict, device: torch.device, dtype: torch.dtype) -> Phi3ForCausalLM:
    """A random model built on the meta device and materialised directly in `dtype` on `device`."""
    cfg = Phi3Config.from_dict(config)
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.rotary = type(model.rotary)(cfg).to(device)  # fp32 frequency tables, made for real
    return model.eval()


def gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise UserError("--gpu needs a CUDA device")
    device = torch.device("cuda")
    dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    N = args.new_tokens or (128 if args.quick else 512)
    rounds = args.rounds or (2 if args.quick else 3)
    # the random model's 16-token prompt, and the draft's lookahead, within its positions
    check_range("--new-tokens", N, Range(1, PHI3_MINI["max_position_embeddings"] - 16 - LOOKAHEAD.high - 1,
                                         note="the model's positions less the prompt and a draft's lookahead"))
    t_start = time.perf_counter()
    failures: list[str] = []
    rows: list[str] = []
    state: dict = {}

    def setup() -> None:
        state["bw"] = copy_bandwidth(device, 2.0 if args.quick else 4.0)
        t0 = time.perf_counter()
        state["model"] = build_random(PHI3_MINI, device, dtype)
        print(f"  built the random model in {time.perf_counter() - t0:.1f} s", flush=True)

    section("setup", setup, failures)
    if "model" not in state:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
        sys.exit(1)
    model, bw = state["model"], state.get("bw", float("nan"))
    L = model.config.num_hidden_layers
    ids = torch.randint(100, 32000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    wbytes = model_cost(model).weight_bytes
    limit = bw / wbytes
    print(f"GPU decode benchmark: {torch.cuda.get_device_name()}, torch {torch.__version__}; Phi-3-mini shape "
          f"({model.config.num_params() / 1e9:.2f}B params, bf16), batch 1, greedy, prompt {len(ids)}, "
          f"{N} new tokens, medians of {rounds} runs", flush=True)
    print(f"  copy bandwidth {bw / 1e12:.2f} TB/s; weights read per token {wbytes / 1e9:.2f} GB -> "
          f"limit {limit:.0f} tokens/s", flush=True)

    def measure(gen: Generator, n: int = N, r: int = rounds) -> tuple[float, GenerationResult]:
        first = gen.generate([ids], n)  # compiles / captures
        rates = [gen.generate([ids], n).decode_tokens_per_s for _ in range(r)]
        return median(rates), first

    def row(name: str, rate: float, gen: Generator, extra: str = "") -> None:
        max_len = -(-(len(ids) + N + (gen.lookahead + 1 if gen.draft_skip else 0)) // 64) * 64
        w = model_cost(model, gen.skip).weight_bytes
        # the static cache is attended over all its slots, masked: max_len keys a step, whatever the window
        kv = kv_bytes(model.config, len(gen.layers), max_len, gen.dtype.itemsize)
        frac = rate * w / bw
        frac_kv = rate * (w + kv) / bw
        line = (f"  {name:34s} {rate:8.1f} tokens/s   {frac:6.1%} of the bandwidth limit "
                f"({frac_kv:.1%} counting KV reads){extra}")
        rows.append(line)
        print(line, flush=True)

    def eager() -> None:
        g = Generator(model)
        rate, _ = measure(g, n=32, r=1)
        row("eager", rate, g)

    def compiled() -> None:
        g = Generator(model, compile="blocks")
        rate, first = measure(g)
        state["full_rate"] = rate
        row("compiled layers + CUDA graphs", rate, g, f"   (compile {first.compile_s:.0f} s)")

    def step_mode() -> None:
        g = Generator(model, compile="step")
        rate, first = measure(g)
        row("compiled step (reduce-overhead)", rate, g, f"   (compile {first.compile_s:.0f} s)")

    def skips() -> None:
        cands = candidate_layers(L)
        for k in ((2, 4) if args.quick else (2, 4, 8)):
            s = tuple(cands[:k])
            g = Generator(model, s, compile="blocks")
            rate, _ = measure(g)
            ideal = L / (L - k)
            sp = rate / state["full_rate"] if "full_rate" in state else float("nan")
            row(f"skip {','.join(map(str, s))}", rate, g,
                f"   speedup {sp:.3f}x, ideal {ideal:.3f}x ({sp / ideal:.0%})")

    def speculative() -> None:
        cands = candidate_layers(L)
        d = tuple(cands[:8])
        g = Generator(model, draft_skip=d, lookahead=4, compile="blocks")
        rate, first = measure(g, r=1)
        row(f"speculative, draft skip {len(d)} layers, K=4", rate, g,
            f"   acceptance {first.acceptance_rate:.1%} (random weights: not meaningful)")

    def quantized() -> None:
        # gpt-fast's route: weight-only int8 / int4 Linears (phi3skip.model.quant), the dequantizing product fused by
        # torch.compile; a second random model, quantized in place, so the bf16 rows above keep theirs.
        from phi3skip.model.quant import quantize_model, weight_bytes

        for mode in ("int8", "int4"):
            qm = quantize_model(build_random(PHI3_MINI, device, dtype), mode)
            g = Generator(qm, compile="blocks")
            rate, first = measure(g)
            wq = weight_bytes(qm)
            line = (f"  {mode + ' weights, compiled layers + CUDA graphs':34s} {rate:8.1f} tokens/s   "
                    f"{rate * wq / bw:6.1%} of the bandwidth limit of its {wq / 1e9:.2f} GB   "
                    f"{rate / state.get('full_rate', float('nan')):.2f}x bf16   (compile {first.compile_s:.0f} s)")
            rows.append(line)
            print(line, flush=True)
            del g, qm
            torch.cuda.empty_cache()

    section("eager", eager, failures)
    section("compiled", compiled, failures)
    if args.step:
        section("compiled step", step_mode, failures)
    section("skip sets", skips, failures)
    if not args.no_speculative:
        section("speculative", speculative, failures)
    if not args.no_quantized:
        section("quantized", quantized, failures)

    print(f"\n=== summary ({torch.cuda.get_device_name()}, {time.perf_counter() - t_start:.0f} s) ===")
    print(f"  bandwidth {bw / 1e12:.2f} TB/s, weights/token {wbytes / 1e9:.2f} GB, limit {limit:.0f} tokens/s "
          f"(target: compiled >= 70% of it)")
    for line in rows:
        print(line)
    if failures:
        print("FAILURES:\n  " + "\n  ".join(failures))
        sys.exit(1)


def parse_names(value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: use a comma-separated list of {', '.join(allowed)}")
    return names


def positive_ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: use positive integers separated by commas, e.g. 1,2,4")
    return out


# every numeric flag's range, checked before any work (--new-tokens' upper bound, the model's positions less the
# longest prompt, once the model's config and prompts are read)
NUMBERS = {"--new-tokens": Range(1), "--rounds": REPEATS, "--lookaheads": LOOKAHEAD,
           "--draft-depths": Range(1, 1024, note="prefixes of a trained order, no longer than a model's layers")}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="Phi-3-mini-shaped random bf16 model on CUDA")
    p.add_argument("--quick", action="store_true", help="fewer tokens and runs (~2 minutes on an H100)")
    p.add_argument("--model", help="CPU: checkpoint folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="CPU: skip the compiled row")
    p.add_argument("--step", action="store_true", help="GPU: also time whole-step compilation (slow to compile)")
    p.add_argument("--no-speculative", action="store_true", help="GPU: skip the speculative row")
    p.add_argument("--no-quantized", action="store_true", help="GPU: skip the int8 / int4 rows")
    p.add_argument("--only", type=lambda v: parse_names(v, SECTIONS), default=SECTIONS,
                   help=f"CPU: the sections to run, comma-separated, of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--modes", type=lambda v: parse_names(v, MODES), default=MODES,
                   help=f"CPU transformers/skip/llama sections: the weight modes, of {','.join(MODES)} (default: all); "
                        f"each beside its llama.cpp peers ({'; '.join(f'{k}: {chr(44).join(v)}' for k, v in LLAMA_PEERS.items())})")
    p.add_argument("--draft-depths", type=positive_ints, default=(1, 2, 4, 6),
                   help="CPU speculative: draft skip depths, prefixes of the trained order (default 1,2,4,6)")
    p.add_argument("--lookaheads", type=positive_ints, default=(1, 2, 3, 4),
                   help="CPU speculative: tokens drafted per round (default 1,2,3,4)")
    p.add_argument("--prompts", type=lambda v: parse_names(v, tuple(PROMPTS)), default=tuple(PROMPTS),
                   help=f"CPU speculative: the prompts, of {','.join(PROMPTS)} (default: both)")
    p.add_argument("--steps-compile", type=lambda v: parse_names(v, COMPILE_MODES), default=(),
                   help=f"CPU steps: also time the steps compiled in these modes, of {','.join(COMPILE_MODES)} "
                        f"(each step shape compiles once)")
    p.add_argument("--record", action="store_true",
                   help="CPU speculative: write the fastest draft and lookahead into --model's skip.json, the default "
                        "of generate.py --speculative")
    args = p.parse_args(argv)
    check_ranges(args, {**NUMBERS, "--threads": threads("CPU threads, this machine's CPUs")})
    (gpu if args.gpu else cpu)(args)


if __name__ == "__main__":
    run_main(main)
