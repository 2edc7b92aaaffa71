"""Tokenize a corpus into data/NAME/train.bin, val.bin and meta.json, the files train.py and the evaluation read.

    python prepare.py --dataset stdlib --model /tmp/smollm2 --out data/stdlib --max-tokens 5000000
    python prepare.py                  # codeparrot/github-code-clean, Python under MIT/ISC, Phi-3's tokenizer

Documents stream through the tokenizers library's parallel batches into a temporary token file (memory does
not grow with the corpus); whole documents are then held out for validation by a seeded hash of their
index, and the finished folder replaces data/NAME in one rename. The .bin format is in phi3skip/data/tokens.py.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from phi3skip.core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from phi3skip.core.hub import hub_offline
from phi3skip.core.paths import atomic_output, check_apart, check_output, local
from phi3skip.data import corpus, pkgdocs
from phi3skip.data.tokenizer import eos_token_id, read_tokenizer, tokenizer_file, tokenizer_hash, vocab_size
from phi3skip.data.tokens import HEADER_BYTES, META_FILE, TokenWriter, read_header, token_dtype, token_file_hashes
from phi3skip.train.job import SEED, TOKENS, TOKENS_OR_0

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_VAL_FRACTION = 0.01
_KEY_BITS = 53  # per-document split keys are uniform integers below 2**53
_DOC_CHUNK = 1 << 20  # documents per chunk when scanning lengths: constant memory
_COPY_CHUNK = 1 << 24  # tokens per copy from the temporary file into train/val


# Every numeric flag's range, checked before any work: token counts up to 2**40 (terabytes of token files; nothing
# here allocates by them: the split is found in passes over a lengths file), tokenizer threads up to this machine's
# CPUs, and train.py's seed rule (below 2**32).
NUMBERS = {"--max-tokens": TOKENS, "--val-tokens": TOKENS_OR_0, "--val-fraction": Range(0.0, 1.0, below=True),
           "--workers": Range(1, os.cpu_count() or 1, note="this machine's CPUs"), "--seed": SEED}


@dataclass(frozen=True)
class PrepareConfig:
    """prepare.py's settings, typed: its flags (`--max-tokens` is `max_tokens`), parsed once by `parse_args`."""
    dataset: tuple[str, ...] = (corpus.DEFAULT_DATASET,)
    model: str = DEFAULT_MODEL
    revision: str | None = None
    out: str | None = None
    max_tokens: int | None = None
    val_tokens: int | None = None
    val_fraction: float | None = None  # DEFAULT_VAL_FRACTION when neither is given
    language: str = "Python"
    licenses: tuple[str, ...] = ("mit", "isc")
    text_field: str | None = None
    workers: int = os.cpu_count() or 1
    seed: int = 0
    overwrite: bool = False


def parse_args(argv: list[str] | None) -> PrepareConfig:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", nargs="+", metavar="SRC",
                   help="'stdlib', local files/folders/globs (.txt .md .rst .py .jsonl .json .parquet, "
                        "optionally .gz), or Hub dataset ids org/name[@revision][:glob] "
                        f"(default {corpus.DEFAULT_DATASET})")
    p.add_argument("--model", help="Hub id or folder with tokenizer.json")
    p.add_argument("--revision", help="revision of a Hub --model")
    p.add_argument("--out", help="output folder (default data/NAME from the first dataset)")
    p.add_argument("--max-tokens", type=int,
                   help="stop at the first document boundary after this many tokens")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-tokens", type=int,
                     help="hold out whole documents until at least this many tokens")
    val.add_argument("--val-fraction", type=float,
                     help=f"hold out this fraction of the documents (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--language", help="keep records whose `language` is this ('any': all)")
    p.add_argument("--licenses", nargs="+",
                   help="keep records whose `license` is one of these ('any': all)")
    p.add_argument("--text-field",
                   help=f"record field holding the text (default: the first of {', '.join(corpus.TEXT_FIELDS)})")
    p.add_argument("--workers", type=int, help="tokenizer threads")
    p.add_argument("--seed", type=int, help="seed of the train/validation split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(**{f.name: f.default for f in fields(PrepareConfig)})  # one place for them
    ns = p.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in fields(PrepareConfig)}
    cfg = PrepareConfig(**{**values, "dataset": tuple(ns.dataset), "licenses": tuple(ns.licenses)})
    check_ranges(cfg, NUMBERS)
    if cfg.val_tokens is None and cfg.val_fraction is None:
        cfg = replace(cfg, val_fraction=DEFAULT_VAL_FRACTION)
    return cfg


def default_out(datasets: list[str]) -> Path:
    def slug(spec: str) -> str:
        if "/" in spec and not Path(spec).exists():  # Hub id: its name, without revision or pattern
            spec = spec.split("/")[1].split("@")[0].split(":")[0]
        return Path(spec.rstrip("/*")).stem or "data"
    return Path("data") / "+".join(dict.fromkeys(slug(s) for s in datasets))


def dataset_paths(model: str, datasets: list[str]) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(reads, keeps) for the path rule: the tokenizer's folder, and what each --dataset reads here (a glob that
    searches one folder only keeps that folder: an output beside its files is never matched)."""
    roots = [r for spec in datasets if (r := corpus.local_root(spec)) is not None]
    reads = [("--model", local(model))] + [("--dataset", path) for path, whole in roots if whole]
    return reads, [("--dataset", path) for path, whole in roots if not whole]


# Validation split ------------------------------------------------------------------------------------------
def doc_keys(seed: int, start: int, count: int) -> np.ndarray:
    """splitmix64 of (seed, document index) -> uniform integers below 2**53: the split of a document
    depends only on the seed and its position in the corpus, not on batching or threads."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)
        z *= np.uint64(0x9E3779B97F4A7C15)
        z ^= np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z >> np.uint64(64 - _KEY_BITS)


def _chunks(lengths: Path, seed: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first document, lengths, keys) per chunk, read from the lengths file (plain reads, not a memory map:
    mapped pages would count towards the resident size)."""
    with open(lengths, "rb") as f:
        start = 0
        while len(lens := np.fromfile(f, dtype=np.int64, count=_DOC_CHUNK)):
            yield start, lens, doc_keys(seed, start, len(lens))
            start += len(lens)


def _held_out(lengths: Path, seed: int, threshold: int) -> tuple[int, int]:
    """(documents, tokens) with key < threshold."""
    docs = toks = 0
    for _, lens, keys in _chunks(lengths, seed):
        val = keys < threshold
        docs += int(val.sum())
        toks += int(lens[val].sum())
    return docs, toks


def val_threshold(lengths: Path, seed: int, val_tokens: int | None, val_fraction: float | None) -> int:
    """Documents whose key is below the threshold form the validation split.

    --val-fraction F: threshold F * 2**53. --val-tokens N: the smallest threshold holding out >= N tokens,
    found by bisection over passes on the lengths (no sort: constant memory). At least one document is held
    out whenever validation is asked for, and at least one is left for training.
    """
    top = 1 << _KEY_BITS
    n_docs, n_tokens = _held_out(lengths, seed, top)  # every key is below 2**53
    if val_tokens is not None:
        if val_tokens == 0:
            return 0
        lo, hi = 0, top  # invariant: held_out(lo) < N; hi == top when the corpus is too small
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _held_out(lengths, seed, mid)[1] >= val_tokens:
                hi = mid
            else:
                lo = mid
        threshold = hi
    else:
        if not val_fraction:
            return 0
        threshold = int(val_fraction * top)
    if _held_out(lengths, seed, threshold)[0] == 0:  # small corpus: hold out the lowest-keyed document
        threshold = min(int(keys.min()) for _, _, keys in _chunks(lengths, seed)) + 1
    if _held_out(lengths, seed, threshold)[0] >= n_docs:
        what = f"--val-tokens {val_tokens}" if val_tokens is not None else f"--val-fraction {val_fraction}"
        raise UserError(f"{what} leaves no document for training: the corpus has {n_tokens:,} tokens "
                        f"in {n_docs:,} document(s); lower it, add data or raise --max-tokens")
    return threshold


def write_split(all_tokens: Path, lengths: Path, seed: int, threshold: int, train: TokenWriter,
                val: TokenWriter) -> dict[str, dict[str, int]]:
    """Copy each run of consecutive documents to the split its keys choose, reading the temporary token file
    once, in order, in slices of bounded size."""
    counts = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
    head = read_header(all_tokens)
    with open(all_tokens, "rb") as f:
        f.seek(HEADER_BYTES)
        for _, lens, keys in _chunks(lengths, seed):
            is_val = keys < threshold
            ends = np.cumsum(lens)
            cuts = np.flatnonzero(np.diff(is_val)) + 1
            for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(lens)].tolist()):
                name, writer = ("val", val) if is_val[a] else ("train", train)
                n = int(ends[b - 1] - ends[a] + lens[a])
                for left in range(n, 0, -_COPY_CHUNK):
                    writer.write(np.fromfile(f, dtype=head.dtype, count=min(left, _COPY_CHUNK)))
                counts[name]["documents"] += b - a
                counts[name]["tokens"] += n
    if sum(c["tokens"] for c in counts.values()) != head.n_tokens:
        raise RuntimeError(f"split wrote {counts} but the corpus has {head.n_tokens} tokens")
    return counts


# Tokenizing ------------------------------------------------------------------------------------------------
class Progress:
    """documents, tokens, tokens/s on one stderr line: redrawn twice a second on a terminal, else every 30 s."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 30.0

    def line(self, docs: int, tokens: int) -> str:
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        return f"{docs:,} documents  {tokens:,} tokens  {rate / 1e6:.2f}M tokens/s"

    def update(self, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            print(("\r" if self.tty else "") + self.line(docs, tokens), end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


@dataclass
class Tokenized:
    documents: int
    tokens: int
    seconds: float


def tokenize(tok, docs: Iterable[str], eos_id: int, tokens_out: TokenWriter, lengths_out,
             max_tokens: int | None) -> Tokenized:
    """All documents (or the first ones past max_tokens), in order, into the temporary token file."""
    progress = Progress()
    n_docs = n_tokens = 0
    batch_chars = 1 << 20 if max_tokens is None else min(1 << 20, max(1 << 16, 4 * max_tokens))
    for enc in corpus.encode(tok, docs, eos_id, batch_chars=batch_chars):
        tokens, lengths = enc.tokens, enc.lengths
        if max_tokens is not None and n_tokens + len(tokens) >= max_tokens:
            keep = int(np.searchsorted(np.cumsum(lengths), max_tokens - n_tokens)) + 1  # through the crossing doc
            lengths = lengths[:keep]
            tokens = tokens[:int(lengths.sum())]
        tokens_out.write(tokens)
        lengths_out.write(lengths.astype(np.int64).tobytes())
        n_docs += len(lengths)
        n_tokens += len(tokens)
        progress.update(n_docs, n_tokens)
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    progress.done()
    return Tokenized(n_docs, n_tokens, time.perf_counter() - progress.start)


# The command -----------------------------------------------------------------------------------------------
def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    out = check_output(Path(cfg.out) if cfg.out else default_out(cfg.dataset), "--out", "folder", cfg.overwrite)
    check_apart({"--out": out}, *dataset_paths(cfg.model, cfg.dataset))

    offline = functools.cache(hub_offline)  # probed once, and only if a Hub id needs it
    tok_path = tokenizer_file(cfg.model, revision=cfg.revision)
    tok = read_tokenizer(tok_path)
    vocab, eos = vocab_size(tok), eos_token_id(tok, tok_path.parent)
    dtype = token_dtype(vocab)
    sources = [corpus.resolve(spec, offline=offline) for spec in cfg.dataset]
    filters = corpus.Filters(text_field=cfg.text_field,
                             language=None if cfg.language.lower() == corpus.ANY else cfg.language,
                             licenses=None if corpus.ANY in [x.lower() for x in cfg.licenses] else
                             tuple(cfg.licenses))
    stats = corpus.Stats()
    corpus.set_threads(cfg.workers)

    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        with atomic_output(out, "folder") as tmp:
            with TokenWriter(tmp / "all.bin", vocab, eos) as all_out, open(tmp / "lengths.i64", "wb") as len_out:
                done = tokenize(tok, corpus.documents(sources, filters, stats), eos, all_out, len_out, cfg.max_tokens)
            if done.documents == 0:
                raise UserError(_no_documents(cfg, stats))
            lengths = tmp / "lengths.i64"
            threshold = val_threshold(lengths, cfg.seed, cfg.val_tokens, cfg.val_fraction)
            with TokenWriter(tmp / "train.bin", vocab, eos) as train, TokenWriter(tmp / "val.bin", vocab, eos) as val:
                splits = write_split(tmp / "all.bin", lengths, cfg.seed, threshold, train, val)
            (tmp / "all.bin").unlink()
            lengths.unlink()
            meta = _meta(cfg, argv, tok_path, vocab, eos, tok.id_to_token(eos), dtype, splits, sources, filters,
                         stats, done)
            meta["fingerprint"] = token_file_hashes(tmp)  # hashed once here; train.py records it in each checkpoint
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            check_output(out, "--out", "folder", cfg.overwrite)  # it may have appeared while we were tokenizing
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    t, v = splits["train"], splits["val"]
    print(f"wrote {out}: train {t['documents']:,} documents {t['tokens']:,} tokens, val {v['documents']:,} "
          f"documents {v['tokens']:,} tokens ({dtype.name}, vocab {vocab:,}) in {done.seconds:.1f} s, "
          f"{done.tokens / max(done.seconds, 1e-9) / 1e6:.2f}M tokens/s")
    return meta


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _no_documents(cfg: PrepareConfig, stats: corpus.Stats) -> str:
    why = []
    if stats.filtered:
        why.append(f"{stats.filtered:,} records filtered out by --language {cfg.language} "
                   f"--licenses {' '.join(cfg.licenses)} (use 'any' to keep all)")
    if stats.empty:
        why.append(f"{stats.empty:,} empty")
    if stats.undecodable:
        why.append(f"{stats.undecodable:,} files not UTF-8 text (or binary)")
    return (f"no documents in {' '.join(cfg.dataset)} after filtering"
            + (f": {'; '.join(why)}" if why else "") + "; check --dataset and the filters")


def _source_meta(s: corpus.Source) -> dict:
    """A source as meta.json records it; what makes two machines' corpora agree: the pinned list's fingerprint for
    pkgdocs, the Python version for stdlib (its files change with the minor version)."""
    meta = {"spec": s.spec, "kind": s.kind, "files": len(s.files), "repo_id": s.repo_id, "revision": s.revision}
    if s.kind == "pkgdocs":
        meta["fingerprint"] = pkgdocs.fingerprint()
    elif s.kind == "stdlib":
        meta["python"] = platform.python_version()
    return meta


def _meta(cfg: PrepareConfig, argv, tok_path: Path, vocab: int, eos: int, eos_token: str | None, dtype: np.dtype,
          splits: dict, sources: list[corpus.Source], filters: corpus.Filters, stats: corpus.Stats,
          done: Tokenized) -> dict:
    return {
        "format": "phi3skip-tokens",
        "header_bytes": HEADER_BYTES,
        "tokenizer": cfg.model,
        "tokenizer_revision": cfg.revision,
        "tokenizer_sha256": tokenizer_hash(tok_path),
        "vocab_size": vocab,
        "eos_id": eos,
        "eos_token": eos_token,
        "dtype": dtype.name,
        "splits": splits,
        "documents": done.documents,
        "tokens": done.tokens,
        "sources": [_source_meta(s) for s in sources],
        "filters": asdict(filters),
        "skipped": {"filtered": stats.filtered, "empty": stats.empty, "undecodable_files": stats.undecodable},
        "split": {"seed": cfg.seed, "val_tokens": cfg.val_tokens, "val_fraction": cfg.val_fraction,
                  "by": "whole documents, splitmix64(seed, document index)"},
        "max_tokens": cfg.max_tokens,
        "command": shlex.join(["python", "prepare.py", *argv]),
    }


if __name__ == "__main__":
    run_main(main)
