"""phi3skip.data.tokenizer: tokenizer.json from a folder or the Hub cache, its hash, vocabulary and end-of-text token."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import bpe

from phi3skip.core.cli import UserError
from phi3skip.data.tokenizer import (check_data_tokenizer, eos_token_id, hub_offline, load_tokenizer, tokenizer_file,
                                     tokenizer_hash, vocab_size)

TEXT = """def greet(name):\n    return f"Hello, {name}!"\n\nclass Point:\n    x: int = 0\n    y: int = 0\n
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
for i in range(10):\n    print(i * i)  # squares\n"""


def build_tokenizer(folder: Path, special: str = "<|endoftext|>", vocab: int = 320) -> Path:
    return bpe.build_tokenizer(folder, TEXT * 20, special, vocab)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_load_from_folder_and_file(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tokenizer_file(tok_dir) == tok_dir / "tokenizer.json"
    assert tokenizer_file(tok_dir / "tokenizer.json") == tok_dir / "tokenizer.json"
    text = "def f(x):\n    return x + 1  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert vocab_size(tok) == max(tok.get_vocab(with_added_tokens=True).values()) + 1


def test_hash_is_sha256_of_bytes(tok_dir):
    path = tok_dir / "tokenizer.json"
    assert tokenizer_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_eos_is_endoftext(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert eos_token_id(tok) == tok.token_to_id("<|endoftext|>")


def test_eos_from_tokenizer_config_or_config(tmp_path):
    folder = build_tokenizer(tmp_path / "m", special="<my_eos>")
    tok = load_tokenizer(folder)
    with pytest.raises(UserError, match="no end-of-text token"):
        eos_token_id(tok, folder)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert eos_token_id(tok, folder) == 5
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
    assert eos_token_id(tok, folder) == tok.token_to_id("<my_eos>")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(UserError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="not a Hub model id"):
        load_tokenizer(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def _offline_cache(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    _offline_cache(monkeypatch, tmp_path / "empty-cache")
    assert hub_offline()
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"unreachable.*--model DIR") as e:
        load_tokenizer("microsoft/Phi-3-mini-4k-instruct")
    assert time.perf_counter() - start < 5
    assert "\n" not in str(e.value)


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tok_dir):
    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    _offline_cache(monkeypatch, cache)
    path = tokenizer_file("org/tiny")
    assert path.parent == snap and tokenizer_hash(path) == tokenizer_hash(tok_dir / "tokenizer.json")
    assert eos_token_id(load_tokenizer("org/tiny"), path.parent) == 0


def test_check_data_tokenizer(tmp_path, tok_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "x", "tokenizer_sha256": tokenizer_hash(
        tok_dir / "tokenizer.json"), "vocab_size": 320}))
    assert check_data_tokenizer(data, tok_dir)["vocab_size"] == 320
    other = build_tokenizer(tmp_path / "other", vocab=300)
    with pytest.raises(UserError, match="data was tokenized with another tokenizer"):
        check_data_tokenizer(data, other)
