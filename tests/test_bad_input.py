"""A new user's mistakes and damaged files, across the commands and benchmarks (issue 29's sweep): each is one line
on stderr naming what is wrong, exit code 2, no traceback, and nothing written. In-process: the commands' and
benchmarks' `main(argv)`, on the tiny random model of tests/conftest.py (`tiny_run`)."""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from phi3skip.core import machine
from phi3skip.core.cli import UserError
from phi3skip.formats.checkpoints import read_skip_profile
from phi3skip.model.config import Phi3Config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def one_line(capsys, call, *words: str) -> str:
    """`call()` exits with code 2 and one line on stderr holding every word; returns the line."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def command(name: str):
    return importlib.import_module(f"phi3skip.commands.{name}").main


@pytest.fixture(scope="module")
def bench():
    """The benchmarks as modules, imported as their scripts run (benchutil beside them)."""
    sys.path.insert(0, str(BENCH))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(BENCH))


@pytest.fixture
def student(tiny_run, tmp_path) -> Path:
    """A copy of the tiny model with bypasses for layers 2, 0 (a trained student's folder), to damage."""
    from phi3skip import from_pretrained, save_pretrained
    from phi3skip.model import bypass

    root, _ = tiny_run
    model = from_pretrained(root / "model")
    bypass.attach(model, [2, 0], rank=4, mlp=8)
    save_pretrained(model, tmp_path / "s", extra_json={"skip.json": {"layers": [2, 0], "teacher": str(root / "model")}})
    return tmp_path / "s"


def edit(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# skip.json: every field, checked once where it is read -----------------------------------------------------------
SKIP_FIELDS = [  # what is done to skip.json, the field the line names
    (lambda o: o["adapters"].update(rank=-1), "'adapters.rank' must be an integer 0..32"),
    (lambda o: o["adapters"].update(rank="4"), "'adapters.rank'"),
    (lambda o: o["adapters"].update(rank=33), "'adapters.rank'"),
    (lambda o: o["adapters"].update(rank=True), "'adapters.rank'"),
    (lambda o: o["adapters"].pop("rank"), "'adapters.rank'"),
    (lambda o: o["adapters"].update(rank=0, mlp=0), "'adapters.rank' must be above 0 where adapters.mlp is 0"),
    (lambda o: o["adapters"].update(mlp=65), "'adapters.mlp' must be an integer 0..64"),
    (lambda o: o["adapters"].update(mlp=-3), "'adapters.mlp'"),
    (lambda o: o["adapters"].update(depth_rank=1.5), "'adapters.depth_rank'"),
    (lambda o: o["adapters"].update(layers=[9]), "'adapters.layers' must be a list of distinct layer indices 0..3"),
    (lambda o: o["adapters"].update(layers=[]), "'adapters.layers'"),
    (lambda o: o["adapters"].update(layers="2,0"), "'adapters.layers'"),
    (lambda o: o["adapters"].update(file="../model.safetensors"), "'adapters.file' must be a file name inside"),
    (lambda o: o["adapters"].update(file=7), "'adapters.file'"),
    (lambda o: o["adapters"].update(kind="pickle"), "'adapters.kind' must be 'bypass'"),
    (lambda o: o["adapters"].update(form="diagonal"), "'adapters.form'"),
    (lambda o: o.update(adapters=[1]), "'adapters' must be an object"),
    (lambda o: o.update(layers=[2, 2]), "'layers' must be a list of distinct layer indices"),
    (lambda o: o.update(layers=[-1]), "'layers'"),
    (lambda o: o.update(layers=[2.0]), "'layers'"),
    (lambda o: o.update(layers=[4]), "'layers'"),
    (lambda o: o.update(teacher=5), "'teacher' must be a string"),
    (lambda o: o.update(steps=-1), "'steps' must be an integer, 0 or more"),
    (lambda o: o.update(val_tokens="many"), "'val_tokens'"),
    (lambda o: o.update(perplexity="high"), "'perplexity' must be an object"),
    (lambda o: o.update(perplexity={"student": "x"}), "'perplexity.student' must be a finite number"),
    (lambda o: o.update(perplexity={"prefixes": [{"skip": [7], "perplexity": 2.0}]}), "'perplexity.prefixes[0].skip'"),
    (lambda o: o.update(evaluation={"results": {}}), "'evaluation.results' must be a list of objects"),
    (lambda o: o.update(evaluation={"results": [{"skip": [2], "student": {"d": {"ppl": "x"}}}]}),
     "'evaluation.results[0].student.d.ppl'"),
    (lambda o: o.update(evaluation={"results": [{"skip": [2], "tokens_per_s": "fast"}]}),
     "'evaluation.results[0].tokens_per_s'"),
    (lambda o: o.update(speculative={"draft_skip": [2], "lookahead": 0}), "'speculative.lookahead' must be an integer 1..32"),
    (lambda o: o.update(speculative={"draft_skip": [5], "lookahead": 2}), "'speculative.draft_skip'"),
    (lambda o: o.update(speculative={"draft_skip": [2], "lookahead": 2, "speedup": {"cpu": -1}}),
     "'speculative.speedup'"),
]


@pytest.mark.parametrize("change,words", SKIP_FIELDS)
def test_every_skip_json_field_is_one_line_naming_it(student, change, words):
    edit(student / "skip.json", change)
    with pytest.raises(UserError) as e:
        read_skip_profile(student)
    assert str(e.value).startswith(f"{student / 'skip.json'}: field ") and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_skip_json_as_written_passes_unchanged(student):
    profile = json.loads((student / "skip.json").read_text())
    assert read_skip_profile(student) == profile  # the check changes nothing, and unknown fields are kept
    edit(student / "skip.json", lambda o: o.update(future_field={"anything": [1]}))
    assert read_skip_profile(student)["future_field"] == {"anything": [1]}


# The case: an adapter rank edited to -1 was a traceback in export, check_gguf and generate alike.
@pytest.mark.parametrize("name,argv", [
    ("export", ["--model", "{s}", "--num-skip", "1", "--out", "{tmp}/x"]),
    ("generate", ["--model", "{s}", "--prompt", "t1 t2", "--max-new-tokens", "2", "--skip", "2"]),
    ("generate", ["--model", "{s}", "--prompt", "t1 t2", "--max-new-tokens", "2", "--skip", "first:1"]),
    ("generate", ["--model", "{s}", "--show-skips"]),
    ("evaluate", ["--model", "{s}", "--data", "{data}", "--seq-len", "16", "--no-plot", "--out", "{tmp}/e"]),
    ("check_gguf", ["--model", "{s}", "--gguf", "{s}/config.json", "--data", "{data}", "--seq-len", "16",
                    "--num-skip", "1"]),
])
def test_adapter_rank_minus_one_is_one_line_in_every_command(student, tiny_run, tmp_path, capsys, name, argv):
    if name == "check_gguf":
        pytest.importorskip("llama_cpp")
    edit(student / "skip.json", lambda o: o["adapters"].update(rank=-1))
    argv = [a.format(s=student, tmp=tmp_path, data=tiny_run[0] / "data") for a in argv]
    one_line(capsys, lambda: command(name)(argv), "skip.json: field 'adapters.rank'", "got -1")
    assert not (tmp_path / "x").exists() and not (tmp_path / "e").exists()


# config.json ---------------------------------------------------------------------------------------------------------
CONFIG_FIELDS = [
    (dict(hidden_size=-1), "hidden_size must be a positive integer"),
    (dict(hidden_size="32"), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_hidden_layers=10**12), "num_hidden_layers must be a positive integer, at most 4,096"),
    (dict(vocab_size=2**40), "vocab_size"),
    (dict(max_position_embeddings=-5), "max_position_embeddings"),
    (dict(num_key_value_heads=8), "num_key_value_heads (8) must be at most num_attention_heads"),
    (dict(rope_scaling="x"), "rope_scaling must be an object"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1] * 4, "long_factor": ["a"] * 4}), "malformed rope_scaling"),
    (dict(rope_scaling={"type": 5}), "rope_scaling type 5"),
    (dict(rms_norm_eps="x"), "rms_norm_eps must be a positive finite number"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a positive finite number"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(eos_token_id=["a"]), "eos_token_id must be a token id"),
    (dict(bos_token_id=-1), "bos_token_id"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(head_dim=0), "head_dim"),
]


@pytest.mark.parametrize("change,words", CONFIG_FIELDS)
def test_every_config_field_is_one_line_naming_the_file(student, change, words):
    edit(student / "config.json", lambda o: o.update(change))
    with pytest.raises(UserError) as e:
        Phi3Config.from_json(student / "config.json")
    assert str(e.value).startswith(f"{student / 'config.json'}: ") and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,data", [("config.json", b"{"), ("config.json", b"\xff\xfe"), ("skip.json", b"["),
                                       ("skip.json", b'{"teacher": "\xe9"}'),
                                       ("skip_adapters.safetensors", b"xx"), ("model.safetensors", b"")])
def test_damaged_side_files_are_one_line_in_generate(student, capsys, name, data):
    (student / name).write_bytes(data)
    one_line(capsys, lambda: command("generate")(["--model", str(student), "--prompt", "t1", "--max-new-tokens", "1"]),
             str(student / name))


def test_a_huge_config_is_refused_before_any_module_is_built(student, capsys):
    edit(student / "config.json", lambda o: o.update(num_hidden_layers=10**12))  # minutes and GBs before
    one_line(capsys, lambda: command("export")(["--model", str(student), "--skip", "2", "--out", str(student) + "x"]),
             "num_hidden_layers", "at most 4,096")


# A GGUF's metadata: wrong types, missing keys, absurd sizes, a truncated file -> one line naming the file and key --
@pytest.fixture(scope="module")
def gguf_writer():
    """Write a tiny llama GGUF (tests/test_gguf.py's writer) with its metadata changed just before it is written."""
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    import test_gguf

    cfg = {**test_gguf.TINY, "tie_word_embeddings": False}
    sd = test_gguf.randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))).state_dict()

    def write(path: Path, change=None) -> Path:
        real = gguf.GGUFWriter.write_header_to_file

        def changed(self, *args, **kwargs):
            if change is not None:
                change(self.kv_data[0], gguf)
            return real(self, *args, **kwargs)

        gguf.GGUFWriter.write_header_to_file = changed
        try:
            return test_gguf.write_gguf(path, "llama", cfg, sd)
        finally:
            gguf.GGUFWriter.write_header_to_file = real
    return write


def put(key: str, value, kind: str, sub: str | None = None):
    def change(kv, gguf):
        T = gguf.GGUFValueType
        kv[key] = gguf.GGUFValue(value=value, type=T[kind], sub_type=T[sub] if sub else None)
    return change


def drop(key: str):
    return lambda kv, gguf: kv.pop(key)


GGUF_META = [
    (drop("llama.block_count"), "metadata key 'llama.block_count' is missing"),
    (drop("llama.embedding_length"), "'llama.embedding_length' is missing"),
    (drop("llama.attention.layer_norm_rms_epsilon"), "layer_norm_rms_epsilon"),
    (put("llama.block_count", "two", "STRING"), "metadata 'llama.block_count' must be an integer"),
    (put("llama.block_count", 0, "UINT32"), "'llama.block_count' must be a positive integer"),
    (put("llama.block_count", 2**31, "UINT32"), "num_hidden_layers must be a positive integer, at most 4,096"),
    (put("llama.context_length", 2**40, "UINT64"), "max_position_embeddings"),
    (put("llama.embedding_length", 1.5, "FLOAT32"), "'llama.embedding_length' must be an integer"),
    (put("llama.attention.head_count", 0, "UINT32"), "'llama.attention.head_count' must be a positive integer"),
    (put("llama.attention.layer_norm_rms_epsilon", "tiny", "STRING"), "must be a finite number"),
    (put("llama.attention.layer_norm_rms_epsilon", float("nan"), "FLOAT32"), "must be a finite number"),
    (put("llama.rope.freq_base", True, "BOOL"), "'llama.rope.freq_base' must be a finite number"),
    (put("general.architecture", 7, "UINT32"), "'general.architecture' must be a string"),
    (put("split.count", "3", "STRING"), "'split.count' must be an integer"),
    (put("tokenizer.ggml.eos_token_id", "eos", "STRING"), "'tokenizer.ggml.eos_token_id' must be an integer"),
    (put("tokenizer.ggml.eos_token_id", 2**31, "UINT32"), "eos_token_id"),
    (put("tokenizer.ggml.model", 1, "INT32"), "'tokenizer.ggml.model' must be a string"),
    (put("tokenizer.ggml.model", "wordpiece", "STRING"), "tokenizer type 'wordpiece' is not supported"),
    (put("tokenizer.ggml.add_bos_token", 1, "UINT8"), "'tokenizer.ggml.add_bos_token' must be a boolean"),
    (put("tokenizer.ggml.tokens", [1, 2, 3], "ARRAY", "INT32"), "'tokenizer.ggml.tokens' must be an array of string"),
    (put("tokenizer.ggml.merges", [1.0], "ARRAY", "FLOAT32"), "'tokenizer.ggml.merges' must be an array of string"),
    (put("tokenizer.ggml.token_type", ["x"], "ARRAY", "STRING"), "'tokenizer.ggml.token_type'"),
]


@pytest.mark.parametrize("change,words", GGUF_META)
def test_damaged_gguf_metadata_is_one_line(gguf_writer, tmp_path, capsys, change, words):
    path = gguf_writer(tmp_path / "bad.gguf", change)
    line = one_line(capsys, lambda: command("convert_gguf")([str(path), str(tmp_path / "out")]), str(path), words)
    assert not (tmp_path / "out").exists(), line


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_truncated_gguf_is_one_line(gguf_writer, tmp_path, capsys, keep):
    good = gguf_writer(tmp_path / "good.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[:max(1, int(len(good) * keep))])
    one_line(capsys, lambda: command("convert_gguf")([str(path), str(tmp_path / "out")]), str(path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["folder", "missing", "text"])
def test_convert_gguf_input_that_is_no_gguf(tmp_path, capsys, what):
    pytest.importorskip("gguf")
    src = tmp_path / "in.gguf"
    if what == "folder":
        src.mkdir()
    elif what == "text":
        src.write_text("ceci n'est pas un GGUF")
    one_line(capsys, lambda: command("convert_gguf")([str(src), str(tmp_path / "out")]), str(src))


# Benchmarks: the commands' rules -------------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tiny_run, tmp_path) -> Path:
    """A run folder of benchmarks/quality.py: the tiny model as its student, results.json beside it."""
    root, _ = tiny_run
    run = tmp_path / "runs" / "20990101-000000"
    shutil.copytree(root / "model", run / "student")
    (run / "results.json").write_text(json.dumps({"name": "tiny", "layers": [2, 0], "ratios": [{"code": 1.0}] * 3}))
    return run


@pytest.mark.parametrize("argv,words", [
    (["--runs", "{tmp}/nowhere"], "--runs {tmp}/nowhere: no such run folder"),
    (["--runs", "{tmp}"], "not a run of benchmarks/quality.py"),
    (["--out-md", "{tmp}"], "--out-md {tmp}: is a folder"),
    (["--out-md", "{tmp}/file.txt/q.md"], "is a file, not a folder"),
    (["--out-md", "{tmp}/latin1.md"], "cannot read it as UTF-8"),
    (["--plot", "{tmp}/plot.txt"], "--plot {tmp}/plot.txt: the image type is its name's suffix"),
    (["--plot", "{tmp}"], "--plot {tmp}: is a folder"),
    (["--context", "65"], "--context must be in 1..64 (the runs' models' positions)"),
    (["--context", "0"], "--context must be"),
    (["--context", "16", "--new-tokens", "16", "--no-speed", "--rounds", "0"], "--rounds must be in 1..1000"),
    (["--context", "16", "--new-tokens", "16"], "--new-tokens must be in 1..15"),
    (["--rounds", "1001"], "--rounds must be in 1..1000"),
    (["--threads", "100000"], "--threads must be in 1.."),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_frontier_mistakes_are_one_line_before_any_work(bench, run_dir, tmp_path, capsys, argv, words):
    from phi3skip.core.cli import run_main

    frontier = bench("frontier")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "latin1.md").write_bytes(b"caf\xe9\n")
    fill = lambda a: a.format(tmp=tmp_path)  # noqa: E731
    args = ["--runs", str(run_dir), "--out-md", str(tmp_path / "q.md")] + [fill(a) for a in argv]
    one_line(capsys, lambda: run_main(lambda: frontier.main(args)), fill(words))
    assert not (tmp_path / "q.md").exists() and not (tmp_path / "frontier.png").exists()
    assert (tmp_path / "latin1.md").read_bytes() == b"caf\xe9\n"


@pytest.fixture
def quality(bench, tmp_path, monkeypatch):
    q = bench("quality")
    monkeypatch.setattr(q, "TABLE", tmp_path / "quality.md")  # never the real page
    return q


@pytest.mark.parametrize("argv,words", [
    (["--teacher", "{tmp}/none"], "--teacher {tmp}/none: no config.json there"),
    (["--data", "{tmp}"], "--data {tmp}: no train.bin there"),
    (["--prose", "{tmp}/none.txt"], "--prose {tmp}/none.txt: no such file"),
    (["--prose", "{tmp}"], "--prose {tmp}: is a folder"),
    (["--prose", "{tmp}/latin1.txt"], "--prose"),
    (["--docs", "{tmp}"], "--docs {tmp}: no val.bin there"),
    (["--runs", "{tmp}/file.txt"], "--runs {tmp}/file.txt: exists and is not a folder"),
    (["--runs", "{data}"], "--runs"),
    (["--data-weights", "1", "2"], "--data-weights: 2 weights for 1 --data folders"),
    (["--rescore", "nope"], "--rescore nope: no"),
    (["--rescore", "broken"], "results.json: not readable JSON"),
    (["--rescore", "x", "--no-train"], "--rescore scores an earlier run"),
    (["--no-train", "--", "--adapter-rank", "33"], "--adapter-rank must be in 0..32 (the teacher's hidden size)"),
    (["--no-train", "--", "--num-skip", "5"], "--num-skip must be in 1..4"),
    (["--no-train", "--", "--lsq-tokens", "-1"], "--lsq-tokens must be"),
    (["--no-train", "--", "--rank-tokens", str(10**18)], "--rank-tokens must be in 1.."),
    (["--no-train", "--", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: --name"),
])
def test_quality_mistakes_are_one_line_before_any_work(quality, tiny_run, tmp_path, capsys, argv, words):
    from phi3skip.core.cli import run_main

    root, _ = tiny_run
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    runs = tmp_path / "runs"
    (runs / "broken").mkdir(parents=True)
    (runs / "broken" / "results.json").write_text("{")
    fill = lambda a: a.format(tmp=tmp_path, data=root / "data")  # noqa: E731
    base = ([] if not argv else ["--name", "t"]) + ["--teacher", str(root / "model"), "--data", str(root / "data"),
                                                    "--prose", str(root / "notes.txt"), "--runs", str(runs)]
    args = [fill(a) for a in argv]
    cut = args.index("--") if "--" in args else len(args)
    one_line(capsys, lambda: run_main(lambda: quality.main(base + args[:cut] + args[cut:])), fill(words))
    assert sorted(p.name for p in runs.iterdir()) == ["broken"] and not quality.TABLE.exists()


@pytest.mark.parametrize("name,argv,words", [
    ("bench_generate", ["--rounds", "0"], "--rounds must be in 1..1000"),
    ("bench_generate", ["--rounds", "1001"], "--rounds must be in 1..1000"),
    ("bench_generate", ["--threads", "100000"], "--threads must be in 1.."),
    ("bench_generate", ["--lookaheads", "1,33"], "--lookaheads must be in 1..32"),
    ("bench_generate", ["--draft-depths", "2000"], "--draft-depths must be in 1..1024"),
    ("bench_generate", ["--model", "{model}", "--new-tokens", "64", "--only", "skip"], "--new-tokens must be in 1.."),
    ("bench_forward", ["--rounds", "1001"], "--rounds must be in 1..1000"),
    ("bench_forward", ["--batch", "0"], "--batch must be"),
    ("bench_forward", ["--model", "{model}", "--seq", "65"], "--seq must be in 1..64 (the model's positions)"),
    ("bench_forward", ["--model", "{model}", "--batch", str(10**9), "--seq", "64"], "needs about"),
    ("bench_train", ["--seed", str(2**32)], "--seed must be in 0..4294967295"),
    ("bench_train", ["--steps", "0"], "--steps must be"),
    ("bench_train", ["--kd-weight", "nan"], "--kd-weight must be a finite number"),
    ("bench_train", ["--batch-size", "100000"], "--batch-size must be in 1..1024"),
    ("bench_train", ["--model", "{model}", "--seq-len", "65"], "--seq-len must be in 1..64 (the model's positions)"),
    ("bench_train", ["--model", "{model}", "--seq-len", "16", "--skip", "4"], "--skip must be in 0..3"),
    ("bench_train", ["--model", "{model}", "--batch-size", "1024", "--seq-len", "64"], "needs about"),
    ("bench_prepare", ["--workers", "100000"], "--workers must be in 1.."),
    ("bench_prepare", ["--runs", "0"], "--runs must be in 1..1000"),
    ("bench_prepare", ["--mb", "1e12"], "--mb must be"),
    ("bench_prepare", ["--copies", "0", "4"], "--copies must be in 1..1024"),
])
def test_benchmark_numbers_are_bounded(bench, tiny_run, capsys, monkeypatch, name, argv, words):
    from phi3skip.core.cli import run_main

    monkeypatch.setattr(machine, "available_memory", lambda: 256 * 2**20)
    m = bench(name)
    args = [a.format(model=tiny_run[0] / "model") for a in argv]
    one_line(capsys, lambda: run_main(lambda: m.main(args)), words)


# A new user's other mistakes, command by command ---------------------------------------------------------------------
@pytest.fixture
def files(tmp_path) -> Path:
    """Bad inputs of every kind: a folder, non-UTF-8 text, an empty file, NUL bytes, a file where a folder goes."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nul.txt").write_bytes(b"t1\x00t2")
    (tmp_path / "bad.jsonl").write_text('"t1 t2"\n{not json\n')
    (tmp_path / "num.jsonl").write_text("5\n")
    (tmp_path / "file").write_text("x")
    return tmp_path


SWEEP = [  # command, its arguments, words of the one line
    ("generate", ["--prompt-file", "{f}/dir"], "--prompt-file {f}/dir"),
    ("generate", ["--prompt-file", "{f}/latin1.txt"], "cannot read it as UTF-8"),
    ("generate", ["--prompt-file", "{f}/empty.txt"], "is empty"),
    ("generate", ["--prompt-file", "{f}/bad.jsonl"], "bad.jsonl:2: not JSON"),
    ("generate", ["--prompt-file", "{f}/num.jsonl"], "num.jsonl:1: expected a JSON string"),
    ("generate", ["--prompt-file", "{f}/missing.txt"], "no such file"),
    ("generate", ["--prompt", "t1", "--draft-skip", "2"], "--draft-skip needs --speculative"),
    ("generate", ["--prompt", "t1", "--skip", "9"], "out of range"),
    ("generate", ["--prompt", "t1", "--skip", "2,2"], "names a layer twice"),
    ("generate", ["--prompt", "t1", "--top-k", "1.5"], "invalid int value"),
    ("generate", ["--prompt", "t1", "--temperature", "hot"], "invalid float value"),
    ("generate", ["--prompt", "t1", "--dtype", "int4"], "int4"),
    ("generate", ["--prompt", "t1", "--device", "tpu"], "tpu"),
    ("generate", ["--prompt", "t1", "--speculative", "--lookahead", "33"], "--lookahead must be in 1..32"),
    ("generate", ["--model", "{f}/dir", "--prompt", "t1"], "{f}/dir"),
    ("generate", ["--model", "{f}/file", "--prompt", "t1"], "{f}/file"),
    ("evaluate", ["--data", "{data}", "--text", "{f}/dir"], "--text {f}/dir: no such file"),
    ("evaluate", ["--data", "{data}", "--text", "{f}/latin1.txt"], "--text"),
    ("evaluate", ["--data", "{data}", "--text", "{f}/nul.txt"], "--text"),
    ("evaluate", ["--text", "{f}/empty.txt", "--seq-len", "16"], "too few for one window"),
    ("evaluate", ["--data", "{f}/dir"], "{f}/dir"),
    ("evaluate", ["--data", "{data}", "--out", "{f}/file"], "--out {f}/file: exists and is not a folder"),
    ("evaluate", ["--data", "{data}", "--skip-sets", "9"], "9"),
    ("evaluate", ["--data", "{data}", "--out", "{data}/eval"], "--out"),
    ("evaluate", [], "nothing to score"),
    ("export", ["--out", "{f}/file"], "--out {f}/file"),
    ("export", ["--out", "{f}/x", "--outtype", "q8_0"], "--outtype needs --gguf"),
    ("export", ["--out", "{f}/x", "--skip", "2", "--num-skip", "1"], "give --skip or --num-skip, not both"),
    ("export", ["--out", "{f}/x", "--num-skip", "3"], "--num-skip"),
    ("export", ["--gguf", "{f}/dir", "--skip", "2"], "--gguf {f}/dir"),
    ("export", ["--out", "{model}/inside", "--skip", "2"], "inside"),
    ("rank_layers", ["--data", "{data}", "--json", "{f}/dir"], "--json {f}/dir: is a folder"),
    ("rank_layers", ["--data", "{data}", "--json", "{data}/r.json"], "--json"),
    ("rank_layers", ["--data", "{f}/dir"], "{f}/dir"),
    ("check_gguf", ["--gguf", "{f}/missing.gguf", "--data", "{data}"], "--gguf {f}/missing.gguf: no such file"),
    ("check_gguf", ["--gguf", "{f}/dir", "--data", "{data}"], "--gguf {f}/dir: no such file"),
    ("check_gguf", ["--gguf", "{f}/file"], "give one of --data"),
    ("check_gguf", ["--gguf", "{f}/file", "--data", "{data}", "--text", "{f}/file"], "give one of --data"),
    ("random_model", ["{model}", "{f}/file"], "exists and is not a folder"),
    ("random_model", ["{model}", "{f}/dir"], "already exists; pass --overwrite"),
    ("random_model", ["{f}/dir", "{f}/r"], "{f}/dir"),
    ("random_model", ["{model}", "{f}/r", "--hidden", "30", "--heads", "4"], "--heads 4 must divide --hidden 30"),
    ("random_model", ["{model}", "{model}/r"], "inside"),
    ("convert_gguf", ["{f}/file", "{f}/out"], "not a GGUF file"),
    ("convert_gguf", ["{f}/file", "{f}/out", "--dtype", "int8"], "invalid choice: 'int8'"),
]


@pytest.mark.parametrize("name,argv,words", SWEEP)
def test_a_new_users_mistakes_are_one_line(tiny_run, files, capsys, monkeypatch, name, argv, words):
    root, _ = tiny_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "stdin", None)
    fill = lambda a: a.format(f=files, data=root / "data", model=root / "model")  # noqa: E731
    base = {"generate": ["--model", str(root / "model"), "--max-new-tokens", "2"],
            "evaluate": ["--model", str(root / "model"), "--no-plot", "--seq-len", "16", "--out", str(files / "e")],
            "export": ["--model", str(root / "model")],
            "rank_layers": ["--model", str(root / "model"), "--seq-len", "16"],
            "check_gguf": ["--model", str(root / "model"), "--seq-len", "16"]}.get(name, [])
    before = sorted(p.name for p in files.iterdir())
    one_line(capsys, lambda: command(name)(base + [fill(a) for a in argv]), fill(words))
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written
