"""Token files and the batch reader.

A .bin file is a 256-byte little-endian header, then the tokens (as in llm.c):

    magic    8 bytes  b"P3SKTOK\\0"
    version  uint32   1
    itemsize uint32   2 (uint16 tokens: the vocabulary fits in 65536) or 4 (uint32)
    tokens   uint64   number of tokens after the header
    vocab    uint64   tokenizer vocabulary size (largest id + 1)
    eos      int64    the end-of-text id that separates documents (-1: none)
    zeros up to 256 bytes

`Batches` cuts the stream into windows of T+1 tokens starting every T tokens (inputs never overlap, and
every token but the first is a target exactly once per epoch) and serves them in a per-epoch permutation
seeded by (seed, epoch). Sample i of rank r at step s is global sample s*B*W + r*B + i, so a batch depends
only on (seed, step, rank, world_size): ranks are disjoint and training resumes at any step without
replaying the ones before.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..core.cli import UserError
from ..core.paths import publish, read_json_object, remove, temp_sibling
from .pkgdocs import file_sha256

MAGIC = b"P3SKTOK\0"
VERSION = 1
HEADER_BYTES = 256
_FIELDS = struct.Struct("<8sIIQQq")
META_FILE = "meta.json"
_SCAN_CHUNK = 1 << 24  # tokens per chunk when checking ids: constant memory on any file size


class TokenFileError(UserError):
    """A .bin or meta.json that is missing, corrupt, truncated, or made with another vocabulary."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32 (Phi-4-mini has 200k tokens)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class TokenHeader:
    n_tokens: int
    vocab_size: int
    eos_id: int | None
    dtype: np.dtype
    version: int = VERSION

    def pack(self) -> bytes:
        eos = -1 if self.eos_id is None else self.eos_id
        fields = _FIELDS.pack(MAGIC, self.version, self.dtype.itemsize, self.n_tokens, self.vocab_size, eos)
        return fields.ljust(HEADER_BYTES, b"\0")


def read_header(path: str | os.PathLike) -> TokenHeader:
    """Parse and check a .bin header against the file size; every problem names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise TokenFileError(f"{path}: no such token file; create it with prepare.py") from None
    except OSError as e:
        raise TokenFileError(f"{path}: cannot read it ({e.strerror})") from None
    if len(raw) < _FIELDS.size:
        raise TokenFileError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, itemsize, n, vocab, eos = _FIELDS.unpack_from(raw)
    if magic != MAGIC:
        raise TokenFileError(f"{path}: not a phi3skip token file (magic {magic!r}, expected {MAGIC!r}); "
                             f"create it with prepare.py")
    if version != VERSION:
        raise TokenFileError(f"{path}: token file version {version}, this code reads version {VERSION}; "
                             f"re-create it with this prepare.py")
    if itemsize not in (2, 4) or vocab == 0 or token_dtype(vocab).itemsize != itemsize:
        raise TokenFileError(f"{path}: corrupt header: {itemsize}-byte tokens for a vocabulary of {vocab}")
    expected = HEADER_BYTES + n * itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise TokenFileError(f"{path}: {what}: the header promises {n} tokens ({expected} bytes) but the file "
                             f"has {size} bytes; re-create it with prepare.py")
    if not -1 <= eos < vocab:
        raise TokenFileError(f"{path}: corrupt header: end-of-text id {eos} outside the vocabulary of {vocab}")
    return TokenHeader(n, vocab, None if eos < 0 else eos, token_dtype(vocab), version)


def read_meta(folder: str | os.PathLike) -> dict:
    """meta.json of a prepared data folder (see prepare.py for its keys)."""
    path = Path(folder) / META_FILE
    try:
        return read_json_object(path, "; re-create it with prepare.py", TokenFileError)
    except FileNotFoundError:
        raise TokenFileError(f"{path}: not found; prepare the folder with prepare.py") from None


FINGERPRINTED = ("train.bin", "val.bin")  # the files a data folder's fingerprint covers


def token_file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """{"train.bin": "sha256:...", "val.bin": ...}: what prepare.py keeps in meta.json's `fingerprint`."""
    return {name: "sha256:" + file_sha256(Path(folder) / name) for name in FINGERPRINTED}


def data_fingerprint(folder: str | os.PathLike) -> str:
    """One name for the tokens a data folder holds: sha256 over its files' hashes. They come from meta.json, where
    prepare.py keeps them (hashed once, as it writes the folder); a folder made before that is hashed now, one read
    of train.bin and val.bin (about 1 s per GB on one core), each time a run starts or resumes on it."""
    hashes = read_meta(folder).get("fingerprint")
    if not (isinstance(hashes, dict) and all(isinstance(hashes.get(n), str) for n in FINGERPRINTED)):
        hashes = token_file_hashes(folder)
    return "sha256:" + hashlib.sha256("".join(f"{n} {hashes[n]}\n" for n in FINGERPRINTED).encode()).hexdigest()


def open_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a .bin file after checking its header, size, and the meta.json beside it.

    With `vocab_size` (the model's embedding rows), the file's vocabulary must fit in it and every id is
    checked to be below it: one sequential pass, in chunks.
    """
    path = Path(path)
    head = read_header(path)
    meta_path = path.parent / META_FILE
    if meta_path.exists():
        meta_vocab = read_meta(path.parent).get("vocab_size")
        if meta_vocab is not None and meta_vocab != head.vocab_size:
            raise TokenFileError(f"{path}: vocabulary of {head.vocab_size} in the header but {meta_vocab} in "
                                 f"{meta_path}; the folder mixes files from different runs, re-create it")
    if vocab_size is not None and head.vocab_size > vocab_size:
        raise TokenFileError(f"{path}: made with a tokenizer of {head.vocab_size} tokens but the model has "
                             f"{vocab_size}; prepare the data with this model's tokenizer (prepare.py --model)")
    if head.n_tokens == 0:
        return np.zeros(0, dtype=head.dtype)  # mmap cannot map zero bytes
    tokens = np.memmap(path, dtype=head.dtype, mode="r", offset=HEADER_BYTES, shape=(head.n_tokens,))
    if vocab_size is not None:
        _check_ids(path, tokens, min(vocab_size, head.vocab_size))
    return tokens


def _check_ids(path: Path, tokens: np.ndarray, limit: int) -> None:
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        top = int(chunk.max())
        if top >= limit:
            pos = start + int(np.argmax(chunk >= limit))
            raise TokenFileError(f"{path}: token id {top} at position {pos} is outside the vocabulary of {limit}; "
                                 f"the file is corrupt or from another tokenizer, re-create it with prepare.py")


class TokenWriter:
    """Append tokens to a .bin file as they come; the file appears under its name only when complete.

    Writes to a hidden temporary file in the same folder and `os.replace`s it on `close()`; an exception
    inside `with TokenWriter(...)` (Ctrl-C included) deletes the temporary file instead.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int, eos_id: int | None = None):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype = token_dtype(vocab_size)
        self.n_tokens = 0
        self.tmp = temp_sibling(self.path)
        self._f = open(self.tmp, "wb", buffering=1 << 20)
        self._f.write(self._header().pack())  # placeholder count, rewritten on close

    def _header(self) -> TokenHeader:
        return TokenHeader(self.n_tokens, self.vocab_size, self.eos_id, self.dtype)

    def write(self, ids: np.ndarray | list[int]) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary of {self.vocab_size}")
        self._f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += ids.size

    def close(self) -> Path:
        self._f.seek(0)
        self._f.write(self._header().pack())
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        remove(self.tmp)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tokens(path: str | os.PathLike, ids: np.ndarray | list[int], vocab_size: int,
                 eos_id: int | None = None) -> Path:
    """A whole .bin file at once (tests, small data)."""
    with TokenWriter(path, vocab_size, eos_id) as w:
        w.write(ids)
    return Path(path)


# Reading batches -------------------------------------------------------------------------------------------
def _as_tokens(tokens: str | os.PathLike | np.ndarray, vocab_size: int | None) -> np.ndarray:
    return tokens if isinstance(tokens, np.ndarray) else open_tokens(tokens, vocab_size)


def _name(tokens: str | os.PathLike | np.ndarray) -> str:
    return "the token array" if isinstance(tokens, np.ndarray) else str(tokens)


def _windows(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens starting every seq_len tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def _stack(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).astype(np.int64)
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _to(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    if device is None or torch.device(device).type == "cpu":
        return x
    return x.pin_memory().to(device, non_blocking=True)


class Batches:
    """Deterministic, rank-disjoint, resumable training batches: `get(step)` -> (x, y) int64 [B, T].

    An epoch is `steps_per_epoch` steps that use `steps_per_epoch * B * world_size` windows of a fresh
    permutation; the few windows that do not fill a last global batch differ from epoch to epoch.
    """

    def __init__(self, tokens: str | os.PathLike | np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of size {world_size}")
        self.tokens = _as_tokens(tokens, vocab_size)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = _windows(len(self.tokens), seq_len)
        global_batch = batch_size * world_size
        if self.n_windows < global_batch:
            raise UserError(f"{_name(tokens)}: {len(self.tokens)} tokens make {self.n_windows} windows of "
                            f"{seq_len}+1 tokens, fewer than one global batch of {batch_size} x {world_size} "
                            f"ranks; lower the batch size or sequence length, or prepare more data")
        self.steps_per_epoch = self.n_windows // global_batch
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step never spans epochs; keep the current and the last one
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def window_ids(self, step: int) -> np.ndarray:
        """Indices of this rank's windows at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, s = divmod(step, self.steps_per_epoch)
        first = (s * self.world_size + self.rank) * self.batch_size
        return self._perm(epoch)[first:first + self.batch_size]

    def get(self, step: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _stack(self.tokens, self.window_ids(step) * self.seq_len, self.seq_len)
        return _to(x, device), _to(y, device)


class Mixture:
    """Training batches blended from several token files in fixed proportions (a data blend, as Megatron's
    --data-path weights): `get(step)` -> (x, y) like Batches.

    Sequence n of the run (step * global batch + rank * B + i) takes its source from a fixed pattern of PERIOD
    sequences that interleaves the sources smoothly in their proportions (so a batch of two from a 1:1 blend
    holds one of each), and the next window of that source's own shuffled order: what any step reads is a
    function of the step alone, so a run resumes exactly. An epoch is the steps until the source read fastest
    for its size comes round.
    """

    PERIOD = 240  # sequences a pattern repeats over: proportions are kept to 1/240

    def __init__(self, parts: Sequence[Batches], weights: Sequence[float]):
        if len(parts) != len(weights) or not parts:
            raise UserError(f"{len(parts)} token files and {len(weights)} weights: give one weight per file")
        if any(not w > 0 for w in weights):
            raise UserError(f"data weights {list(weights)}: each must be > 0")
        self.parts = list(parts)
        first = self.parts[0]
        self.batch_size, self.seq_len, self.seed = first.batch_size, first.seq_len, first.seed
        self.rank, self.world_size = first.rank, first.world_size
        self.pattern = blend_pattern(weights, self.PERIOD)
        counts = np.bincount(self.pattern, minlength=len(parts))
        # sequences of source m before position j of the pattern
        self._before = np.stack([np.concatenate([[0], np.cumsum(self.pattern == m)[:-1]]) for m in range(len(parts))])
        self._per_period = counts
        g = self.batch_size * self.world_size
        self.steps_per_epoch = max(1, min(int(b.n_windows * self.PERIOD / (c * g)) for b, c in zip(parts, counts)))

    def _window(self, n: int) -> tuple[int, int]:
        """(source, window index) of sequence n."""
        period, j = divmod(n, self.PERIOD)
        m = int(self.pattern[j])
        count = period * int(self._per_period[m]) + int(self._before[m, j])  # this source's sequences before n
        part = self.parts[m]
        epoch, i = divmod(count, part.n_windows)
        return m, int(part._perm(epoch)[i])

    def get(self, step: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = (step * self.world_size + self.rank) * self.batch_size
        rows = [self._window(n) for n in range(first, first + self.batch_size)]
        buf = np.stack([self.parts[m].tokens[w * self.seq_len:(w + 1) * self.seq_len + 1] for m, w in rows])
        t = torch.from_numpy(buf.astype(np.int64))
        return _to(t[:, :-1].contiguous(), device), _to(t[:, 1:].contiguous(), device)


def blend_pattern(weights: Sequence[float], period: int) -> np.ndarray:
    """Source indices for `period` sequences in the weights' proportions (largest remainder, each source at least
    once), interleaved by smooth weighted round robin: every prefix stays within one sequence of its share."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    counts = np.maximum(1, np.floor(w * period)).astype(np.int64)
    for m in np.argsort(-(w * period - np.floor(w * period)), kind="stable"):
        if counts.sum() >= period:
            break
        counts[m] += 1
    while counts.sum() > period:  # the at-least-one rule overshot: take from the largest
        counts[np.argmax(counts)] -= 1
    credit = np.zeros(len(w))
    out = np.empty(period, dtype=np.int64)
    for j in range(period):
        credit += counts
        m = int(np.argmax(credit))
        credit[m] -= period
        out[j] = m
    return out


def eval_batches(tokens: str | os.PathLike | np.ndarray, batch_size: int, seq_len: int,
                 max_tokens: int | None = None, vocab_size: int | None = None,
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: consecutive windows from the start, the last batch possibly smaller.

    `max_tokens` caps the tokens predicted (whole windows, at least one), so a number means the same text
    for every model and run.
    """
    data = _as_tokens(tokens, vocab_size)
    n = _windows(len(data), seq_len)
    if n == 0:
        raise UserError(f"{_name(tokens)}: {len(data)} tokens are too few for one window of {seq_len}+1 tokens; "
                        f"lower the sequence length or prepare more validation data")
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    return _sequential(data, n, batch_size, seq_len, device)  # errors above come at the call, not at next()


def _sequential(data: np.ndarray, n: int, batch_size: int, seq_len: int,
                device: torch.device | str | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, n, batch_size):
        starts = np.arange(first, min(first + batch_size, n)) * seq_len
        x, y = _stack(data, starts, seq_len)
        yield _to(x, device), _to(y, device)
