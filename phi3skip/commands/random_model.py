"""Write a small random Phi-3 checkpoint that shares another model's tokenizer (for smoke tests and --tiny demos).

    python scripts/random_model.py data/smollm2 data/tiny/model --layers 4 --hidden 64
"""
from __future__ import annotations

import torch

from .. import Phi3ForCausalLM, load_config, save_pretrained
from ..core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from ..core.machine import SEED, check_memory
from ..core.paths import check_apart, check_output
from ..formats.checkpoints import resolve


def run(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("like", help="model folder whose tokenizer, vocabulary and token ids are kept")
    p.add_argument("out", help="output folder")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    check_ranges(args, {"--layers": Range(1, 1024), "--hidden": Range(1, 65536), "--heads": Range(1, args.hidden,
                        note="--hidden"), "--kv-heads": Range(1, args.heads, note="--heads"), "--seed": SEED})
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads} must divide --hidden {args.hidden}, and --kv-heads {args.kv_heads} "
                        f"must divide --heads")
    check_output(args.out, "out", "folder", args.overwrite)
    like = resolve(args.like)
    check_apart({"out": args.out}, {"like": like})
    cfg = load_config(like).replace(num_hidden_layers=args.layers, hidden_size=args.hidden,
                                    intermediate_size=2 * args.hidden, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, head_dim=None, torch_dtype="float32")
    # fp32 weights, built and then saved (a copy): embeddings and head, and per layer attention (4 H^2 at most)
    # and the MLP (3 H x 2H)
    params = 2 * cfg.vocab_size * args.hidden + args.layers * 10 * args.hidden ** 2
    check_memory("--layers/--hidden", f"{args.layers}/{args.hidden}", 2 * 4 * params,
                 f"a random model of {params:,} parameters")
    torch.manual_seed(args.seed)
    model = Phi3ForCausalLM(cfg)
    model.init_weights()
    save_pretrained(model, args.out, tokenizer_from=like)
    print(f"wrote a random {args.layers}-layer Phi-3 model ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters) to {args.out}")


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-random-model` and `python scripts/random_model.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
