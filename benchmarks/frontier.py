"""Quality against per-token cost: every recipe's skip sets on one axis, into docs/quality.md and docs/frontier.png.

    python benchmarks/frontier.py --threads 1             # every data/quality/* run: cost, measured speedup, ratios
    python benchmarks/frontier.py --no-speed --no-write   # the cost model only, printed
    python benchmarks/frontier.py --runs 20261204-231628 --rounds 7

Recipes differ in what a skipped slot still runs (a small bypass, the whole MLP, nothing), so layers skipped is no
common axis. Per run of benchmarks/quality.py (a folder with results.json and student/) and per prefix k of its
trained order: multiply-adds and bytes read per decoded token as fractions of the full model's (phi3skip.model.cost, at
--context tokens), phi3skip's measured batch-1 decode speedup (the student's full model against the skip set, in
this process, alternated, medians), and the run's perplexity ratios (results.json). The measured decode's prompt
fills its static cache to --context, so the attention it times is the one the cost model counts.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Mapping, Sequence

from phi3skip.core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from phi3skip.model.config import Phi3Config
from phi3skip.model.cost import DEFAULT_CONTEXT, BypassShape, CostFraction, block_weights, cost_fraction
from phi3skip.formats.checkpoints import read_skip_profile
from phi3skip.core.machine import REPEATS, threads
from phi3skip.core.paths import atomic_write_text, check_output
from phi3skip.model.skipsets import skip_prefixes

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "data" / "quality"
DOC = ROOT / "docs" / "quality.md"
HEADING = "## Frontier: quality against per-token cost"
# Where the section goes when the file has none: before the runs table that benchmarks/quality.py appends to.
RUNS_TABLE = ("## Runs", "| run | recipe | order |")
TEXTS = ("code", "prose")
# (--context's upper bound, every run's positions, and --new-tokens', below the context, once the runs are read)
NUMBERS = {"--context": Range(1), "--new-tokens": Range(1), "--rounds": REPEATS}
PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # what matplotlib writes by the name alone


@dataclass(frozen=True)
class Run:
    """One run folder of benchmarks/quality.py."""

    slug: str
    name: str
    layers: tuple[int, ...]
    ratios: tuple[Mapping[str, float], ...]  # per k = 0, 1, ...
    config: Phi3Config
    bypass: BypassShape | None
    student: Path


@dataclass(frozen=True)
class Row:
    run: Run
    k: int
    cost: CostFraction
    speedup: float | None

    @property
    def skip(self) -> tuple[int, ...]:
        return self.run.layers[:self.k]


def load_run(folder: Path) -> Run:
    if not folder.is_dir():
        raise UserError(f"--runs {folder}: no such run folder (a run of benchmarks/quality.py, or its name under "
                        f"{RUNS})")
    try:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        student = folder / "student"
        return Run(folder.name, str(res["name"]), tuple(int(i) for i in res["layers"]), tuple(res["ratios"]),
                   Phi3Config.from_json(student / "config.json"),
                   BypassShape.from_description(read_skip_profile(student).get("adapters")), student)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}: not a run of benchmarks/quality.py ({type(e).__name__}: {e})") from None


def find_runs(names: Sequence[str] | None, root: Path = RUNS) -> list[Path]:
    """--runs as given (a folder, or a name under data/quality), else every folder there with a results.json."""
    if not names:
        return sorted(p.parent for p in root.glob("*/results.json"))
    return [Path(n) if Path(n).is_dir() else root / n for n in names]


def slot(run: Run, short: bool = False) -> str:
    """What a skipped slot of this run still runs."""
    b, cfg = run.bypass, run.config
    if b is None:
        return "plain skip" if short else "nothing (plain skip)"
    if b.mlp == cfg.intermediate_size and b.rank == 0:
        return "attention dropped" if short else "the whole MLP, no map (attention dropped)"
    if b.mlp == cfg.intermediate_size:
        return "attention-only skip" if short else f"the whole MLP + a rank-{b.rank} map (attention-only skip)"
    share = b.weights(cfg.hidden_size) / block_weights(cfg)
    return f"bypass r{b.rank}+m{b.mlp}" if short else \
        f"bypass: rank-{b.rank} map + {b.mlp} MLP channels ({share:.1%} of a block)"


def speed_key(run: Run) -> tuple:
    """What a run's measured speedups depend on: the model's shape, how many layers it skips, what a skipped slot
    runs, and its sliding window; not which layers (a model's blocks are alike) nor the trained weights. Runs
    that share it share one measurement."""
    b = run.bypass
    return (repr(run.config.to_dict()), len(run.layers), None if b is None else (b.rank, b.mlp))


def rows_of(run: Run, context: int, speedups: Mapping[tuple[int, ...], float] | None = None) -> list[Row]:
    """One row per skip depth the run scored (k = 0 .. len(layers))."""
    return [Row(run, k, cost_fraction(run.config, run.layers[:k], run.bypass, context),
                (speedups or {}).get(run.layers[:k])) for k in range(min(len(run.ratios), len(run.layers) + 1))]


def measure_speedups(run: Run, context: int, new_tokens: int, rounds: int) -> dict[tuple[int, ...], float]:
    """phi3skip's decode speedup of each prefix over the full model: the student loaded once (fp32), all sets
    alternated (benchutil.decode_seconds), median seconds per token of the full model / of the set. The prompt is
    context - new_tokens tokens: the static cache then holds the context (rounded up to 64), attended every step."""
    import torch

    import benchutil  # beside this script
    from phi3skip import from_pretrained

    cfg = run.config
    if not new_tokens < context <= cfg.max_position_embeddings:
        raise UserError(f"--context {context}: the measured decode needs --new-tokens ({new_tokens}) < context <= the "
                        f"model's {cfg.max_position_embeddings} positions (or pass --no-speed)")
    model = from_pretrained(run.student, dtype=torch.float32)
    prompt = torch.randint(0, cfg.vocab_size, (context - new_tokens,), generator=torch.Generator().manual_seed(0))
    sets = skip_prefixes(run.layers)
    times = benchutil.decode_seconds(model, sets, prompt.tolist(), new_tokens, rounds)
    full = benchutil.median(times[()])
    return {s: full / benchutil.median(t) for s, t in times.items()}


# The table, the section, the plot -------------------------------------------------------------------------------
def table(rows: Sequence[Row]) -> str:
    """Markdown: a run's recipe and slot on its first row only (they are long)."""
    head = ["run", "recipe", "skipped slot runs", "k", "skip", "MACs", "bytes", "speedup (measured)",
            *(f"{t} ratio" for t in TEXTS)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        first = i == 0 or rows[i - 1].run is not r.run
        ratios = r.run.ratios[r.k]
        cells = [r.run.slug, r.run.name if first else "", slot(r.run) if first else "", str(r.k),
                 ",".join(map(str, r.skip)) or "none", f"{float(r.cost.macs):.3f}", f"{float(r.cost.bytes):.3f}",
                 f"{r.speedup:.3f}x" if r.speedup is not None else "–",
                 *(f"{ratios[t]:.3f}" if isinstance(ratios.get(t), (int, float)) else "–" for t in TEXTS)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def section(rows: Sequence[Row], context: int, measured: str | None, image: str | None) -> str:
    """The docs section: what the columns are, how the speedups were measured, the plot and the table."""
    parts = [HEADING, "", f"""Every run's skip sets (k = a prefix of its trained order) on one axis every recipe shares, whatever a
skipped slot still runs (`python benchmarks/frontier.py`; the cost model is `phi3skip.model.cost`). MACs and bytes are
per decoded token, batch 1, at a context of {context:,} tokens, as fractions of the full model's: multiply-adds of
every weight matmul that runs (the running blocks, the skipped slots' bypasses, the lm_head) plus attention's q.k
and p.v over the context; bytes read: those weights and the norms' plus the running blocks' KV cache over the
context (a skipped slot has none; weights and cache in one dtype). Ratios: student / teacher perplexity, code /
prose, from the run's row in the table below.""", "",
             f"Measured speedup: {measured}." if measured else "Measured speedup: not measured here (`--no-speed`)."]
    if image:
        parts += ["", f"![perplexity ratio against multiply-adds per token, one line per recipe]({image})"]
    return "\n".join(parts + ["", table(rows)])


def put_section(text: str, new: str) -> str:
    """`new` (starting with HEADING) in place of the file's section under HEADING; without one, just before the
    runs table benchmarks/quality.py appends to (so appending stays right), else at the end."""
    lines = text.splitlines(keepends=True)
    new = new.rstrip("\n") + "\n\n"
    heads = [i for i, line in enumerate(lines) if line.rstrip() == HEADING]
    if heads:
        start = heads[0]
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "".join(lines[:start]) + (new if end < len(lines) else new.rstrip("\n") + "\n") + "".join(lines[end:])
    at = next((i for mark in RUNS_TABLE for i, line in enumerate(lines) if line.startswith(mark)), None)
    if at is None:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + new.rstrip("\n") + "\n"
    before = "".join(lines[:at]).rstrip("\n")
    return (before + "\n\n" if before else "") + new + "".join(lines[at:])


def plot(rows: Sequence[Row], context: int, path: Path) -> Path:
    """Perplexity ratio against the MACs fraction: one colour per run, code solid circles, prose dashed squares."""
    from phi3skip.eval.evaluate import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 1.0
    for i, (run, group) in enumerate(groupby(rows, key=lambda r: r.run)):
        group = list(group)
        xs = [float(r.cost.macs) for r in group]
        for text, style in zip(TEXTS, ("o-", "s--")):
            ys = [run.ratios[r.k].get(text) for r in group]
            if all(isinstance(y, (int, float)) for y in ys):
                top = max(top, *ys)
                ax.plot(xs, ys, style, color=f"C{i % 10}", markersize=4,
                        label=f"{run.slug}: {slot(run, short=True)}" if text == TEXTS[0] else None)
    for text, style in zip(TEXTS, ("o-", "s--")):  # the marker key
        ax.plot([], [], style, color="gray", markersize=4, label=text)
    if top > 3:
        ax.set_yscale("log")
    ax.set_xlabel(f"multiply-adds per token, fraction of the full model's (context {context:,})")
    ax.set_ylabel("perplexity ratio, student / teacher")
    ax.set_title("Quality against per-token cost (lower left is better)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def check_outputs(args) -> tuple[str, Path | None]:
    """--out-md and the plot, checked before any run is read (the path rule of every command: a file, in a folder
    this process can write); returns --out-md's text now (its section is replaced) and the plot's path."""
    if args.no_write:
        return "", None
    out = check_output(args.out_md, "--out-md", "file")
    try:
        old = out.read_text(encoding="utf-8") if out.exists() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--out-md {out}: cannot read it as UTF-8 text to replace its section "
                        f"({getattr(e, 'strerror', None) or e}); choose another file") from None
    if args.no_plot:
        return old, None
    path = check_output(args.plot or out.parent / "frontier.png", "--plot", "file")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {path}: the image type is its name's suffix, one of {', '.join(PLOT_SUFFIXES)}")
    return old, path


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", metavar="RUN", help="run folders, or names under data/quality (default: all)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"context length of the cost model and of the measured decode (default {DEFAULT_CONTEXT})")
    p.add_argument("--no-speed", action="store_true", help="skip the measured speedup (the cost model only)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timed run (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="alternated timed runs per skip set (default 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the measured decode (default 1)")
    p.add_argument("--note", default="", help="said with the measurement, e.g. whether anything else ran")
    p.add_argument("--out-md", type=Path, default=DOC, help="the markdown file to write the section into")
    p.add_argument("--plot", type=Path, default=None, help="the plot (default: frontier.png beside --out-md)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the table only: no markdown, no plot")
    args = p.parse_args(argv)
    check_ranges(args, {**NUMBERS, "--threads": threads("CPU threads, this machine's CPUs")})
    old, plot_path = check_outputs(args)
    runs = [load_run(f) for f in find_runs(args.runs)]
    if not runs:
        raise UserError(f"no runs: no {RUNS}/*/results.json (pass --runs RUN ...)")
    positions = min(r.config.max_position_embeddings for r in runs)
    check_ranges(args, {"--context": Range(1, positions, note="the runs' models' positions")})
    if not args.no_speed:
        check_ranges(args, {"--new-tokens": Range(1, args.context - 1, note="the measured decode's prompt fills the "
                                                                            "context less the new tokens")})
    measured = None
    rows: list[Row] = []
    if not args.no_speed:
        import torch

        torch.set_num_threads(args.threads)
        measured = (f"phi3skip's batch-1 greedy decode of each student, fp32, full model against the skip set in one "
                    f"process, alternated, median of {args.rounds} runs of {args.new_tokens} tokens after a prompt "
                    f"that fills the cache to the context, {args.threads} CPU thread(s), torch {torch.__version__}, "
                    f"{time.strftime('%Y-%m-%d')}; runs alike in all but their layers and weights share one measurement, "
                    f"the first such run's" + (f" ({args.note})" if args.note else ""))
    measured_by: dict[tuple, tuple[str, list[float]]] = {}  # what a k-prefix decodes at, per kind of run
    for run in runs:
        speedups = None
        if not args.no_speed:
            key = speed_key(run)
            if key not in measured_by:
                t0 = time.perf_counter()
                by_set = measure_speedups(run, args.context, args.new_tokens, args.rounds)
                measured_by[key] = (run.slug, [by_set[s] for s in skip_prefixes(run.layers)])
                print(f"  {run.slug}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
            else:
                print(f"  {run.slug}: the speedups measured on {measured_by[key][0]} (same blocks and slots)")
            speedups = {run.layers[:k]: v for k, v in enumerate(measured_by[key][1])}
        rows += rows_of(run, args.context, speedups)
    print(table(rows), end="")
    if args.no_write:
        return
    image = None
    if plot_path is not None:
        try:
            image = os.path.relpath(plot(rows, args.context, plot_path), args.out_md.parent)
            print(f"wrote {plot_path}")
        except UserError as e:  # matplotlib is the optional extra `plot`
            print(f"no plot: {e}")
    atomic_write_text(args.out_md, put_section(old, section(rows, args.context, measured, image)))
    print(f"wrote the section {HEADING[3:]!r} into {args.out_md}")


if __name__ == "__main__":
    run_main(main)
