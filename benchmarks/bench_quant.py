#!/usr/bin/env python
"""What weight-only quantization costs in quality and buys in memory: perplexity of phi3skip's int8 and int4
against its fp32, and of llama.cpp's q8_0, q4_1 and q4_0 GGUFs (the same student exported) against llama.cpp's f32, on the
same held-out windows; and the peak resident memory of a decode in each mode, each in a fresh process.

    python benchmarks/bench_quant.py --model data/llm_cache/student_model --data data/stdlib data/prose
    python benchmarks/bench_quant.py --data data/stdlib --skip first:4 --no-memory

Targets (issue 30): int8 within 0.5% of fp32's perplexity; int4 no worse than llama.cpp's 4-bit rows; an int8 decode's
peak memory at most 0.4x fp32's. llama.cpp rows need `pip install -e ".[llama]"`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from phi3skip.core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from phi3skip.core.machine import threads

MODES = ("fp32", "int8", "int4")
LLAMA = {"fp32": "f32", "int8": "q8_0", "int4": "q4_1", "int4 (q4_0)": "q4_0"}  # q4_1: int4's own blocks
NUMBERS = {"--max-tokens": Range(64, 1 << 20, note="tokens scored per dataset"), "--seq-len": Range(8, 4096),
           "--memory-tokens": Range(1, 4096)}

# A decode in a fresh process: load (quantized as read), N tokens; its peak RSS in MiB on stdout. VmHWM, not
# ru_maxrss: ru_maxrss keeps the forking parent's peak across exec, and this parent holds three models.
MEMORY_PROBE = """
import sys, torch, phi3skip
from phi3skip.serve.generate import Generator
torch.set_num_threads(1)
folder, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode != "baseline":
    model = phi3skip.from_pretrained(folder, dtype=torch.float32, quantize=None if mode == "fp32" else mode)
    Generator(model).generate([[1, 2, 3, 4, 5, 6, 7, 8]], n)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""


def peak_rss_mib(folder: Path, mode: str, tokens: int) -> float:
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), mode, str(tokens)], capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"the {mode} memory probe failed: {r.stderr.strip().splitlines()[-1:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/llm_cache/student_model", help="the student folder")
    p.add_argument("--data", nargs="+", required=True, help="prepare.py folders whose val.bin is scored")
    p.add_argument("--skip", default="none", help="the skip set scored (layers, none or first:K; default none)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens scored per dataset (default 16384)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-tokens", type=int, default=64, help="tokens each memory probe decodes")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp's rows")
    args = p.parse_args(argv)
    check_ranges(args, {**NUMBERS, "--threads": threads()})

    from phi3skip import from_pretrained
    from phi3skip.eval.evaluate import perplexity_ci, val_batches
    from phi3skip.formats.checkpoints import read_skip_profile, resolve
    from phi3skip.model.config import Phi3Config
    from phi3skip.model.skipsets import parse_skip, validate_skip

    folder = resolve(args.model)
    config = Phi3Config.from_json(folder / "config.json")
    skip = tuple(validate_skip(parse_skip(args.skip, read_skip_profile(folder).get("layers") or []),
                               config.num_hidden_layers))
    for d in args.data:
        if not (Path(d) / "val.bin").is_file():
            raise UserError(f"--data {d}: no val.bin there (a folder made by prepare.py)")
    if args.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len}: beyond the model's {config.max_position_embeddings} positions")
    if args.memory_tokens + 8 > config.max_position_embeddings:  # the probe's prompt is 8 tokens
        raise UserError(f"--memory-tokens {args.memory_tokens}: with the 8-token prompt, beyond the model's "
                        f"{config.max_position_embeddings} positions")
    llama = not args.no_llama
    if llama:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("llama.cpp's rows need llama-cpp-python: pip install -e \".[llama]\", or pass --no-llama")
    torch.set_num_threads(args.threads)
    data = {Path(d).name: val_batches(Path(d) / "val.bin", 4, args.seq_len, args.max_tokens,
                                      vocab_size=config.vocab_size) for d in args.data}
    print(f"quantized quality: {folder}, skip {','.join(map(str, skip)) or 'none'}, "
          f"{', '.join(f'{k} {sum(y.numel() for _, y in v)} tokens' for k, v in data.items())}, "
          f"windows of {args.seq_len}", flush=True)
    ppl: dict[tuple[str, str], dict[str, float]] = {}
    for mode in MODES:
        model = from_pretrained(folder, dtype=torch.float32, quantize=None if mode == "fp32" else mode)
        ppl[("phi3skip", mode)] = {k: perplexity_ci(model, v, skip).ppl for k, v in data.items()}
        del model
        print(f"  phi3skip {mode}: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl[("phi3skip", mode)].items()),
              flush=True)
    if llama:
        from phi3skip.eval import llamacpp
        from phi3skip.formats.export import export

        with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
            for mode, t in LLAMA.items():
                gguf = export(folder, skip=",".join(map(str, skip)) or "none", gguf=Path(tmp) / f"{t}.gguf",
                              outtype=t, warn=lambda m: None).gguf
                ppl[("llama.cpp", mode)] = {
                    k: llamacpp.perplexity(gguf, torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in v]).tolist(),
                                           args.threads) for k, v in data.items()}
                print(f"  llama.cpp {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl[("llama.cpp", mode)].items()),
                      flush=True)
    print("\nperplexity, and against the same engine's full precision")
    for (engine, mode), vals in ppl.items():
        ref = ppl[(engine, "fp32")]
        name = f"{engine} {mode if engine == 'phi3skip' else LLAMA[mode]}"
        print(f"  {name:20s} " + "   ".join(f"{k} {v:8.4f} ({v / ref[k] - 1:+.2%})" for k, v in vals.items()))
    if llama:
        for mode in ("int4", "int4 (q4_0)"):
            print(f"  phi3skip int4 against llama.cpp {LLAMA[mode]}: " + ", ".join(
                f"{k} {ppl[('phi3skip', 'int4')][k] / ppl[('llama.cpp', mode)][k] - 1:+.2%}" for k in data))
    if not args.no_memory:
        base = peak_rss_mib(folder, "baseline", 1)
        rss = {m: peak_rss_mib(folder, m, args.memory_tokens) for m in MODES}
        print(f"\npeak resident memory of a {args.memory_tokens}-token decode in a fresh process (torch and phi3skip "
              f"imported alone: {base:.0f} MiB)")
        for m, v in rss.items():
            print(f"  {m:5s} {v:7.0f} MiB ({v / rss['fp32']:.2f}x fp32); above the imports {v - base:6.0f} MiB "
                  f"({(v - base) / (rss['fp32'] - base):.2f}x fp32)")
    print(json.dumps({"perplexity": {f"{e} {m}": v for (e, m), v in ppl.items()}}))


if __name__ == "__main__":
    run_main(main)
