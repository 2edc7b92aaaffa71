"""Write a small random Phi-3 checkpoint that shares another model's tokenizer (for smoke tests and --tiny demos).

    python scripts/random_model.py data/smollm2 data/tiny/model --layers 4 --hidden 64
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from phi3skip import Phi3ForCausalLM, load_config, save_pretrained  # noqa: E402
from phi3skip.cli import ArgumentParser, run_main  # noqa: E402
from phi3skip.io import resolve  # noqa: E402
from phi3skip.paths import check_apart, check_output  # noqa: E402


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("like", help="model folder whose tokenizer, vocabulary and token ids are kept")
    p.add_argument("out", help="output folder")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    check_output(args.out, "out", "folder", args.overwrite)
    like = resolve(args.like)
    check_apart(args.out, "out", {"like": like})
    cfg = load_config(like).replace(num_hidden_layers=args.layers, hidden_size=args.hidden,
                                    intermediate_size=2 * args.hidden, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, head_dim=None, torch_dtype="float32")
    torch.manual_seed(args.seed)
    model = Phi3ForCausalLM(cfg)
    model.init_weights()
    save_pretrained(model, args.out, tokenizer_from=like)
    print(f"wrote a random {args.layers}-layer Phi-3 model ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters) to {args.out}")


if __name__ == "__main__":
    run_main(main)
