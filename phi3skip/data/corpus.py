"""Text sources -> documents, and documents -> tokens in parallel batches.

A source is one of:
- `stdlib`: the .py files of the running interpreter's standard library (offline, real Python code);
- `pkgdocs`: prose about software, the same bytes on every machine: the long descriptions (READMEs) of a pinned
  list of pure-Python wheels, read from their zip files in a local cache (phi3skip/data/pkgdocs.py; one document per
  wheel, each checked against its sha256; `python -m phi3skip.data.pkgdocs` fetches them once);
- a local file, folder (searched recursively) or glob: .txt .md .rst .py are one document per file,
  .jsonl/.json/.parquet hold records with a text field; any of them may be gzipped (.gz);
- a Hub dataset id `org/name`, optionally `org/name@revision` and `:glob` on the repo's file paths
  (e.g. `codeparrot/github-code-clean:data/train-0000*.parquet`): files are fetched one by one.

Records are filtered on their `language` and `license` columns where they have them (the default keeps
Python under MIT/ISC, the original project's corpus). Everything streams: memory does not grow with the
corpus. The tokenizer is passed in; this module imports nothing from the package but cli.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import itertools
import json
import os
import queue
import re
import sysconfig
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..core.cli import UserError
from ..core.hub import hub_errors
from . import pkgdocs

TEXT_EXTS = (".txt", ".md", ".rst", ".py")
RECORD_EXTS = (".jsonl", ".json", ".parquet")
SUPPORTED = TEXT_EXTS + RECORD_EXTS  # each may be gzipped, but .parquet (compressed inside)
# In a Hub dataset repo only data files count, not its card, loading script or metadata (unless a pattern
# names them).
HUB_EXTS = (".parquet", ".jsonl", ".json", ".txt")
HUB_METADATA = ("dataset_info*.json", "dataset_dict.json", "state.json", "*/dataset_info*.json",
                "*/dataset_dict.json", "*/state.json")
TEXT_FIELDS = ("text", "code", "content")  # tried in order when no --text-field is given
DEFAULT_DATASET = "codeparrot/github-code-clean"
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^:]+))?(?::(?P<pattern>.+))?$")
# pydoc_data is the Python documentation's prose: kept out of the code corpus so it stays held-out text.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}
ANY = "any"  # --language any / --licenses any: no filter


class CorpusError(UserError):
    """A source that does not exist, is empty, or holds records without the text field."""


@dataclass(frozen=True)
class Filters:
    text_field: str | None = None  # None: the first of TEXT_FIELDS that a record has
    language: str | None = "Python"  # kept where a record has a `language` column; None keeps all
    licenses: tuple[str, ...] | None = ("mit", "isc")  # likewise for a `license` column

    def keep(self, record: dict[str, Any]) -> bool:
        lang, lic = record.get("language"), record.get("license")
        if self.language and lang is not None and str(lang).lower() != self.language.lower():
            return False
        if self.licenses and lic is not None and str(lic).lower() not in {x.lower() for x in self.licenses}:
            return False
        return True


@dataclass(frozen=True)
class Source:
    spec: str  # as the user wrote it
    kind: str  # "stdlib" | "pkgdocs" | "local" | "hub"
    files: tuple[str, ...]  # local paths, or file names inside the Hub repo
    repo_id: str | None = None
    revision: str | None = None
    offline: bool = False  # hub: files come from the local cache only


@dataclass
class Stats:
    documents: int = 0
    filtered: int = 0  # records dropped by the language/licence filters
    empty: int = 0  # empty documents skipped
    undecodable: int = 0  # text files that are not UTF-8 text (or are binary), skipped
    files: int = 0
    per_source: dict[str, int] = field(default_factory=dict)


def _supported(name: str) -> bool:
    name = name.lower()
    return name.endswith(SUPPORTED) or (name.endswith(".gz") and name[:-3].endswith(TEXT_EXTS + (".jsonl", ".json")))


# Resolving sources ------------------------------------------------------------------------------------------
def stdlib_files() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _local_files(spec: str) -> list[str] | None:
    """Files a local spec names, sorted; None when it names nothing local."""
    path = Path(spec).expanduser()
    if path.is_file():
        if not _supported(path.name):
            raise CorpusError(f"{spec}: unsupported file type; use {' '.join(SUPPORTED)} (optionally .gz)")
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _supported(p.name))
        if not files:
            raise CorpusError(f"{spec}: no {' '.join(SUPPORTED)} files in this folder")
        return files
    if glob.has_magic(spec):
        matches = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        files = [p for p in matches if _supported(p)]
        if not files and not matches and _HUB_ID.match(spec):
            return None  # org/name:pattern of a Hub dataset
        if not files:
            raise CorpusError(f"{spec}: matches no {' '.join(SUPPORTED)} files")
        return files
    return None


def local_root(spec: str) -> tuple[Path, bool] | None:
    """What a --dataset value reads on this machine, for the path rule (paths.check_apart): (path, whole). The file
    or folder, the standard library's folder for `stdlib`, a glob's folder (its part before the first wildcard);
    `whole` when every file below it may be read (a folder, `**`, a wildcard before the last part), so that an
    output inside it would be read back. None for a Hub dataset."""
    if spec == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"]), True
    if spec == "pkgdocs":
        return pkgdocs.cache_dir(), True
    path = Path(spec).expanduser()
    if path.exists():
        return path, True
    if glob.has_magic(spec):
        parts = path.parts
        first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:first] or ["."])
        return (root, "**" in spec or first < len(parts) - 1) if root.is_dir() else None
    return None


def _hub_source(spec: str, repo: str, revision: str | None, pattern: str | None, offline: bool) -> Source:
    from huggingface_hub import HfApi, snapshot_download

    hint = "use --dataset stdlib or a local path (files, folders, globs)"
    with hub_errors(f"{spec}: not a local path, and as a Hub dataset", hint, CorpusError, revision):
        if offline:  # only what an earlier run left in the cache
            root = Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
            names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        else:
            names = sorted(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))
    if pattern is not None:
        files = [n for n in names if _supported(n) and fnmatch.fnmatch(n, pattern)]
    else:
        files = [n for n in names if n.lower().removesuffix(".gz").endswith(HUB_EXTS)
                 and not any(fnmatch.fnmatch(n, m) for m in HUB_METADATA)]
    if not files:
        where = f" matching {pattern!r}" if pattern else ""
        cached = " in the local cache" if offline else ""
        kinds = SUPPORTED if pattern else HUB_EXTS
        raise CorpusError(f"{spec}: no {' '.join(kinds)} files{where}{cached} (optionally .gz)")
    return Source(spec, "hub", tuple(files), repo, revision, offline)


def resolve(spec: str, offline: bool | Callable[[], bool] | None = None) -> Source:
    """What a --dataset value names, checked now so that a bad source fails before any tokenizing.

    `offline`: True to use only the local Hugging Face cache for Hub datasets; a callable is asked only when
    a Hub id needs it (a network probe); None: the HF_HUB_OFFLINE variable decides.
    """
    if spec == "stdlib":
        return Source(spec, "stdlib", tuple(stdlib_files()))
    if spec == "pkgdocs":
        return Source(spec, "pkgdocs", tuple(pkgdocs.files()))  # each checked against its sha256
    files = _local_files(spec)
    if files is not None:
        return Source(spec, "local", tuple(files))
    m = _HUB_ID.match(spec)
    if m is None or spec.startswith((".", "/", "~")):
        raise CorpusError(f"unknown dataset source {spec!r}: not 'stdlib' or 'pkgdocs', an existing file, folder or glob, "
                          f"nor a Hub dataset id (org/name[@revision][:pattern])")
    if callable(offline):
        offline = offline()
    elif offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return _hub_source(spec, m["repo"], m["rev"], m["pattern"], offline)


# Reading documents ------------------------------------------------------------------------------------------
def _open_text(path: str) -> io.TextIOBase:
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_of(record: Any, where: str, filters: Filters) -> str | None:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object per record, got {type(record).__name__}")
    if filters.text_field is not None:
        if filters.text_field not in record:
            raise CorpusError(f"{where}: record has no field {filters.text_field!r} (it has "
                              f"{', '.join(map(str, record)) or 'none'}); pass --text-field NAME")
        text = record[filters.text_field]
    else:
        name = next((f for f in TEXT_FIELDS if f in record), None)
        if name is None:
            raise CorpusError(f"{where}: record has none of the fields {', '.join(TEXT_FIELDS)} (it has "
                              f"{', '.join(map(str, record)) or 'none'}); pass --text-field NAME")
        text = record[name]
    if text is not None and not isinstance(text, str):
        raise CorpusError(f"{where}: the text field holds {type(text).__name__}, not a string; pass --text-field")
    return text


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
    """(location, record) from JSON lines (streamed), or from one JSON array / object (read whole)."""
    lower = path.lower().removesuffix(".gz")
    if lower.endswith(".json"):
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                data = None  # maybe JSON lines under a .json name
        if data is not None:
            for i, rec in enumerate(data if isinstance(data, list) else [data]):
                yield f"{path} record {i + 1}", rec
            return
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path} line {i}: not valid JSON ({e.msg}); fix or remove the line") from None


def _json_docs(path: str, filters: Filters, stats: Stats) -> Iterator[str]:
    for where, rec in _json_records(path):
        text = _text_of(rec, where, filters)  # checked before filtering: a missing field is always an error
        if not filters.keep(rec):
            stats.filtered += 1
        elif text is not None:
            yield text


def _parquet_docs(path: str, filters: Filters, stats: Stats) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    text_field = filters.text_field or next((f for f in TEXT_FIELDS if f in columns), None)
    if text_field not in columns:
        wanted = repr(filters.text_field) if filters.text_field else "any of " + ", ".join(TEXT_FIELDS)
        raise CorpusError(f"{path}: no column {wanted} (it has {', '.join(columns)}); pass --text-field NAME")
    wanted_cols = [text_field] + [c for c in ("language", "license") if c in columns and c != text_field]
    for batch in pf.iter_batches(batch_size=1024, columns=wanted_cols):  # row groups stream: constant memory
        mask = None
        if filters.language and "language" in wanted_cols:
            mask = pc.equal(pc.utf8_lower(batch.column("language")), filters.language.lower())
        if filters.licenses and "license" in wanted_cols:
            lic = pc.is_in(pc.utf8_lower(batch.column("license")),
                           value_set=pa.array([x.lower() for x in filters.licenses]))
            mask = lic if mask is None else pc.and_(mask, lic)
        texts = batch.column(text_field)
        if mask is not None:
            mask = pc.fill_null(mask, True)  # a record without a value is not filtered out
            kept = texts.filter(mask)
            stats.filtered += len(texts) - len(kept)
            texts = kept
        for text in texts.to_pylist():
            if text is not None:
                if not isinstance(text, str):
                    raise CorpusError(f"{path}: column {text_field!r} is not text; pass --text-field")
                yield text


class NotText(CorpusError):
    """A file that is not text: not UTF-8, or binary."""


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a document file (gzip allowed): UTF-8 without NUL bytes, else `NotText`.

    The one rule for text, in prepare.py (such files are skipped and counted) and in scripts/evaluate.py
    (refused): bytes are never guessed into text.
    """
    try:
        with _open_text(str(path)) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise NotText(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except (OSError, EOFError) as e:  # unreadable, or a damaged .gz
        raise CorpusError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if "\x00" in text:
        raise NotText(f"{path}: a binary file (it holds NUL bytes), not text")
    return text


def _text_doc(path: str, stats: Stats) -> Iterator[str]:
    try:
        yield read_text_file(path)
    except NotText:
        stats.undecodable += 1  # skipped rather than guessed


def file_documents(path: str, filters: Filters, stats: Stats) -> Iterator[str]:
    name = path.lower().removesuffix(".gz")
    if name.endswith(TEXT_EXTS):
        return _text_doc(path, stats)
    if name.endswith(".parquet"):
        return _parquet_docs(path, filters, stats)
    return _json_docs(path, filters, stats)


def _fetch(source: Source, name: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        with hub_errors(f"{source.spec} ({name})", "check the network, or download the dataset first",
                        CorpusError, source.revision):
            return hf_hub_download(source.repo_id, name, repo_type="dataset", revision=source.revision,
                                   local_files_only=source.offline)
    except CorpusError:
        raise
    except Exception as e:  # network or cache failure midway: one line, not a traceback
        raise CorpusError(f"{source.spec}: cannot fetch {name} ({type(e).__name__}); check the network, "
                          f"or download the dataset first") from None


def documents(sources: Iterable[Source], filters: Filters = Filters(), stats: Stats | None = None) -> Iterator[str]:
    """Every non-empty document of every source, in a fixed order (sources as given, files sorted)."""
    stats = stats if stats is not None else Stats()
    for source in sources:
        stats.per_source.setdefault(source.spec, 0)
        for name in source.files:
            path = _fetch(source, name) if source.kind == "hub" else name
            stats.files += 1
            try:
                docs = [pkgdocs.description(path)] if source.kind == "pkgdocs" else file_documents(path, filters, stats)
                for text in docs:
                    if not text:
                        stats.empty += 1
                        continue
                    stats.documents += 1
                    stats.per_source[source.spec] += 1
                    yield text
            except (OSError, ValueError, EOFError, zlib.error) as e:  # unreadable, not UTF-8, bad or truncated gzip,
                # corrupt parquet
                first = str(e).splitlines()[0] if str(e) else ""
                raise CorpusError(f"{path}: cannot read it ({type(e).__name__}: {first[:200]}); fix or remove "
                                  f"the file") from None


# Tokenizing -------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A batch of documents as one token array, each document followed by the end-of-text token."""
    tokens: np.ndarray  # uint32
    lengths: np.ndarray  # int64 tokens per document, end-of-text included


def _batched(docs: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prefetch(items: Iterator[list[str]], depth: int) -> Iterator[list[str]]:
    """Read the next batches in a thread: file reading and JSON parsing overlap the (GIL-free) tokenizing."""
    q: queue.Queue = queue.Queue(maxsize=depth)  # bounded: memory stays constant
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    thread = threading.Thread(target=produce, name="corpus-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def encode(tok: Any, docs: Iterable[str], eos_id: int, batch_chars: int = 1 << 20,
           prefetch: int = 2) -> Iterator[Encoded]:
    """Tokenize documents in order, in batches of about `batch_chars` characters, with the tokenizers
    library's own thread pool (`encode_batch_fast`: no offsets; threads: see `set_threads`).

    Special-token strings inside a document (a literal "<|endoftext|>" in some code) are tokenized as plain
    text, so the only end-of-text tokens in the output are the separators added here.
    """
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets): tokenizers >= 0.20
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        for batch in _prefetch(_batched(docs, batch_chars), prefetch):
            ids = [e.ids for e in encode_batch(batch, add_special_tokens=False)]
            lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            with_eos = itertools.chain.from_iterable(itertools.chain(x, (eos_id,)) for x in ids)
            yield Encoded(np.fromiter(with_eos, dtype=np.uint32, count=int(lengths.sum())), lengths)
    finally:
        tok.encode_special_tokens = saved


def set_threads(workers: int | None) -> None:
    """Tokenizer threads; takes effect only before the tokenizers library first runs a batch."""
    if workers:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # keep batches parallel even after a fork
