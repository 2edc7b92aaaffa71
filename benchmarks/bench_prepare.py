"""Tokens/s of prepare.py's batched, parallel tokenizing against a plain one-document-at-a-time loop with the
same tokenizer, and peak resident memory for two corpus sizes.

    python benchmarks/bench_prepare.py --model /tmp/smollm2 --runs 3 --mb 1 --copies 4 16

The corpus is the first `--mb` MB of the standard library's .py files, copied `--copies` times (so the larger
corpus has the same documents, only more of them: a memory that grows with it would show). Every measurement
runs in a fresh subprocess, plain and batched alternating, timed around the tokenizing loop only (both read the
same files through phi3skip.data.corpus and write the same .bin file). tok/s: median and best of `--runs` (the best
run is the least disturbed by other processes on a shared machine); ratio: median of the per-run ratios, and
best over best. CPU ratio: plain CPU-seconds over batched CPU-seconds (all threads), the work saved apart from
parallelism. Peak RSS: the subprocess's maxrss; for prepare.py the whole command, its imports included.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi3skip.core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from phi3skip.core.machine import REPEATS, cpu_count, threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path("/tmp/smollm2")  # the converted SmolLM2 checkpoint, when scripts/convert_gguf.py made it


def build_corpus(folder: Path, mb: float, copies: int) -> tuple[Path, int]:
    """`copies` folders holding the same first `mb` MB of stdlib sources; returns (folder, characters)."""
    from phi3skip.data.corpus import stdlib_files

    base, chars = [], 0
    for f in stdlib_files():
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            base.append(text)
            chars += len(text)
        if chars >= mb * 1e6:
            break
    for c in range(copies):
        (folder / f"copy{c}").mkdir(parents=True)
        for i, text in enumerate(base):
            (folder / f"copy{c}" / f"{i:05d}.py").write_text(text, encoding="utf-8")
    return folder, chars * copies


def tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE with 8k tokens trained on a slice of the stdlib, when no model folder is at hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from phi3skip.data.corpus import stdlib_files

    texts = [Path(f).read_text(encoding="utf-8", errors="ignore") for f in stdlib_files()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


# One measurement, in a subprocess --------------------------------------------------------------------------
def child(mode: str, corpus_dir: str, model: str, out: str, workers: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # before the tokenizers library starts its pool
    import numpy as np
    from phi3skip.data import corpus
    from phi3skip.data.tokens import TokenWriter
    from phi3skip.data.tokenizer import eos_token_id, load_tokenizer, vocab_size

    tok = load_tokenizer(model)
    eos = eos_token_id(tok, model)
    docs = corpus.documents([corpus.resolve(corpus_dir)], corpus.Filters())
    n = 0
    with TokenWriter(out, vocab_size(tok), eos) as w:
        start, cpu = time.perf_counter(), time.process_time()
        if mode == "plain":
            tok.encode_special_tokens = True  # as prepare does
            for doc in docs:
                ids = tok.encode(doc, add_special_tokens=False).ids
                ids.append(eos)
                w.write(np.asarray(ids, dtype=np.uint32))
                n += len(ids)
        else:
            for enc in corpus.encode(tok, docs, eos):
                w.write(enc.tokens)
                n += len(enc.tokens)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": n, "seconds": seconds, "cpu_seconds": cpu, "rss_mb": rss_mb}))


def measure(mode: str, corpus_dir: Path, model: Path, tmp: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus_dir), "--model", str(model),
           "--out", str(tmp / f"{mode}.bin"), "--workers", str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_prepare(corpus_dir: Path, model: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, str(ROOT / "prepare.py"), "--dataset", str(corpus_dir), "--model", str(model),
           "--out", str(out), "--overwrite", "--workers", str(workers)]
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)  # the child's own peak RSS
    seconds = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"prepare.py failed: {stderr.strip()}")
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "summary": stdout.strip()}


# every numeric flag's range, checked before any work: the corpus is written to a temporary folder (--mb x copies),
# tokenized by --workers processes
NUMBERS = {"--mb": Range(0.001, 1024, note="MB of text per copy"), "--copies": Range(1, 1024),
           "--runs": REPEATS}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help=f"folder with tokenizer.json (default {DEFAULT_MODEL} if it "
                                                  f"exists, else an 8k byte-level BPE trained here)")
    p.add_argument("--mb", type=float, default=1.0, help="MB of stdlib text per copy")
    p.add_argument("--copies", type=int, nargs=2, default=[4, 16], help="the two corpus sizes, in copies")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=cpu_count())
    p.add_argument("--verbose", action="store_true", help="print every run's tokens/s")
    p.add_argument("--child", choices=["plain", "batched"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_ranges(args, {**NUMBERS, "--workers": threads("worker processes, this machine's CPUs")})
    if not args.child:
        need = args.mb * 1e6 * max(args.copies)  # the largest corpus on disk in the temporary folder
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if need > free:
            raise UserError(f"--mb {args.mb:g} x --copies {max(args.copies)}: the corpus needs {need / 1e9:.1f} GB "
                            f"in {tempfile.gettempdir()}, which has {free / 1e9:.1f} GB free; lower --mb or --copies")
    if args.child:
        return child(args.child, args.corpus, args.model, args.out, args.workers)

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        model = Path(args.model) if args.model else DEFAULT_MODEL if (DEFAULT_MODEL / "tokenizer.json").exists() \
            else tiny_tokenizer(tmp / "tok")
        print(f"tokenizer: {model}  workers: {args.workers}  cpus: {os.cpu_count()}  runs: {args.runs} (median)  "
              f"load average: {os.getloadavg()[0]:.1f}")
        print(f"{'corpus':>8} {'tokens':>10} {'plain tok/s':>13} {'batched tok/s':>13} {'ratio':>11} "
              f"{'CPU ratio':>9} {'plain RSS':>9} {'batched RSS':>11} {'prepare.py RSS':>14} {'prepare.py':>10}")
        print(f"{'':>8} {'':>10} {'median/best':>13} {'median/best':>13} {'median/best':>11}")
        for copies in args.copies:
            corpus_dir, chars = build_corpus(tmp / f"corpus{copies}", args.mb, copies)
            plain, batched = [], []
            for run in range(args.runs):  # alternate, so a neighbour's load hits both alike
                order = ("plain", "batched") if run % 2 == 0 else ("batched", "plain")
                for mode in order:
                    (plain if mode == "plain" else batched).append(measure(mode, corpus_dir, model, tmp,
                                                                           args.workers))
            prep = measure_prepare(corpus_dir, model, tmp / "out", args.workers)
            tokens = plain[0]["tokens"]
            assert all(m["tokens"] == tokens for m in plain + batched), "token counts differ between methods"
            rates_p = [tokens / m["seconds"] / 1e6 for m in plain]
            rates_b = [tokens / m["seconds"] / 1e6 for m in batched]
            ratio = statistics.median(b / p for p, b in zip(rates_p, rates_b))
            cpu_ratio = statistics.median(p["cpu_seconds"] / b["cpu_seconds"] for p, b in zip(plain, batched))
            print(f"{chars / 1e6:>6.1f}MB {tokens:>10,} {statistics.median(rates_p):>6.2f}/{max(rates_p):.2f}M "
                  f"{statistics.median(rates_b):>6.2f}/{max(rates_b):.2f}M "
                  f"{ratio:>5.2f}/{max(rates_b) / max(rates_p):.2f}x {cpu_ratio:>8.2f}x "
                  f"{max(m['rss_mb'] for m in plain):>7.0f}MB {max(m['rss_mb'] for m in batched):>9.0f}MB "
                  f"{prep['rss_mb']:>12.0f}MB {prep['seconds']:>9.1f}s", flush=True)
            if args.verbose:
                for mode, ms in (("plain", plain), ("batched", batched)):
                    print(f"    {mode} tok/s per run: " + "  ".join(f"{tokens / m['seconds'] / 1e6:.2f}M" for m in ms))
            shutil.rmtree(corpus_dir)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
