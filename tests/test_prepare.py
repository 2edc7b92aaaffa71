"""prepare.py and phi3skip.data.corpus: round trip, counts, dtype, split, sources, and every bad input."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import bpe

from phi3skip.data import corpus
from phi3skip.core.cli import UserError
from phi3skip.data.tokens import open_tokens, read_header, read_meta

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare", ROOT / "prepare.py")
prepare = sys.modules["prepare"] = importlib.util.module_from_spec(_spec)  # the script, imported by path
_spec.loader.exec_module(prepare)

TRAIN_TEXT = "def f(x):\n    return x * 2  # double\n\nThe quick brown fox jumps over the lazy dog.\n" * 40


def build_tokenizer(folder: Path, special: str = "<|endoftext|>", vocab: int = 320) -> Path:
    return bpe.build_tokenizer(folder, TRAIN_TEXT, special, vocab)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    t.encode_special_tokens = True  # as prepare does: a literal <|endoftext|> in a document is plain text
    return t


DOCS = {
    "a.txt": "Hello world.\nSecond line, ünïcode ✓\n",
    "b.md": "# Title\n\nSome *markdown* text.\n",
    "c.py": 'EOT = "<|endoftext|>"  # must stay text, not become a separator\n',
    "empty.txt": "",
}
RECORDS = [{"text": f"record {i}: " + "lorem ipsum " * (i % 7)} for i in range(6)]


@pytest.fixture
def docs_dir(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n\n")
    (folder / "e.json").write_text(json.dumps(RECORDS[3:5]))
    with gzip.open(folder / "f.jsonl.gz", "wt") as f:
        f.write(json.dumps(RECORDS[5]) + "\n")
    (folder / "ignored.bin").write_bytes(b"\0\1")
    return folder


def expected_docs() -> list[str]:
    """In source order: files sorted by path, records in file order, empty documents skipped."""
    return [DOCS["a.txt"], DOCS["b.md"], DOCS["c.py"]] + [r["text"] for r in RECORDS[:5]] + [RECORDS[5]["text"]]


def run(*args: str | Path) -> dict:
    return prepare.main([str(a) for a in args])


def split_docs(path: Path, eos: int) -> list[np.ndarray]:
    tokens = np.asarray(open_tokens(path))
    assert len(tokens) == 0 or tokens[-1] == eos  # every document ends with the separator
    ends = np.flatnonzero(tokens == eos)
    return [tokens[a + 1:b] for a, b in zip(np.r_[-1, ends[:-1]], ends)]


def decoded(out: Path, tok: Tokenizer, split: str) -> list[str]:
    eos = read_meta(out)["eos_id"]
    return [tok.decode(d.tolist(), skip_special_tokens=False) for d in split_docs(out / f"{split}.bin", eos)]


# Round trip and counts -------------------------------------------------------------------------------------
def test_round_trip_and_counts(tmp_path, docs_dir, tok_dir, tok):
    out = tmp_path / "data" / "docs"
    meta = run("--dataset", docs_dir, "--model", tok_dir, "--out", out, "--val-fraction", "0.3", "--seed", "1")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    train, val = decoded(out, tok, "train"), decoded(out, tok, "val")
    want = expected_docs()
    assert sorted(train + val) == sorted(want)  # decoding gives back the source text, document by document
    assert train == [d for d in want if d in train] and val and train  # order kept, both splits used
    direct = [len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in want]
    assert meta["tokens"] == sum(direct) == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert meta["documents"] == len(want)
    assert meta["splits"]["val"]["tokens"] == read_header(out / "val.bin").n_tokens
    assert meta["tokenizer_sha256"] and meta["vocab_size"] == 310 and meta["dtype"] == "uint16"
    assert meta["eos_token"] == "<|endoftext|>" and meta["skipped"]["empty"] == 1
    assert "prepare.py --dataset" in meta["command"]


def _wheel(folder: Path, name: str, metadata: str) -> tuple[Path, str]:
    """A minimal wheel (a zip with NAME-1.0.dist-info/METADATA and a module that must never run), and its sha256."""
    import hashlib
    import zipfile
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", metadata)
        z.writestr(f"{name}/__init__.py", "raise SystemExit('a pinned wheel was executed')\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pinned(tmp_path, monkeypatch) -> Path:
    """A cache of three pinned wheels (one without a description) in place of the real list."""
    from phi3skip.data import pkgdocs
    cache = tmp_path / "wheels"
    cache.mkdir()
    texts = {"alpha": "Metadata-Version: 2.1\nName: alpha\n\n# Alpha\n\nReads files.\n",
             "old": "Metadata-Version: 1.1\nName: old\nDescription: Old style.\n        Second line.\n",
             "bare": "Metadata-Version: 2.1\nName: bare\n"}
    wheels = []
    for name, text in texts.items():
        path, sha = _wheel(cache, name, text)
        wheels.append(pkgdocs.Wheel(name, "1.0", path.name, sha))
    monkeypatch.setattr(pkgdocs, "WHEELS", tuple(wheels))
    monkeypatch.setenv("PHI3SKIP_PKGDOCS_CACHE", str(cache))
    return cache


def test_pkgdocs_are_the_pinned_wheels_descriptions(tmp_path, tok_dir, tok, pinned):
    from phi3skip.data import pkgdocs
    source = corpus.resolve("pkgdocs")
    assert source.kind == "pkgdocs" and [Path(f).name for f in source.files] == [w.filename for w in pkgdocs.WHEELS]
    stats = corpus.Stats()
    docs = list(corpus.documents([source], stats=stats))
    assert docs == ["# Alpha\n\nReads files.", "Old style.\nSecond line."]  # the list's order; nothing ran
    assert stats.empty == 1 and stats.per_source == {"pkgdocs": 2}
    out = tmp_path / "docs"
    meta = run("--dataset", "pkgdocs", "--model", tok_dir, "--out", out, "--val-tokens", "1")
    assert meta["documents"] == 2 and meta["sources"][0]["kind"] == "pkgdocs"
    assert meta["sources"][0]["fingerprint"] == pkgdocs.fingerprint()
    assert sorted(decoded(out, tok, "train") + decoded(out, tok, "val")) == sorted(docs)


def test_the_pinned_list_is_pure_python_wheels_with_distinct_names():
    from phi3skip.data import pkgdocs
    assert len(pkgdocs.WHEELS) == len({w.name.lower() for w in pkgdocs.WHEELS}) >= 50
    assert all(w.filename.endswith("-none-any.whl") and len(w.sha256) == 64 for w in pkgdocs.WHEELS)
    assert pkgdocs.fingerprint().startswith("sha256:") and pkgdocs.fingerprint() != pkgdocs.fingerprint(
        pkgdocs.WHEELS[1:])


@pytest.mark.parametrize("damage,words", [
    (lambda c, w: w.unlink(), r"pkgdocs: 1 of the 3 pinned wheels are not in .*first: alpha-1\.0-py3-none-any"
                              r"\.whl.*python -m phi3skip\.data\.pkgdocs"),
    (lambda c, w: w.write_bytes(w.read_bytes()[:-10]), r"alpha-1\.0-py3-none-any\.whl: sha256 .* is not the pinned "
                                                        r".*python -m phi3skip\.data\.pkgdocs"),
    (lambda c, w: [p.unlink() for p in c.iterdir()], r"3 of the 3 pinned wheels are not in"),
])
def test_pkgdocs_offline_without_the_wheels_is_one_line(tmp_path, tok_dir, pinned, damage, words):
    damage(pinned, pinned / "alpha-1.0-py3-none-any.whl")
    with pytest.raises(UserError, match=words) as e:
        run("--dataset", "pkgdocs", "--model", tok_dir, "--out", tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,words", [
    (b"not a zip", r"cannot read it as a wheel \(BadZipFile\)"),
    (None, r"not a wheel \(0 \*\.dist-info/METADATA files\)"),
])
def test_a_damaged_pinned_wheel_is_one_line(tmp_path, content, words):
    import zipfile
    from phi3skip.data import pkgdocs
    path = tmp_path / "x-1.0-py3-none-any.whl"
    if content is None:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x/__init__.py", "")
    else:
        path.write_bytes(content)
    with pytest.raises(pkgdocs.PkgdocsError, match=words) as e:
        pkgdocs.description(path)
    assert "\n" not in str(e.value) and "python -m phi3skip.data.pkgdocs" in str(e.value)


def test_stdlib_with_max_tokens(tmp_path, tok_dir, tok):
    out = tmp_path / "std"
    meta = run("--dataset", "stdlib", "--model", tok_dir, "--out", out, "--max-tokens", "20000", "--val-tokens", "1")
    texts = []
    for f in corpus.stdlib_files():  # the first documents, as prepare reads them
        if len(texts) == meta["documents"]:
            break
        try:
            if text := Path(f).read_text(encoding="utf-8"):
                texts.append(text)
        except UnicodeDecodeError:
            pass
    direct = [len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts]
    assert meta["tokens"] == sum(direct) and meta["tokens"] >= 20000
    assert meta["tokens"] - direct[-1] < 20000  # stopped at the first document boundary past --max-tokens
    assert sorted(decoded(out, tok, "train") + decoded(out, tok, "val")) == sorted(texts)


def test_uint32_for_large_vocabularies(tmp_path, docs_dir):
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "<|endoftext|>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "big").mkdir()
    tok.save(str(tmp_path / "big" / "tokenizer.json"))
    (tmp_path / "w.txt").write_text("w1 w69999 w5 unknown\n")
    meta = run("--dataset", tmp_path / "w.txt", "--model", tmp_path / "big", "--out", tmp_path / "o",
               "--val-fraction", "0")
    assert meta["dtype"] == "uint32" and read_header(tmp_path / "o" / "train.bin").dtype == np.uint32
    assert open_tokens(tmp_path / "o" / "train.bin").tolist() == [1, 69999, 5, 70000, 70001]


# The split -------------------------------------------------------------------------------------------------
@pytest.fixture
def many_docs(tmp_path) -> Path:
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} " + "x" * (i % 13)}) + "\n" for i in range(80)))
    return path


def test_split_is_deterministic_by_seed(tmp_path, many_docs, tok_dir, tok):
    def make(name, *extra):
        run("--dataset", many_docs, "--model", tok_dir, "--out", tmp_path / name, *extra)
        return {s: (tmp_path / name / f"{s}.bin").read_bytes() for s in ("train", "val")}

    a = make("a", "--val-fraction", "0.25", "--seed", "7")
    assert a == make("b", "--val-fraction", "0.25", "--seed", "7", "--workers", "1")
    assert a["val"] != make("c", "--val-fraction", "0.25", "--seed", "8")["val"]
    n_val = len(decoded(tmp_path / "a", tok, "val"))
    assert 8 <= n_val <= 32  # about a quarter of 80 documents


def test_val_tokens_holds_out_whole_documents(tmp_path, many_docs, tok_dir, tok):
    meta = run("--dataset", many_docs, "--model", tok_dir, "--out", tmp_path / "o", "--val-tokens", "200")
    val = split_docs(tmp_path / "o" / "val.bin", meta["eos_id"])
    got = meta["splits"]["val"]["tokens"]
    assert got >= 200 and got - max(len(d) + 1 for d in val) < 200  # the smallest set of documents that reaches N
    texts = [json.loads(line)["text"] for line in many_docs.read_text().splitlines()]
    assert all(tok.decode(d.tolist()) in texts for d in val)


def test_val_tokens_too_large(tmp_path, many_docs, tok_dir):
    with pytest.raises(UserError, match="--val-tokens 100000 leaves no document for training"):
        run("--dataset", many_docs, "--model", tok_dir, "--out", tmp_path / "o", "--val-tokens", "100000")
    assert not (tmp_path / "o").exists()


# Sources ---------------------------------------------------------------------------------------------------
def test_filters_on_language_and_license(tmp_path, tok_dir, tok):
    rows = [{"code": "print(1)\n", "language": "Python", "license": "mit"},
            {"code": "fn main() {}\n", "language": "Rust", "license": "mit"},
            {"code": "print(2)\n", "language": "python", "license": "ISC"},
            {"code": "print(3)\n", "language": "Python", "license": "gpl-3.0"}]
    (tmp_path / "gh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("--dataset", tmp_path / "gh.jsonl", "--model", tok_dir, "--out", tmp_path / "o", "--val-fraction", "0")
    assert decoded(tmp_path / "o", tok, "train") == ["print(1)\n", "print(2)\n"]
    meta = run("--dataset", tmp_path / "gh.jsonl", "--model", tok_dir, "--out", tmp_path / "p", "--val-fraction",
               "0", "--language", "any", "--licenses", "any")
    assert meta["documents"] == 4


def test_parquet(tmp_path, tok_dir, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"code": ["a = 1\n", "b = 2\n", "c = 3\n"], "language": ["Python", "Go", "Python"],
                      "license": ["mit", "mit", "isc"]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    meta = run("--dataset", tmp_path / "t.parquet", "--model", tok_dir, "--out", tmp_path / "o", "--val-fraction", "0")
    assert decoded(tmp_path / "o", tok, "train") == ["a = 1\n", "c = 3\n"] and meta["skipped"]["filtered"] == 1
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"bad\.parquet: cannot read it \(ArrowInvalid"):
        run("--dataset", tmp_path / "bad.parquet", "--model", tok_dir, "--out", tmp_path / "p")


def test_parquet_without_pyarrow(tmp_path, tok_dir, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"t\.parquet: reading parquet needs pyarrow; pip install pyarrow"):
        run("--dataset", tmp_path / "t.parquet", "--model", tok_dir, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _hub_cache(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))


def test_hub_dataset_from_local_cache(tmp_path, tok_dir, tok, monkeypatch):
    commit = "1" * 40
    repo = tmp_path / "hub" / "datasets--org--ds"
    snap = repo / "snapshots" / commit
    (snap / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "data" / "train-0.jsonl").write_text(json.dumps({"text": "from the cache\n"}) + "\n")
    (snap / "data" / "other.jsonl").write_text(json.dumps({"text": "not matched\n"}) + "\n")
    (snap / "README.md").write_text("card")
    _hub_cache(monkeypatch, tmp_path / "hub")
    meta = run("--dataset", "org/ds:data/train-*", "--model", tok_dir, "--out", tmp_path / "o", "--val-fraction", "0")
    assert decoded(tmp_path / "o", tok, "train") == ["from the cache\n"]
    assert meta["sources"][0]["kind"] == "hub" and meta["sources"][0]["repo_id"] == "org/ds"
    (snap / "dataset_infos.json").write_text("{}")
    (snap / "ds.py").write_text("# loading script")
    run("--dataset", "org/ds", "--model", tok_dir, "--out", tmp_path / "p", "--val-fraction", "0")
    assert decoded(tmp_path / "p", tok, "train") == ["not matched\n", "from the cache\n"]  # data files only


def test_hub_dataset_offline_fails_fast(tmp_path, tok_dir, monkeypatch):
    _hub_cache(monkeypatch, tmp_path / "empty")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"org/missing: not a local path.*Hub is unreachable.*--dataset stdlib"):
        run("--dataset", "org/missing", "--model", tok_dir, "--out", tmp_path / "o")
    assert time.perf_counter() - start < 5


# Bad input: one line, nothing half-written -----------------------------------------------------------------
@pytest.mark.parametrize("setup, message", [
    (lambda d: "no/such/path.txt", r"unknown dataset source 'no/such/path\.txt'"),
    (lambda d: (d / "emptydir").mkdir() or d / "emptydir", r"emptydir: no \.txt .* files in this folder"),
    (lambda d: str(d / "*.nothing"), r"matches no \.txt"),
    (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", r"x\.csv: unsupported file type"),
    (lambda d: (d / "only.txt").write_text("") and d / "only.txt" or d / "only.txt",
     r"no documents in .*only\.txt after filtering: 1 empty"),
    (lambda d: (d / "r.jsonl").write_text('{"body": "hi"}\n') and d / "r.jsonl",
     r"r\.jsonl line 1: record has none of the fields text, code, content \(it has body\); pass --text-field"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "bad.jsonl",
     r"bad\.jsonl line 2: not valid JSON"),
    (lambda d: (d / "x.jsonl").write_bytes(b'{"text": "\xff"}\n') and d / "x.jsonl",
     r"x\.jsonl: cannot read it \(UnicodeDecodeError"),
    (lambda d: (d / "z.jsonl.gz").write_bytes(b"not gzip") and d / "z.jsonl.gz",
     r"z\.jsonl\.gz: cannot read it \(BadGzipFile"),
    (lambda d: (d / "go.jsonl").write_text('{"text": "x", "language": "Go"}\n') and d / "go.jsonl",
     r"no documents in .*go\.jsonl after filtering: 1 records filtered out by --language Python"),
])
def test_bad_sources(tmp_path, tok_dir, setup, message):
    src = setup(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        run("--dataset", src, "--model", tok_dir, "--out", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def _truncated_gz(path: Path, text: str) -> Path:
    data = gzip.compress(text.encode())
    path.write_bytes(data[:len(data) // 2])
    return path


_LINES = "".join(json.dumps({"text": f"line {i} " + "words " * 40}) + "\n" for i in range(400))


@pytest.mark.parametrize("setup, message", [
    (lambda d: _truncated_gz(d / "t.jsonl.gz", _LINES), r"t\.jsonl\.gz: cannot read it \(EOFError: Compressed file ended"),
    (lambda d: _truncated_gz(d / "t.json.gz", "[" + _LINES.replace("\n", ",") + "{}]"),
     r"t\.json\.gz: cannot read it \(EOFError"),
    (lambda d: _truncated_gz(d / "t.txt.gz", "words " * 4000), r"t\.txt\.gz: cannot read it \(Compressed file ended"),
    (lambda d: (d / "a.jsonl").write_text('[1, 2]\n') and d / "a.jsonl",
     r"a\.jsonl line 1: expected a JSON object per record, got list"),
    (lambda d: (d / "n.jsonl").write_text('{"text": 3}\n') and d / "n.jsonl",
     r"n\.jsonl line 1: the text field holds int, not a string"),
    (lambda d: (d / "s.jsonl").write_text('{"text": "ok"}\n"just a string"\n') and d / "s.jsonl",
     r"s\.jsonl line 2: expected a JSON object per record, got str"),
])
def test_damaged_compressed_and_record_sources_are_one_line(tmp_path, tok_dir, setup, message):
    src = setup(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        run("--dataset", src, "--model", tok_dir, "--out", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_text_field_named_but_missing(tmp_path, tok_dir):
    (tmp_path / "r.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(UserError, match=r"record has no field 'body' \(it has text\); pass --text-field NAME"):
        run("--dataset", tmp_path / "r.jsonl", "--model", tok_dir, "--out", tmp_path / "o", "--text-field", "body")


def test_tokenizer_not_found(tmp_path, docs_dir):
    with pytest.raises(UserError, match=r"no tokenizer\.json in this folder"):
        (tmp_path / "m").mkdir()
        run("--dataset", docs_dir, "--model", tmp_path / "m", "--out", tmp_path / "o")


def test_output_exists_and_overwrite(tmp_path, docs_dir, tok_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError, match=r"o: already exists; pass --overwrite"):
        run("--dataset", docs_dir, "--model", tok_dir, "--out", out)
    assert (out / "keep.txt").exists()
    run("--dataset", docs_dir, "--model", tok_dir, "--out", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_killed_runs_temporaries_are_removed_by_the_next_run(tmp_path, docs_dir, tok_dir, dead_pid):
    from phi3skip.core.paths import _host

    host = _host()  # this machine and PID namespace
    stale = [tmp_path / f".o.tmp-{dead_pid}", tmp_path / f".o.tmp-{dead_pid}-{host}-0123abcd"]
    kept = [tmp_path / f".o.tmp-{os.getpid()}-{host}-0123abcd",  # a live process: still writing
            tmp_path / f".o.tmp-{dead_pid}-another-host-0123abcd"]  # a PID of another node means nothing here
    for p in stale + kept:
        p.mkdir()
        (p / "all.bin").write_bytes(b"half")
    run("--dataset", docs_dir, "--model", tok_dir, "--out", tmp_path / "o")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_text_files_follow_one_rule(tmp_path, tok_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("Hello world. " * 5)
    (src / "binary.txt").write_bytes(b"Hello\x00\x01 world. " * 5)  # valid UTF-8, but binary
    (src / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 5)
    meta = run("--dataset", src, "--model", tok_dir, "--out", tmp_path / "o", "--val-fraction", "0")
    assert meta["documents"] == 1 and meta["skipped"]["undecodable_files"] == 2
    with pytest.raises(UserError, match=r"--out .*src is --dataset"):
        run("--dataset", src, "--model", tok_dir, "--out", src, "--overwrite")
    assert (src / "good.txt").exists()


@pytest.mark.parametrize("where", ["tokenizing", "splitting"])
def test_interrupt_leaves_nothing(tmp_path, docs_dir, tok_dir, monkeypatch, where):
    out = tmp_path / "o"
    run("--dataset", docs_dir, "--model", tok_dir, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if where == "tokenizing":
        real = corpus.encode

        def encode(*a, **k):
            yield next(real(*a, **k))
            raise KeyboardInterrupt
        monkeypatch.setattr(corpus, "encode", encode)
    else:
        def write_split(*a, **k):
            a[4].write([1, 2, 3])  # part of train.bin written, then Ctrl-C
            raise KeyboardInterrupt
        monkeypatch.setattr(prepare, "write_split", write_split)
    with pytest.raises(KeyboardInterrupt):
        run("--dataset", docs_dir, "--model", tok_dir, "--out", out, "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old data is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "o"]  # no temporary folder left


def test_prepared_file_checked_against_model_vocab(tmp_path, docs_dir, tok_dir):
    run("--dataset", docs_dir, "--model", tok_dir, "--out", tmp_path / "o")
    with pytest.raises(UserError, match=r"train\.bin: made with a tokenizer of 310 tokens but the model has 100"):
        open_tokens(tmp_path / "o" / "train.bin", vocab_size=100)


# As a command: one line on stderr and exit code 2 -----------------------------------------------------------
def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.integration
def test_cli_one_line_exit_2(tmp_path, docs_dir, tok_dir):
    (tmp_path / "o").mkdir()
    r = _cli("--dataset", docs_dir, "--model", tok_dir, "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "--overwrite" in r.stderr


@pytest.mark.integration
def test_cli_hub_offline_fails_fast(tmp_path, tok_dir):
    start = time.perf_counter()
    r = _cli("--model", tok_dir, "--out", tmp_path / "o",  # the default dataset is on the Hub
             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "codeparrot/github-code-clean" in r.stderr and "--dataset stdlib" in r.stderr
    assert time.perf_counter() - start < 30  # process start and imports included; no network retries
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_cli_signal_leaves_no_partial_file(tmp_path, tok_dir, sig):
    import signal
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--dataset", "stdlib", "--model", str(tok_dir),
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # generous: a loaded 2-core machine (CI beside a training run) is slow
    while not list(tmp_path.glob(".o.tmp-*")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # wait until it is writing
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)  # the handler runs once the tokenizer's current batch returns
    if p.returncode == 0:
        pytest.skip("prepare.py finished before the signal")
    assert p.returncode == 130 and err.strip() == "interrupted", err
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor a temporary one


def test_meta_json_keeps_the_token_files_fingerprint(tmp_path, docs_dir, tok_dir):
    """Hashed once as the folder is written; re-made from other text into the same path, the fingerprint changes."""
    from phi3skip.data.tokens import data_fingerprint, token_file_hashes
    out = tmp_path / "o"
    meta = run("--dataset", docs_dir, "--model", tok_dir, "--out", out, "--val-fraction", "0.3")
    assert meta["fingerprint"] == read_meta(out)["fingerprint"] == token_file_hashes(out)
    before = data_fingerprint(out)
    (docs_dir / "a.txt").write_text("Other text altogether.\n", encoding="utf-8")
    run("--dataset", docs_dir, "--model", tok_dir, "--out", out, "--val-fraction", "0.3", "--overwrite")
    assert data_fingerprint(out) != before and read_meta(out)["fingerprint"] == token_file_hashes(out)
