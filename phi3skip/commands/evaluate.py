"""Measure the speed/quality knob: perplexity and decode speed of a student for each skip set.

    python scripts/evaluate.py --model data/llm_cache/student_model --teacher data/smollm2 --data data/stdlib \
        --text data/prose/python-docs.txt --skip-sets prefixes --out data/eval

Perplexity on val.bin (and on text files, tokenized on the fly) for the full model and each skip set, on the
same tokens for every set, with a 95% bootstrap interval; the teacher with the same layers skipped naively is
the baseline. Writes results.json, results.md and ppl_vs_speed.png to --out, and the measured profile into the
model folder's skip.json (under "evaluation").
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .. import from_pretrained, load_config
from ..core.cli import ArgumentParser, Range, UserError, check_range, check_ranges, run_main
from ..core.machine import check_memory, forward_bytes, held_tokens
from ..core.devices import dtype_name, pick_device, pick_dtype
from ..core.paths import atomic_write_text, check_apart, check_output, local, writable
from ..data.corpus import read_text_file
from ..data.tokenizer import check_data_tokenizer, eos_token_id, load_tokenizer
from ..data.tokens import eval_batches
from ..eval.evaluate import evaluate_skip_sets, markdown_table, plot, pyplot, val_batches
from ..formats.checkpoints import read_skip_profile, resolve
from ..model.quant import MODES as QUANT_MODES
from ..model.skipsets import default_layers, parse_skip_sets, validate_skip

# every numeric flag's range, checked before any work (--seq-len's and --speed-tokens' upper bounds, the model's
# positions, and --batch-size's, the memory one forward needs, once its config is read)
NUMBERS = {"--seq-len": Range(1), "--batch-size": Range(1), "--speed-tokens": Range(0)}
SPEED_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def read_texts(files: list[str]) -> dict[str, str]:
    """The --text files, by prepare.py's rule for text (UTF-8, not binary): checked before any model loads."""
    texts = {}
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"--text {f}: no such file")
        try:
            texts[f] = read_text_file(f)
        except UserError as e:
            raise UserError(f"--text {e}") from None
    return texts


def text_batches(texts: dict[str, str], model_dir: Path, batch_size: int, seq_len: int, max_tokens: int):
    """Text files tokenized with the model's tokenizer, documents separated by end-of-text, in windows."""
    tok = load_tokenizer(str(model_dir))
    eos = eos_token_id(tok, model_dir)
    ids: list[int] = []
    for text in texts.values():
        ids += tok.encode(text).ids + [eos]
    if len(ids) < seq_len + 1:
        raise UserError(f"--text {', '.join(texts)}: {len(ids)} tokens are too few for one window of {seq_len}+1 "
                        f"tokens; give a longer text or lower --seq-len")
    return list(eval_batches(np.asarray(ids, dtype=np.int64), batch_size, seq_len, max_tokens=max_tokens))


def speed_prompt(folder: Path) -> list[int]:
    return load_tokenizer(str(folder)).encode(SPEED_PROMPT).ids


def check_model_numbers(args, config, folder: Path) -> None:
    """The bounds the model sets, before it loads: windows and decoding within its positions, a batch's forward
    within the memory available."""
    positions = config.max_position_embeddings
    check_range("--seq-len", args.seq_len, Range(1, positions, note="the model's positions"))
    if args.speed_tokens:
        n = len(speed_prompt(folder))
        check_range("--speed-tokens", args.speed_tokens, Range(0, max(0, positions - n),
                                                               note=f"the model's positions less the {n}-token prompt"))
    check_memory("--batch-size", args.batch_size, forward_bytes(args.batch_size, args.seq_len, config.vocab_size,
                                                                config.hidden_size, config.intermediate_size),
                 f"a forward of {args.batch_size} windows of {args.seq_len} tokens")


def run(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="data/llm_cache/student_model", help="the student (folder or Hub id)")
    p.add_argument("--teacher", help="the original model, skipped naively as the baseline (default: skip.json's)")
    p.add_argument("--data", help="data folder made by prepare.py: its val.bin is scored")
    p.add_argument("--text", nargs="+", default=[], help="text files scored as well (e.g. documentation prose)")
    p.add_argument("--skip-sets", default="prefixes",
                   help="'prefixes' of skip.json's layers (default), or sets like '30,28;30;none'")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens scored per dataset (default 32768)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--speed-tokens", type=int, default=32, help="new tokens per decode-speed run (0: no speed)")
    p.add_argument("--out", help="results folder (default: <model>/eval)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda when available)")
    p.add_argument("--quantize", choices=list(QUANT_MODES), default=None,
                   help="score the student with weight-only int8 or int4 weights, as generate.py --quantize runs it "
                        "(the teacher stays as loaded); skip.json's evaluation is then left as it is")
    args = p.parse_args(argv)
    check_ranges(args, {**NUMBERS, "--max-tokens": held_tokens()})
    if not args.data and not args.text:
        raise UserError("nothing to score: give --data (a prepare.py folder) and/or --text FILES")
    if not args.no_plot:
        pyplot()  # fail now, not after the measurements
    texts = read_texts(args.text)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, "evaluate")

    t0 = time.perf_counter()
    folder = resolve(args.model)
    out = check_output(Path(args.out) if args.out else folder / "eval", "--out", "dir")
    config = load_config(folder)
    check_model_numbers(args, config, folder)
    profile = read_skip_profile(folder)
    teacher_src = args.teacher or profile.get("teacher")
    # The student's folder is kept, not only read: evaluate records into it (skip.json; <model>/eval by default).
    check_apart({"--out": out}, [("--teacher", local(teacher_src)), ("--data", args.data),
                                 *(("--text", t) for t in args.text)], {"--model": folder})
    # A local student gets the measured profile in its skip.json, when its folder can be written.
    record = Path(args.model).exists() and writable(folder) and not args.quantize
    student = from_pretrained(folder, dtype=dtype, device=device, quantize=args.quantize)
    teacher = from_pretrained(teacher_src, dtype=dtype, device=device) if teacher_src else None
    if teacher is not None and teacher.config.num_hidden_layers != student.config.num_hidden_layers:
        raise UserError(f"--teacher {teacher_src} has {teacher.config.num_hidden_layers} layers, the student "
                        f"{student.config.num_hidden_layers}: not the student's teacher")
    layers = profile.get("layers") or default_layers(student.config.num_hidden_layers)
    skip_sets = parse_skip_sets(args.skip_sets, layers)
    for s in skip_sets:  # every set checked before the first measurement
        validate_skip(s, student.config.num_hidden_layers)

    datasets = {}
    if args.data:
        check_data_tokenizer(args.data, folder)
        datasets[Path(args.data).name] = val_batches(Path(args.data) / "val.bin", args.batch_size, args.seq_len,
                                                     args.max_tokens, vocab_size=student.config.vocab_size)
    if args.text:
        datasets["text" if len(args.text) > 1 else Path(args.text[0]).stem] = text_batches(
            texts, folder, args.batch_size, args.seq_len, args.max_tokens)
    prompt = speed_prompt(folder) if args.speed_tokens else None
    n_tok = {k: sum(y.numel() for _, y in v) for k, v in datasets.items()}
    print(f"scoring {len(skip_sets)} skip sets on {', '.join(f'{k} ({v} tokens)' for k, v in n_tok.items())}"
          f"{' with the naive teacher baseline' if teacher else ''}", file=sys.stderr, flush=True)
    done = [0]

    def progress(line: str) -> None:
        done[0] += 1
        print(f"[{done[0]}/{len(skip_sets)}] {line}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    results = evaluate_skip_sets(student, datasets, skip_sets, teacher, prompt, args.speed_tokens, progress)

    summary = {"model": str(args.model), "teacher": teacher_src, "datasets": n_tok, "seq_len": args.seq_len,
               "device": str(device), "dtype": args.dtype or dtype_name(dtype), "quantize": args.quantize, "results": [r.to_dict() for r in results]}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    table = markdown_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    written = [out / "results.json", out / "results.md"]
    if not args.no_plot:
        written.append(plot(results, out / "ppl_vs_speed.png"))
    if record:
        profile["evaluation"] = {k: summary[k] for k in ("teacher", "datasets", "seq_len", "results")}
        atomic_write_text(folder / "skip.json", json.dumps(profile, indent=2) + "\n")
        written.append(folder / "skip.json")
    print(table)
    print(f"\nwrote {', '.join(map(str, written))}"
          + ("" if record or not Path(args.model).exists() else
             f" (skip.json unchanged: {'a quantized score' if args.quantize else f'{folder} is not writable'})"),
          file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-evaluate` and `python scripts/evaluate.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
