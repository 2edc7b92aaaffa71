"""Rank a model's layers by importance on a validation sample, and recommend a skip order.

    python scripts/rank_layers.py --model data/smollm2 --data data/stdlib [--max-tokens 16384] [--json out.json]
    python scripts/rank_layers.py --model data/smollm2 --data data/stdlib --greedy 6 --max-tokens 4096

For each layer: the perplexity when that layer alone is skipped, its increase over the full model, and block
influence (1 - cosine between the block's input and output), least important first. `--greedy K` also builds
the conditional order that `train.py --layers auto` trains: each next layer the one whose skipping adds the
least KL given those already skipped (layers interact, so it beats the one-at-a-time ranking at every depth).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import from_pretrained, load_config
from ..core.cli import ArgumentParser, Range, check_ranges, run_main
from ..core.devices import pick_device, pick_dtype
from ..core.machine import check_memory, forward_bytes, held_tokens
from ..core.paths import atomic_write_text, check_apart, check_output, local
from ..data.tokenizer import check_data_tokenizer
from ..eval.evaluate import val_batches
from ..eval.importance import format_table, greedy_order, rank_layers, recommended_order
from ..model.skipsets import SHORTLIST

# every numeric flag's range, checked before any work (upper bounds from the model's config, once it is read)
NUMBERS = {"--seq-len": Range(1), "--batch-size": Range(1), "--num-skip": Range(1),
           "--greedy": Range(0), "--shortlist": Range(0)}


def run(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hub id or checkpoint folder")
    p.add_argument("--data", required=True, help="data folder made by prepare.py (its val.bin is used)")
    p.add_argument("--max-tokens", type=int, default=16384, help="validation tokens to score (default 16384)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-skip", type=int, default=None, help="how many layers to recommend (default: all)")
    p.add_argument("--greedy", type=int, default=0, metavar="K",
                   help="also the greedy conditional order of K layers (what train.py --layers auto uses)")
    p.add_argument("--shortlist", type=int, default=None,
                   help=f"--greedy: after the first pick, re-score only the N layers that added the least KL when "
                        f"last scored (default {SHORTLIST}, as train.py --rank-shortlist; 0: every layer every pick)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda when available)")
    p.add_argument("--json", help="write the ranking here as JSON")
    args = p.parse_args(argv)
    check_ranges(args, {**NUMBERS, "--max-tokens": held_tokens()})
    if args.json:
        check_output(args.json, "--json", "file")
        check_apart({"--json": args.json}, {"--model": local(args.model), "--data": args.data})
    config = load_config(args.model)  # the ranges that depend on the model, before it loads
    L = config.num_hidden_layers
    check_ranges(args, {"--seq-len": Range(1, config.max_position_embeddings, note="the model's positions"),
                        "--num-skip": Range(1, L, note="the model's layers"),
                        "--greedy": Range(0, L, note="the model's layers; 0: none"),
                        "--shortlist": Range(0, L, note="the model's layers; 0: every layer")})
    shortlist = min(SHORTLIST, L) if args.shortlist is None else args.shortlist
    check_memory("--batch-size", args.batch_size, forward_bytes(args.batch_size, args.seq_len, config.vocab_size,
                                                                config.hidden_size, config.intermediate_size),
                 f"a forward of {args.batch_size} windows of {args.seq_len} tokens")

    device = pick_device(args.device)
    model = from_pretrained(args.model, dtype=pick_dtype(args.dtype, device, "rank_layers"), device=device)
    meta = check_data_tokenizer(args.data, model.source_dir)
    batches = val_batches(Path(args.data) / "val.bin", args.batch_size, args.seq_len, args.max_tokens,
                          vocab_size=meta.get("vocab_size"))
    n = model.config.num_hidden_layers
    print(f"scoring {n} layers on {sum(x.numel() for x, _ in batches)} tokens of {args.data}/val.bin",
          file=sys.stderr)
    full, ranking = rank_layers(model, batches, progress=lambda i: print(f"  layer {i} done", file=sys.stderr))
    order = recommended_order(ranking, args.num_skip)
    print(format_table(full, ranking))
    greedy = []
    if args.greedy:
        greedy = greedy_order(model, batches, args.greedy, shortlist=shortlist or None,
                              progress=lambda b: print(f"  greedy: + layer {b[0]} (KL {b[1]:.4f})", file=sys.stderr))
        print("\n| k | layer added | KL(full || skipping the first k) |\n|---|---|---|")
        for k, (layer, kl) in enumerate(greedy, 1):
            print(f"| {k} | {layer} | {kl:.4f} |")
        order = [layer for layer, _ in greedy]
    print(f"\nrecommended skip order: --layers {','.join(map(str, order))}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": str(args.model), "full_ppl": full,
                                                 "ranking": [r.to_dict() for r in ranking],
                                                 "greedy": [{"layer": la, "kl": kl} for la, kl in greedy],
                                                 "recommended": order}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """`phi3skip-rank-layers` and `python scripts/rank_layers.py`: a mistake is one line on stderr and exit code 2."""
    run_main(lambda: run(argv))


if __name__ == "__main__":
    main()
