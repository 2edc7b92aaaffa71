"""Run an exported GGUF in llama.cpp beside the student it came from: perplexity on held-out tokens against
phi3skip's own for the same skip set, and decode speed against another GGUF (the exported full model) with the
ratio their per-token work predicts.

    python scripts/check_gguf.py --model data/llm_cache/student_model --num-skip 4 --gguf skip4.gguf \
        --data data/stdlib --against full.gguf

Needs llama.cpp's Python binding (`pip install -e ".[llama]"`: it builds llama.cpp, ~5 minutes on 2 cores).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import from_pretrained, load_config
from ..core.cli import ArgumentParser, Range, UserError, check_range, check_ranges, run_main
from ..core.machine import REPEATS, held_tokens, threads
from ..data.tokenizer import check_data_tokenizer, load_tokenizer
from ..eval import llamacpp
from ..eval.evaluate import val_batches
from ..formats.checkpoints import read_skip_profile, resolve
from ..formats import deci
from ..formats.export import choose_skip
from .evaluate import SPEED_PROMPT, read_texts, text_batches

# every numeric flag's range, checked before any work (--seq-len's and --speed-tokens' upper bounds, the model's
# positions, once its config is read; --num-skip's, skip.json's order, by export.choose_skip)
NUMBERS = {"--seq-len": Range(1), "--speed-tokens": Range(0), "--repeats": REPEATS}


def numbers() -> dict[str, Range]:
    """NUMBERS with the bounds this machine sets: threads against its CPUs, tokens against its free memory."""
    return {**NUMBERS, "--max-tokens": held_tokens(), "--threads": threads("llama.cpp threads, this machine's CPUs")}


def run(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="data/llm_cache/student_model", help="the student the GGUF was exported from")
    p.add_argument("--skip", help="the skip set the GGUF holds, e.g. 14,13 or first:2 (as scripts/export.py took it)")
    p.add_argument("--num-skip", type=int, help="... or the first K layers of skip.json's trained order")
    p.add_argument("--gguf", required=True, help="the exported GGUF to run")
    p.add_argument("--data", help="data folder made by prepare.py: its val.bin is scored")
    p.add_argument("--text", help="... or a text file, tokenized with the student's tokenizer")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens scored (default 2048)")
    p.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    p.add_argument("--against", help="a GGUF to time decoding against (the exported full model)")
    p.add_argument("--speed-tokens", type=int, default=64, help="new tokens per decode run (default 64; 0: none)")
    p.add_argument("--repeats", type=int, default=3, help="decode runs of each GGUF, alternated (default 3)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    args = p.parse_args(argv)
    if (args.data is None) == (args.text is None):
        raise UserError("give one of --data (a prepare.py folder) or --text FILE: the held-out tokens to score")
    check_ranges(args, numbers())
    for flag, path in (("--gguf", args.gguf), ("--against", args.against)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    llamacpp.require()  # before any model loads
    texts = read_texts([args.text]) if args.text else {}
    folder = resolve(args.model)
    config = load_config(folder)
    # llama.cpp runs neither Phi-3's sliding window nor, past it, the same attention: windows stay inside it
    window = min(config.max_position_embeddings, config.sliding_window or config.max_position_embeddings)
    check_range("--seq-len", args.seq_len, Range(1, window, note="the model's sliding window, which llama.cpp does not "
                                                               "run" if window < config.max_position_embeddings else
                                                 "the model's positions"))
    prompt = load_tokenizer(str(folder)).encode(SPEED_PROMPT).ids
    if args.against:  # llama.cpp's context holds the prompt, the new tokens and one more: no more than the model's
        check_range("--speed-tokens", args.speed_tokens, Range(0, max(0, config.max_position_embeddings - len(prompt)
                                                                      - 1), note=f"the model's positions less the "
                                                                                 f"{len(prompt)}-token prompt"))
    skip = choose_skip(read_skip_profile(folder), config.num_hidden_layers, args.skip, args.num_skip)
    if args.data:
        check_data_tokenizer(args.data, folder)
    student = from_pretrained(folder, dtype="float32")
    llamacpp.check_shape(args.gguf, config, skip, deci.bypassed(student, skip))
    if args.against:
        llamacpp.check_shape(args.against, config, None)  # another export of the same student
    if args.data:
        batches = val_batches(Path(args.data) / "val.bin", 4, args.seq_len, args.max_tokens,
                              vocab_size=config.vocab_size)
    else:
        batches = text_batches(texts, folder, 4, args.seq_len, args.max_tokens)
    res = llamacpp.check(student, skip, args.gguf, batches, args.against, prompt,
                         args.speed_tokens if args.against else 0, args.threads, args.repeats)
    shown = ",".join(map(str, skip)) or "none"
    for line in res.lines(f"{Path(args.gguf).name} (skip {shown})", Path(args.against).name if args.against else None):
        print(line, flush=True)
    if args.against is None and args.speed_tokens:
        print("(no --against GGUF: decode speed not measured)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-check-gguf` and `python scripts/check_gguf.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
