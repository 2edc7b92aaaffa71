"""Export a skip set of the student for other engines: a checkpoint folder and/or a GGUF.

    python scripts/export.py --model data/llm_cache/student_model --skip 28,26 --out exported/ [--dtype bfloat16]
    python scripts/export.py --num-skip 2 --out exported/ --gguf exported.gguf --outtype q8_0
    python scripts/export.py --model DIR --skip 28,26 --gguf model-f32.gguf          # the GGUF alone

Layers skipped without a bypass are removed and the rest renumbered: a Phi3ForCausalLM that transformers, vLLM,
TGI (the folder) and llama.cpp or Ollama (the GGUF) run exactly as `model(x, skip=...)` runs in phi3skip. Layers
that run a trained bypass become blocks of llama.cpp's deci architecture (a linear attention with no KV cache, then
the bypass's FFN), which llama.cpp runs exactly (the folder has NVIDIA's Nemotron-NAS layout). The folder carries
the tokenizer, generation config and a model card (README.md) naming the engines and the measured perplexity of
that skip set from skip.json. --skip defaults to the first --num-skip K layers of skip.json's trained order;
another set is allowed, with a warning that says what its quality was measured to be (or that it never was).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..core.cli import ArgumentParser, Range, UserError, check_range, run_main

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")  # phi3skip.formats.gguf_writer.OUTTYPES, without importing torch for --help


def run(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/llm_cache/student_model",
                   help="the student: checkpoint folder or Hub repo id (default: train.py's output)")
    p.add_argument("--skip", help="layers to remove, e.g. 28,26 (default: --num-skip K of skip.json's trained order)")
    p.add_argument("--num-skip", type=int, help="remove the first K layers of skip.json's trained order")
    p.add_argument("--out", help="the checkpoint folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights of the export (default: the student's own)")
    p.add_argument("--gguf", help="also (or only) write this GGUF file, for llama.cpp / Ollama (needs `pip install gguf`)")
    p.add_argument("--outtype", choices=OUTTYPES,
                   help="GGUF tensor type (default: the one that holds the exported weights exactly: f32, bf16, f16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and --gguf if they exist")
    args = p.parse_args(argv)
    check_range("--num-skip", args.num_skip, Range(1))  # its upper bound, skip.json's order, before the model loads
    if args.outtype and not args.gguf:
        raise UserError("--outtype needs --gguf FILE")

    from ..formats.export import export

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    command = "python scripts/export.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = export(args.model, skip=args.skip, num_skip=args.num_skip, out=args.out, dtype=args.dtype, gguf=args.gguf,
                 outtype=args.outtype, overwrite=args.overwrite, command=command, warn=warn)
    if res.slots is None:
        L = res.config.num_hidden_layers
        what = f"{L} of {L + len(res.skip)} layers (removed {','.join(map(str, res.skip)) or 'none'})"
    else:
        bypassed = [s.layer for s in res.slots if s.bypass]
        removed = [i for i in res.skip if i not in bypassed]
        what = (f"{len(res.slots)} blocks, layers {','.join(map(str, bypassed))} as bypass blocks (deci)"
                + (f", {','.join(map(str, removed))} removed" if removed else ""))
    for path in (res.folder, res.gguf):
        if path is not None:
            files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix == ".safetensors"]
            size = sum(f.stat().st_size for f in files) / 2**20
            print(f"wrote {path}: {what}, {size:.0f} MiB of weights")
    print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-export` and `python scripts/export.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
