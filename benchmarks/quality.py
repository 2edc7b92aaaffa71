"""Run one training recipe at the demo's budget and append its row to docs/quality.md.

    python benchmarks/quality.py --name "adapters, sandwich" -- --train-scope adapters --k-dist sandwich \
        --layers auto --num-skip 6 --max-steps 120 --lr 1e-3
    python benchmarks/quality.py --name "greedy order, bypass least squares, no training" --no-train \
        --layers auto --num-skip 6

Everything after `--` goes to train.py on top of the demo's settings (teacher data/smollm2, data data/stdlib,
nested schedule, 4 x 256 tokens a step; `--data A B --data-weights 1 1` trains on a blend, and code is scored on
A's val.bin); `--no-train` builds the student without training (the candidate order,
and least-squares bypasses when --lsq-tokens > 0). Each run is scored the same way: perplexity on 8,192 held-out
tokens of the training corpus (val.bin, code: the selection metric), of the Python docs (prose: never trained on)
and, where data/pkgdocs exists, of the package READMEs held out from it (docs), windows of 256, for the full
student and each prefix of its trained order, as a ratio to the teacher. `--rescore RUN` scores an earlier
run again (e.g. on a text added since), into its results.json.
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

from phi3skip.model import bypass
from phi3skip.train import bypass_init
from phi3skip import from_pretrained
from phi3skip.data.tokens import Batches, eval_batches
from phi3skip.eval.evaluate import perplexity_ci, val_batches
from phi3skip.eval.importance import greedy_order
from phi3skip.formats.checkpoints import read_skip_profile, save_pretrained
from phi3skip.core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from phi3skip.core.machine import memory_bound
from phi3skip.core.paths import atomic_write_text, check_apart, check_output, read_json_object
from phi3skip.data.corpus import read_text_file
from phi3skip.data.tokens import read_header
from phi3skip.model.config import Phi3Config
from phi3skip.model.skipsets import parse_layers, skip_prefixes
from phi3skip.data.tokenizer import load_tokenizer

DEMO = ["--schedule", "nested", "--batch-size", "4", "--max-seq-len", "256", "--eval-tokens", "4096",
        "--eval-every", "0", "--log-every", "10"]
TABLE = ROOT / "docs" / "quality.md"
DEPTHS = 9  # columns k = 0..8
HEADER = """# Quality of skipped inference: recipes tried

One row per run of `benchmarks/quality.py` (its docstring says how each is scored). Ratios are student
perplexity / teacher perplexity on held-out text, code (stdlib val.bin, the selection metric) / prose (Python
docs) / docs (package READMEs, pkgdocs' val.bin; rows from 2026-12-05 on), at skip depth k = a prefix of the run's trained order. Teacher: SmolLM2-135M-Instruct
(30 layers) converted to Phi-3. Wall-clock: the whole train.py run on 2 CPU cores.

| run | recipe | order | train tokens | wall-clock | k=0 | k=1 | k=2 | k=3 | k=4 | k=5 | k=6 | k=7 | k=8 | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def scoring_sets(teacher_dir: Path, data: Path, prose: Path, docs: Path | None, tokens: int = 8192
                 ) -> dict[str, list]:
    """code: the training corpus's held-out documents; prose: the Python docs (never in any training set);
    docs: the package READMEs' held-out documents (pkgdocs' val.bin), when that folder exists."""
    tok = load_tokenizer(str(teacher_dir))
    ids = np.asarray(tok.encode(prose.read_text(encoding="utf-8")).ids, dtype=np.int64)
    sets = {"code": val_batches(data / "val.bin", 4, 256, tokens),
            "prose": list(eval_batches(ids, 4, 256, max_tokens=tokens))}
    if docs is not None and (docs / "val.bin").is_file():
        sets["docs"] = val_batches(docs / "val.bin", 4, 256, tokens)
    return sets


def score(run: Path, teacher_dir: Path, sets: dict[str, list]) -> tuple[list[int], list[dict[str, float]], dict]:
    """(trained order, ratios to the teacher per prefix k = 0.., the teacher's perplexities) of a run's student."""
    layers = read_skip_profile(run / "student")["layers"]
    student = from_pretrained(run / "student", dtype=torch.float32)
    teacher = from_pretrained(teacher_dir, dtype=torch.float32)
    base = {name: perplexity_ci(teacher, b).ppl for name, b in sets.items()}
    ratios = []
    for s in skip_prefixes(layers):
        r = {name: perplexity_ci(student, b, s).ppl / base[name] for name, b in sets.items()}
        ratios.append(r)
        print(f"k={len(s)} skip {list(s)}: " + " ".join(f"{n} {v:.3f}" for n, v in r.items()), flush=True)
    return layers, ratios, base


def cell(r: dict[str, float]) -> str:
    return " / ".join(f"{r[n]:.3f}" for n in ("code", "prose", "docs") if n in r)


def untrained_args(extra: list[str], cfg: Phi3Config) -> argparse.Namespace:
    """--no-train's flags (after `--`), each checked against the teacher's shape and the memory the tokens take,
    before anything loads."""
    p = ArgumentParser(prog="quality.py --no-train --")
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
    # tokens scored or fitted are run through the teacher and kept: its logits and a block's activations, fp32
    per_token = 4 * (cfg.vocab_size + 4 * cfg.hidden_size)
    check_ranges(a, {"--num-skip": Range(1, cfg.num_hidden_layers, note="the teacher's layers"),
                     "--adapter-rank": Range(0, cfg.hidden_size, note="the teacher's hidden size"),
                     "--adapter-mlp": Range(0, cfg.intermediate_size, note="the teacher's MLP width"),
                     **{f: memory_bound(per_token, "a token's logits and activations are kept", low)
                        for f, low in (("--rank-tokens", 1), ("--lsq-check-tokens", 1), ("--lsq-tokens", 0),
                                       ("--rank-fit-tokens", 0))}})
    return a


def build_untrained(args, teacher_dir: Path, out: Path, a: argparse.Namespace) -> None:
    """--no-train: the teacher with a candidate order (and least-squares bypasses), saved like a student."""
    model = from_pretrained(teacher_dir, dtype=torch.float32)
    train = Batches(Path(args.data[0]) / "train.bin", 4, 256, seed=0)  # the first folder only
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
        print(bypass_init.fit_lstsq(model, [train.get(i, "cpu")[0] for i in range(n)], layers, check=check), flush=True)
    save_pretrained(model, out, extra_json={"skip.json": {"layers": layers, "teacher": str(teacher_dir.resolve()),
                                                          "steps": 0}})


def data_flags(args) -> str:
    """The row's command: --data (and --data-weights) when not the default."""
    out = "" if args.data == ["data/stdlib"] else " --data " + shlex.join(args.data)
    return out + (" --data-weights " + shlex.join(args.data_weights) if args.data_weights else "")


def step_tokens(train_args: list[str]) -> int:
    """Training tokens a step under these train.py arguments (DEMO sets the batch and length; the last value of
    each flag wins, as in train.py; one process)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", "--batch_size", type=int)
    p.add_argument("--max-seq-len", "--max_seq_len", type=int)
    p.add_argument("--grad-accum", "--grad_accum", type=int, default=1)
    a, _ = p.parse_known_args(train_args)
    return a.batch_size * a.max_seq_len * a.grad_accum


def check_inputs(args) -> tuple[Path, Path | None, Phi3Config]:
    """What every run reads and writes, checked before training or scoring starts (the rules of every command):
    the teacher, the data folders, the prose, the runs folder and the table; (teacher, docs or None, its config)."""
    teacher_dir = Path(args.teacher)
    if not (teacher_dir / "config.json").is_file():
        raise UserError(f"--teacher {teacher_dir}: no config.json there; give the teacher's checkpoint folder")
    cfg = Phi3Config.from_json(teacher_dir / "config.json")
    for d in args.data:
        for name in ("train.bin", "val.bin"):
            if not (Path(d) / name).is_file():
                raise UserError(f"--data {d}: no {name} there; give a folder made by prepare.py")
            read_header(Path(d) / name)  # a damaged token file is one line now, not after training
    if not Path(args.prose).exists():
        raise UserError(f"--prose {args.prose}: no such file")
    if Path(args.prose).is_dir():
        raise UserError(f"--prose {args.prose}: is a folder; give a text file")
    try:
        read_text_file(args.prose)
    except UserError as e:
        raise UserError(f"--prose {e}") from None
    except OSError as e:
        raise UserError(f"--prose {args.prose}: cannot read it ({e.strerror})") from None
    docs = Path(args.docs) if args.docs else None
    if docs is not None and docs.exists() and not (docs / "val.bin").is_file():
        raise UserError(f"--docs {docs}: no val.bin there; give a folder made by prepare.py (or one that does not "
                        f"exist, to score no docs)")
    check_output(args.runs, "--runs", "dir")
    check_apart({"--runs": args.runs}, [("--teacher", teacher_dir), *(("--data", d) for d in args.data),
                                        ("--prose", args.prose), ("--docs", docs)])
    if not args.rescore:
        check_output(TABLE, "the table", "file")
        try:
            TABLE.read_text(encoding="utf-8") if TABLE.exists() else ""
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{TABLE}: cannot read it as UTF-8 text to append a row ({e})") from None
    return teacher_dir, docs, cfg


def read_results(run: Path) -> dict:
    """A run's results.json (--rescore), one line when it is missing or damaged."""
    path = run / "results.json"
    try:
        return read_json_object(path, "; re-run the recipe")
    except FileNotFoundError:
        raise UserError(f"--rescore {run.name}: no {path}; give the name of a run under --runs") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = ArgumentParser(prog="quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the recipe, in a few words (the row's label)")
    p.add_argument("--teacher", default="data/smollm2")
    p.add_argument("--data", nargs="+", default=["data/stdlib"],
                   help="train.py's --data: one folder, or several blended (--data-weights); code is scored on the "
                        "first one's val.bin")
    p.add_argument("--data-weights", nargs="+", default=None, help="train.py's --data-weights")
    p.add_argument("--prose", default="data/prose/python-docs.txt")
    p.add_argument("--docs", default="data/pkgdocs", help="a prepare.py folder of prose whose val.bin is scored too "
                                                          "(skipped when it does not exist)")
    p.add_argument("--rescore", metavar="RUN", default=None,
                   help="score an earlier run's student again (adds texts to its results.json; no row, no training)")
    p.add_argument("--runs", default="data/quality", help="where each run's student and results go")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--note", default="", help="said in the row, e.g. that the machine was shared")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        raise UserError(f"--data-weights: {len(args.data_weights)} weights for {len(args.data)} --data folders; give "
                        "one weight per folder")
    if args.rescore and (args.no_train or extra):
        raise UserError("--rescore scores an earlier run: it takes no --no-train and no train.py flags after --")
    teacher_dir, docs, cfg = check_inputs(args)
    untrained = untrained_args(extra, cfg) if args.no_train else None
    if args.rescore:
        run = Path(args.runs) / args.rescore
        results = read_results(run)
        sets = scoring_sets(teacher_dir, Path(args.data[0]), Path(args.prose), docs)
        _, ratios, base = score(run, teacher_dir, sets)
        results.update(ratios=ratios, teacher_ppl=base)
        atomic_write_text(run / "results.json", json.dumps(results, indent=2) + "\n")
        print(" | ".join(cell(r) for r in ratios))
        return
    slug = time.strftime("%Y%m%d-%H%M%S")
    run = Path(args.runs) / slug
    out = run / "student"
    t0 = time.perf_counter()
    if args.no_train:
        build_untrained(args, teacher_dir, out, untrained)
        cmd = f"python benchmarks/quality.py --name {shlex.quote(args.name)}{data_flags(args)} --no-train -- {shlex.join(extra)}"
    else:
        blend = ["--data-weights", *args.data_weights] if args.data_weights else []
        train_cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(teacher_dir), "--data", *args.data, *blend,
                     "--out", str(out), "--ckpt-dir", str(run / "ckpt"), "--log-dir", str(run / "logs"), *DEMO, *extra]
        r = subprocess.run(train_cmd, env={**__import__("os").environ, "STDOUT": "1"})
        if r.returncode != 0:  # train.py said why (a mistake in its flags: one line, exit 2)
            print(f"train.py failed (exit {r.returncode}); no row written", file=sys.stderr)
            sys.exit(r.returncode)
        cmd = f"python benchmarks/quality.py --name {shlex.quote(args.name)}{data_flags(args)} -- {shlex.join(extra)}"
    wall = time.perf_counter() - t0

    steps = int(read_skip_profile(out).get("steps", 0))
    layers, ratios, base = score(run, teacher_dir, scoring_sets(teacher_dir, Path(args.data[0]), Path(args.prose), docs))
    tokens = steps * step_tokens(DEMO + extra)
    atomic_write_text(run / "results.json", json.dumps({"name": args.name, "command": cmd, "layers": layers,
                                                  "steps": steps, "wall_s": wall, "teacher_ppl": base,
                                                  "ratios": ratios, "train_tokens": tokens}, indent=2) + "\n")
    cells = [cell(r) for r in ratios] + ["–"] * max(0, DEPTHS - len(ratios))
    row = (f"| {slug} | {args.name}{' (' + args.note + ')' if args.note else ''} | {','.join(map(str, layers))} | "
           f"{tokens:,} | {wall / 60:.1f} min | " + " | ".join(cells[:DEPTHS]) + f" | `{cmd}` |\n")
    text = TABLE.read_text(encoding="utf-8") if TABLE.exists() else HEADER
    atomic_write_text(TABLE, text + row)
    print(row, end="")


if __name__ == "__main__":
    run_main(main)
