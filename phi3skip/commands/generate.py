"""Generate text with chosen decoder layers skipped, or with lossless self-speculative decoding.

    python scripts/generate.py --model DIR_OR_HUB_ID --skip 30,28 --prompt "The capital of France is"
    python scripts/generate.py --model DIR --chat --prompt "Write a haiku about rain" --temperature 0.7 --top-p 0.9
    python scripts/generate.py --model DIR --skip none --speculative --draft-skip 30,28,26,24 --lookahead 4
    echo "Once upon a time" | python scripts/generate.py --model DIR --max-new-tokens 64
    python scripts/generate.py --model DIR --show-skips

Prompts come from --prompt (repeatable), --prompt-file (a text file is one prompt, a .jsonl file one prompt
per line: a JSON string or {"prompt": ...}; "-" is stdin) or stdin. Several prompts run as one left-padded
batch (speculative decoding runs them one by one). Text streams to stdout; one summary line goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.cli import ArgumentParser, Range, UserError, check_range, check_ranges, run_main
from ..core.machine import SEED
from ..formats import checkpoints
from ..model.quant import MODES as QUANT_MODES
from ..model.skipsets import LOOKAHEAD, default_draft_skip, measured_speculative, parse_skip
from ..serve.generate import COMPILE_MODES


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts: list[str] = list(args.prompt or [])
    for name in args.prompt_file or []:
        if name == "-":
            prompts.append(sys.stdin.read())
            continue
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--prompt-file {name}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {name}: cannot read it as UTF-8 text ({e})") from None
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{name}:{n}: not JSON ({e.msg})") from None
                if isinstance(obj, dict):
                    obj = obj.get("prompt")
                if not isinstance(obj, str):
                    raise UserError(f"{name}:{n}: expected a JSON string or an object with a \"prompt\" string")
                prompts.append(obj)
        else:
            prompts.append(text)
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
        prompts.append(sys.stdin.read())
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UserError(f"{'the prompt' if len(prompts) == 1 else f'prompt {i + 1}'} is empty")
    return prompts


def model_folder(src: str) -> Path:
    """A local folder, else a Hub repo id (from the local Hugging Face cache when the Hub is unreachable)."""
    return checkpoints.resolve(src)


def show_skips(folder: Path, model: str) -> None:
    """The trained skip sets, one short table: what each costs in quality, gains in speed, and how to export it."""
    from ..formats.export import serving_table
    from ..model.config import Phi3Config

    obj = checkpoints.read_skip_profile(folder)
    if not obj:
        raise UserError(f"{folder}: no skip.json (it is written by train.py and updated by scripts/evaluate.py)")
    num_layers = Phi3Config.from_json(folder / "config.json").num_hidden_layers
    order = obj.get("layers")
    print(f"{model}: skippable layers in skip order {', '.join(map(str, order)) if isinstance(order, list) else 'none'}"
          f"; teacher {obj.get('teacher', 'unknown')}; every figure from {folder / 'skip.json'}")
    print(serving_table(obj, num_layers, model))
    if not obj.get("evaluation"):
        print("(no evaluate.py measurements yet: python scripts/evaluate.py --model "
              f"{model} --data DIR adds perplexity on held-out text and decode speed)")


def profile_of(folder: Path) -> dict:
    """skip.json ({} when there is none); a damaged one is one line naming its field, as in every command (it was
    read as {} here, and `--skip first:K` then said the student had no trained order)."""
    return checkpoints.read_skip_profile(folder)


def trained_order(folder: Path) -> list[int]:
    """skip.json's trained order ([] when there is none; its fields are checked where it is read)."""
    return list(profile_of(folder).get("layers") or [])


# every numeric flag's range, checked before any work
# (--top-k's upper bound, the vocabulary, once the config is read; --max-new-tokens', the model's positions less
# the prompt, by check_request once the prompt is tokenized, before the weights load)
NUMBERS = {"--max-new-tokens": Range(1), "--lookahead": LOOKAHEAD,
           "--temperature": Range(0, 100, note="above 100 sampling is uniform to float32's precision"),
           "--top-k": Range(1), "--top-p": Range(0.0, 1.0, above=True), "--seed": SEED}


def run(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/llm_cache/student_model",
                   help="checkpoint folder or Hub repo id (default: train.py's output, data/llm_cache/student_model)")
    p.add_argument("--skip", default="none", help="layers to skip, e.g. 30,28, or first:K (the first K of the "
                                                  "student's trained order, see --show-skips); default none")
    p.add_argument("--show-skips", action="store_true", help="print a table of the trained skip sets (quality, speed, export command) and exit")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append",
                   help="a text file (one prompt) or .jsonl (one prompt per line); - reads stdin")
    p.add_argument("--chat", action="store_true", help="apply the model's chat format (and stop on its stop tokens)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop on stop tokens (fixed-length runs)")
    p.add_argument("--compile", nargs="?", const="blocks", choices=list(COMPILE_MODES), default=None,
                   help="torch.compile the decode step: blocks (default; CUDA graphs on CUDA) or step "
                        "(whole step, mode reduce-overhead on CUDA; the fastest on the CPU)")
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding (lossless)")
    p.add_argument("--draft-skip", default=None,
                   help="layers the draft skips, including those of --skip (default: --skip plus skip.json's "
                        "layers, else every other layer of the upper half)")
    p.add_argument("--lookahead", type=int, default=None,
                   help=f"tokens drafted per round, {LOOKAHEAD.low}..{LOOKAHEAD.high} (default: skip.json's measured "
                        f"best, else 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, the "
                                                 "checkpoint's dtype on CUDA)")
    p.add_argument("--quantize", choices=list(QUANT_MODES), default=None,
                   help="weight-only int8 (a scale per output channel) or int4 (blocks of 32, q4_0's layout), "
                        "quantized as the weights load; activations stay in --dtype; any --skip")
    args = p.parse_args(argv)

    check_ranges(args, NUMBERS)
    if args.draft_skip is not None and not args.speculative:
        raise UserError("--draft-skip needs --speculative")
    folder = model_folder(args.model)
    trained = trained_order(folder)
    skip = parse_skip(args.skip, trained)
    if args.show_skips:
        show_skips(folder, args.model)
        return

    from ..core.devices import pick_device, pick_dtype
    from ..data import chat
    from ..data.tokenizer import load_tokenizer
    from ..formats.checkpoints import from_pretrained
    from ..model.config import Phi3Config
    from ..model.skipsets import check_draft_skip, untrained, validate_skip
    from ..serve.generate import Generator, Sampling, check_request

    config = Phi3Config.from_json(folder / "config.json")
    L = config.num_hidden_layers
    skip_set = validate_skip(skip, L)  # checked once: the Generator and its steps take it as it is
    check_range("--top-k", args.top_k, Range(1, config.vocab_size, note="the model's vocabulary"))
    if untrained(skip, trained) and trained:
        print(f"note: --skip names layer(s) {','.join(map(str, untrained(skip, trained)))} that the student was not "
              f"trained to skip (its order: {','.join(map(str, trained))}); expect the naive skip's quality",
              file=sys.stderr)
    draft_skip, lookahead = None, args.lookahead or 4
    if args.speculative:
        best, best_k, speedup = measured_speculative(profile_of(folder))
        if args.draft_skip is not None:
            draft_skip = parse_skip(args.draft_skip, trained, "--draft-skip")
        elif set(skip) < set(best):  # the measured draft serves this verifier: it and its lookahead are the default
            draft_skip, lookahead = best, args.lookahead or best_k
            if speedup and max(speedup.values()) < 1:
                print(f"note: skip.json's best measured draft ran at "
                      f"{', '.join(f'{v:.2f}x ({k})' for k, v in speedup.items())} of plain decoding where it was "
                      f"measured: plain decoding is faster there", file=sys.stderr)
        else:
            draft_skip = default_draft_skip(trained, skip, L)
        draft_skip = check_draft_skip(skip_set, draft_skip, L, lookahead)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, "generate", config.torch_dtype)

    tok = load_tokenizer(folder)
    texts = read_prompts(args)
    if args.chat:
        texts = [chat.format_chat(t, tok, folder, args.system) for t in texts]
    prompts = [chat.encode_prompt(t, tok, chat=args.chat) for t in texts]
    stop = [] if args.ignore_eos else chat.stop_token_ids(folder, config, tok)
    longest = max(map(len, prompts))
    check_range("--max-new-tokens", args.max_new_tokens, Range(1, max(1, config.max_position_embeddings - longest),
                                                               note=f"the model's positions less the {longest}-token "
                                                                    f"prompt"))
    check_request(config, prompts, args.max_new_tokens)  # bad lengths fail before the weights load

    model = from_pretrained(folder, dtype=dtype, device=device, quantize=args.quantize)
    gen = Generator(model, skip_set, draft_skip=draft_skip, lookahead=lookahead, compile=args.compile)

    batch = len(prompts) > 1
    decoders = [chat.StreamDecoder(tok) for _ in prompts]

    def on_tokens(row: int, ids: list[int]) -> None:
        if not batch:
            sys.stdout.write(decoders[0].push(ids))
            sys.stdout.flush()
        else:
            decoders[row].push(ids)

    result = gen.generate(prompts, args.max_new_tokens, sampling, stop_ids=stop, on_tokens=on_tokens, seed=args.seed)
    if batch:
        for i, d in enumerate(decoders):
            print(f"==> prompt {i + 1} <==")
            print(chat.decode_skipping(tok, d.ids))
    else:
        sys.stdout.write(decoders[0].flush() + "\n")
    sys.stdout.flush()
    print(result.summary(), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-generate` and `python scripts/generate.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
