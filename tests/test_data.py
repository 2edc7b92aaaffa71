"""phi3skip.data.tokens: the .bin format, its checks, and the deterministic, rank-disjoint, resumable batch reader."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from phi3skip.core.cli import UserError
from phi3skip.data.tokens import (HEADER_BYTES, Batches, Mixture, blend_pattern, TokenWriter, eval_batches,
                                  open_tokens, read_header, read_meta, token_dtype, write_tokens)


def test_dtype_choice():
    assert token_dtype(32064) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200064) == np.uint32


@pytest.mark.parametrize("vocab", [50, 70000])
def test_round_trip(tmp_path, vocab):
    ids = np.arange(1000) % vocab
    ids[-1] = vocab - 1
    path = write_tokens(tmp_path / "a.bin", ids, vocab, eos_id=0)
    head = read_header(path)
    assert (head.n_tokens, head.vocab_size, head.eos_id, head.dtype) == (1000, vocab, 0, token_dtype(vocab))
    assert path.stat().st_size == HEADER_BYTES + 1000 * head.dtype.itemsize
    tokens = open_tokens(path, vocab_size=vocab)
    assert tokens.dtype == token_dtype(vocab) and np.array_equal(tokens, ids)


def test_writer_streams_and_is_atomic(tmp_path):
    path = tmp_path / "t.bin"
    with TokenWriter(path, 100) as w:
        w.write([1, 2, 3])
        w.write(np.array([4, 5], dtype=np.int64))
        assert not path.exists()  # only a hidden temporary until closed
    assert open_tokens(path).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(KeyboardInterrupt):
        with TokenWriter(tmp_path / "u.bin", 100) as w:
            w.write([1, 2])
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with TokenWriter(tmp_path / "v.bin", 100) as w:
            w.write([100])
    assert not (tmp_path / "v.bin").exists()


def _bin(tmp_path, n=100, vocab=1000):
    return write_tokens(tmp_path / "x.bin", np.arange(n) % vocab, vocab)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"x\.bin: no such token file"):
        open_tokens(tmp_path / "x.bin")


def test_bad_magic(tmp_path):
    path = _bin(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[:8] = b"NOTMAGIC"
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"x\.bin: not a phi3skip token file"):
        open_tokens(path)


def test_truncated(tmp_path):
    path = _bin(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(UserError, match=r"x\.bin: truncated: the header promises 100 tokens"):
        open_tokens(path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match=r"x\.bin: truncated: 20 bytes"):
        open_tokens(path)


def test_trailing_bytes_and_bad_version(tmp_path):
    path = _bin(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(UserError, match="trailing bytes"):
        open_tokens(path)
    raw = bytearray(_bin(tmp_path).read_bytes())
    struct.pack_into("<I", raw, 8, 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="version 99"):
        open_tokens(path)


def test_vocab_mismatch(tmp_path):
    path = _bin(tmp_path, vocab=1000)
    assert len(open_tokens(path, vocab_size=1024)) == 100  # a padded embedding is fine
    with pytest.raises(UserError, match=r"x\.bin: made with a tokenizer of 1000 tokens but the model has 500"):
        open_tokens(path, vocab_size=500)


def test_corrupt_token_id(tmp_path):
    path = _bin(tmp_path, vocab=1000)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, HEADER_BYTES + 2 * 42, 4000)
    path.write_bytes(bytes(raw))
    open_tokens(path)  # ids are scanned only when the model's vocabulary is given
    with pytest.raises(UserError, match=r"x\.bin: token id 4000 at position 42 is outside the vocabulary of 1000"):
        open_tokens(path, vocab_size=1000)


def test_meta_mismatch(tmp_path):
    path = _bin(tmp_path, vocab=1000)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 1000}))
    assert read_meta(tmp_path)["vocab_size"] == 1000
    open_tokens(path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(UserError, match=r"x\.bin: vocabulary of 1000 in the header but 32000 in .*meta\.json"):
        open_tokens(path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(UserError, match=r"meta\.json: not readable JSON"):
        read_meta(tmp_path)


# The batch reader ------------------------------------------------------------------------------------------
N, T, B = 4001, 16, 4  # 250 windows


@pytest.fixture
def tokens(tmp_path):
    return write_tokens(tmp_path / "train.bin", np.arange(N) % 60000, 60000)


def test_x_y_are_shifted_windows(tokens):
    x, y = Batches(tokens, B, T).get(0)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert all(int(row[0]) % T == 0 for row in x)  # windows start every T tokens (ids equal positions here)


def test_deterministic_and_resumable(tokens):
    a = Batches(tokens, B, T, seed=3)
    first = [a.get(s) for s in range(12)]
    b = Batches(tokens, B, T, seed=3)  # a fresh reader resumes at step 9 without replaying 0..8
    for s in (9, 3, 11):
        assert all(torch.equal(u, v) for u, v in zip(b.get(s), first[s]))
    other = Batches(tokens, B, T, seed=4).get(0)[0]
    assert not torch.equal(other, first[0][0])


def test_ranks_disjoint_and_epoch_covers_once(tokens):
    world = 3
    readers = [Batches(tokens, B, T, seed=1, rank=r, world_size=world) for r in range(world)]
    spe = readers[0].steps_per_epoch
    assert spe == 250 // (B * world)
    seen = np.concatenate([r.window_ids(s) for s in range(spe) for r in readers])
    assert len(seen) == len(set(seen.tolist())) == spe * B * world  # no window twice within an epoch
    for s in range(spe):  # and the batches are those windows
        x, _ = readers[1].get(s)
        assert torch.equal(x[:, 0], torch.from_numpy(readers[1].window_ids(s) * T).long())
    next_epoch = np.concatenate([r.window_ids(spe) for r in readers])
    assert not np.array_equal(next_epoch, seen[: B * world])  # a new permutation each epoch


# A blend: two sources told apart by their token ids (code: 0..N-1, prose: 50000 + 0..M-1)
M = 1601  # 100 windows


def _mixture(tokens, weights=(1, 1), seed=0, rank=0, world=1, batch=B):
    prose = np.arange(M, dtype=np.uint16) + 50000
    return Mixture([Batches(tokens, batch, T, seed, rank, world), Batches(prose, batch, T, seed, rank, world)], weights)


def _source(x: torch.Tensor) -> list[int]:
    return [int(row[0] >= 50000) for row in x]


def test_blend_pattern_keeps_the_proportions_in_every_prefix():
    for weights in ([1, 1], [3, 1], [0.7, 0.2, 0.1], [1, 1000]):
        pat = blend_pattern(weights, 240)
        want = np.asarray(weights, float) / sum(weights)
        counts = np.bincount(pat, minlength=len(weights))
        assert counts.sum() == 240 and counts.min() >= 1
        assert np.all(np.abs(counts - want * 240) <= 1.0)
        for j in range(1, 241):  # smooth: no prefix runs ahead of a source's share by a whole sequence
            assert np.all(np.abs(np.bincount(pat[:j], minlength=len(weights)) - counts * j / 240) < 1.0 + 1e-9)
    assert blend_pattern([1, 1], 8).tolist() == [0, 1] * 4


def test_mixture_draws_sources_in_proportion_each_window_once(tokens):
    mix = _mixture(tokens, (3, 1))
    xs = [mix.get(s)[0] for s in range(60)]  # 240 sequences: one period
    sources = [src for x in xs for src in _source(x)]
    assert sum(sources) == 60  # a quarter prose
    starts = [int(row[0]) for x in xs for row in x]
    code = [v for v in starts if v < 50000]
    assert len(set(code)) == len(code) and all(v % T == 0 for v in code)  # each code window once, whole windows
    prose = [v - 50000 for v in starts if v >= 50000]
    assert len(set(prose)) == len(prose) == 60 and all(v % T == 0 for v in prose)
    x, y = mix.get(7)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_mixture_is_resumable_and_rank_disjoint(tokens):
    a = _mixture(tokens, seed=5)
    first = [a.get(s) for s in range(40)]  # past prose's 100 windows: its second epoch
    b = _mixture(tokens, seed=5)
    for s in (37, 2, 25):
        assert all(torch.equal(u, v) for u, v in zip(b.get(s), first[s]))
    assert not torch.equal(_mixture(tokens, seed=6).get(0)[0], first[0][0])
    world = 2
    readers = [_mixture(tokens, rank=r, world=world, batch=2) for r in range(world)]
    for s in range(10):
        rows = torch.cat([r.get(s)[0][:, 0] for r in readers]).tolist()
        assert len(set(rows)) == len(rows)  # the ranks read different windows
        single = _mixture(tokens, batch=2 * world).get(s)[0][:, 0].tolist()
        assert rows == single  # and together the global batch one process of that batch would read
    assert readers[0].steps_per_epoch == 100 * 240 // (120 * 4)  # prose comes round first


def test_mixture_errors(tokens):
    with pytest.raises(UserError, match="2 token files and 1 weights"):
        _mixture(tokens, (1,))
    with pytest.raises(UserError, match="each must be > 0"):
        _mixture(tokens, (1, 0))


def test_from_array_and_errors(tokens):
    arr = np.arange(100, dtype=np.uint16)
    x, y = Batches(arr, 2, 8).get(0)
    assert torch.equal(y, x + 1)
    with pytest.raises(UserError, match=r"4001 tokens make 2 windows of 2000\+1 tokens, fewer than one global "
                                        r"batch of 4 x 1"):
        Batches(tokens, B, 2000)
    with pytest.raises(UserError, match="rank 2 is outside a world of size 2"):
        Batches(tokens, B, T, rank=2, world_size=2)
    with pytest.raises(UserError, match="train.bin: made with a tokenizer of 60000 tokens but the model has 100"):
        Batches(tokens, B, T, vocab_size=100)


def test_eval_batches(tokens):
    batches = list(eval_batches(tokens, 64, T))
    assert [len(x) for x, _ in batches] == [64, 64, 64, 58]
    xs = torch.cat([x for x, _ in batches])
    assert torch.equal(xs[:, 0], torch.arange(250) * T)
    assert torch.equal(torch.cat([y for _, y in batches])[:, -1], (torch.arange(250) + 1) * T)
    capped = list(eval_batches(tokens, 3, T, max_tokens=5 * T))
    assert sum(len(x) for x, _ in capped) == 5
    with pytest.raises(UserError, match=r"4001 tokens are too few for one window of 5000\+1"):
        eval_batches(tokens, 1, 5000)
