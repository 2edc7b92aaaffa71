"""Run one training recipe at the demo's budget and append its row to docs/quality.md.

    python benchmarks/quality.py --name "adapters, sandwich" -- --train-scope adapters --k-dist sandwich \
        --layers auto --num-skip 6 --max-steps 120 --lr 1e-3
    python benchmarks/quality.py --name "greedy order, bypass least squares, no training" --no-train \
        --layers auto --num-skip 6

Everything after `--` goes to train.py on top of the demo's settings (teacher data/smollm2, data data/stdlib,
nested schedule, 4 x 256 tokens a step); `--no-train` builds the student without training (the candidate order,
and least-squares bypasses when --lsq-tokens > 0). Each run is scored the same way: perplexity on 8,192 held-out
tokens of the training corpus (val.bin, code: the selection metric) and of the Python docs (prose: a report),
windows of 256, for the full student and each prefix of its trained order, as a ratio to the teacher.
Wall-clock is train.py's whole run (order ranking, least squares and evaluations included), on this machine as
it was: the row says whether anything else ran.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from phi3skip import bypass, from_pretrained
from phi3skip.data import Batches, eval_batches
from phi3skip.evaluate import perplexity_ci, val_batches
from phi3skip.importance import greedy_order
from phi3skip.io import atomic_write_text, read_skip_profile, save_pretrained
from phi3skip.skipsets import parse_layers, skip_prefixes
from phi3skip.tokenizer import load_tokenizer

DEMO = ["--schedule", "nested", "--batch-size", "4", "--max-seq-len", "256", "--eval-tokens", "4096",
        "--eval-every", "0", "--log-every", "10"]
TABLE = ROOT / "docs" / "quality.md"
DEPTHS = 9  # columns k = 0..8
HEADER = """# Quality of skipped inference: recipes tried

One row per run of `benchmarks/quality.py` (its docstring says how each is scored). Ratios are student
perplexity / teacher perplexity on held-out text, code (stdlib val.bin, the selection metric) / prose (Python
docs, a report only), at skip depth k = a prefix of the run's trained order. Teacher: SmolLM2-135M-Instruct
(30 layers) converted to Phi-3. Wall-clock: the whole train.py run on 2 CPU cores.

| run | recipe | order | train tokens | wall-clock | k=0 | k=1 | k=2 | k=3 | k=4 | k=5 | k=6 | k=7 | k=8 | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def scoring_sets(teacher_dir: Path, data: Path, prose: Path, tokens: int = 8192) -> dict[str, list]:
    tok = load_tokenizer(str(teacher_dir))
    ids = np.asarray(tok.encode(prose.read_text(encoding="utf-8")).ids, dtype=np.int64)
    return {"code": val_batches(data / "val.bin", 4, 256, tokens),
            "prose": list(eval_batches(ids, 4, 256, max_tokens=tokens))}


def build_untrained(args, teacher_dir: Path, out: Path, extra: list[str]) -> None:
    """--no-train: the teacher with a candidate order (and least-squares bypasses), saved like a student."""
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default=None)
    p.add_argument("--num-skip", type=int, default=None)
    p.add_argument("--rank-tokens", type=int, default=1024)
    p.add_argument("--lsq-tokens", type=int, default=0)
    p.add_argument("--lsq-check-tokens", type=int, default=2048)
    p.add_argument("--adapter-rank", type=int, default=None)
    p.add_argument("--adapter-mlp", type=int, default=None)
    p.add_argument("--rank-fit-tokens", type=int, default=0,
                   help="greedy order scored with least-squares bypasses fitted on this many other train tokens")
    a = p.parse_args(extra)
    model = from_pretrained(teacher_dir, dtype=torch.float32)
    train = Batches(Path(args.data) / "train.bin", 4, 256, seed=0)
    if a.layers == "auto":
        n = -(-a.rank_tokens // 1024)
        t0 = time.perf_counter()
        fit = None
        if a.rank_fit_tokens:
            bypass.attach(model, range(model.num_layers), a.adapter_rank, a.adapter_mlp)
            fit = [train.get(n + i, "cpu")[0] for i in range(-(-a.rank_fit_tokens // 1024))]
        layers = [lay for lay, _ in greedy_order(model, [train.get(i, "cpu") for i in range(n)], a.num_skip or 6,
                                                 progress=lambda b: print(f"+ layer {b[0]} KL {b[1]:.4f} "
                                                                          f"({time.perf_counter() - t0:.0f}s)",
                                                                          flush=True),
                                                 bypass_fit=fit)]
        model.skip_adapters = None
    else:
        layers = parse_layers(a.layers, model.num_layers, a.num_skip)
    if a.lsq_tokens:
        bypass.attach(model, layers, a.adapter_rank, a.adapter_mlp)
        n = -(-a.lsq_tokens // 1024)
        check = [train.get(n + i, "cpu")[0] for i in range(-(-a.lsq_check_tokens // 1024))]
        print(bypass.fit_lstsq(model, [train.get(i, "cpu")[0] for i in range(n)], layers, check=check), flush=True)
    save_pretrained(model, out, extra_json={"skip.json": {"layers": layers, "teacher": str(teacher_dir.resolve()),
                                                          "steps": 0}})


def step_tokens(train_args: list[str]) -> int:
    """Training tokens a step under these train.py arguments (DEMO sets the batch and length; the last value of
    each flag wins, as in train.py; one process)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", "--batch_size", type=int)
    p.add_argument("--max-seq-len", "--max_seq_len", type=int)
    p.add_argument("--grad-accum", "--grad_accum", type=int, default=1)
    a, _ = p.parse_known_args(train_args)
    return a.batch_size * a.max_seq_len * a.grad_accum


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the recipe, in a few words (the row's label)")
    p.add_argument("--teacher", default="data/smollm2")
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--prose", default="data/prose/python-docs.txt")
    p.add_argument("--runs", default="data/quality", help="where each run's student and results go")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--note", default="", help="said in the row, e.g. that the machine was shared")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    teacher_dir = Path(args.teacher)
    slug = time.strftime("%Y%m%d-%H%M%S")
    run = Path(args.runs) / slug
    out = run / "student"
    t0 = time.perf_counter()
    if args.no_train:
        build_untrained(args, teacher_dir, out, extra)
        cmd = f"python benchmarks/quality.py --name {shlex.quote(args.name)} --no-train -- {shlex.join(extra)}"
    else:
        train_cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(teacher_dir), "--data", args.data,
                     "--out", str(out), "--ckpt-dir", str(run / "ckpt"), "--log-dir", str(run / "logs"), *DEMO, *extra]
        r = subprocess.run(train_cmd, env={**__import__("os").environ, "STDOUT": "1"})
        if r.returncode != 0:
            sys.exit(f"train.py failed (exit {r.returncode}); no row written")
        cmd = f"python benchmarks/quality.py --name {shlex.quote(args.name)} -- {shlex.join(extra)}"
    wall = time.perf_counter() - t0

    profile = read_skip_profile(out)
    layers = profile["layers"]
    steps = int(profile.get("steps", 0))
    student = from_pretrained(out, dtype=torch.float32)
    teacher = from_pretrained(teacher_dir, dtype=torch.float32)
    sets = scoring_sets(teacher_dir, Path(args.data), Path(args.prose))
    base = {name: perplexity_ci(teacher, b).ppl for name, b in sets.items()}
    ratios = []
    for s in skip_prefixes(layers):
        r = {name: perplexity_ci(student, b, s).ppl / base[name] for name, b in sets.items()}
        ratios.append(r)
        print(f"k={len(s)} skip {list(s)}: code {r['code']:.3f} prose {r['prose']:.3f}", flush=True)
    tokens = steps * step_tokens(DEMO + extra)
    (run / "results.json").write_text(json.dumps({"name": args.name, "command": cmd, "layers": layers,
                                                  "steps": steps, "wall_s": wall, "teacher_ppl": base,
                                                  "ratios": ratios, "train_tokens": tokens}, indent=2) + "\n")
    cells = [f"{r['code']:.3f} / {r['prose']:.3f}" for r in ratios] + ["–"] * max(0, DEPTHS - len(ratios))
    row = (f"| {slug} | {args.name}{' (' + args.note + ')' if args.note else ''} | {','.join(map(str, layers))} | "
           f"{tokens:,} | {wall / 60:.1f} min | " + " | ".join(cells[:DEPTHS]) + f" | `{cmd}` |\n")
    text = TABLE.read_text() if TABLE.exists() else HEADER
    atomic_write_text(TABLE, text + row)
    print(row, end="")


if __name__ == "__main__":
    main()
