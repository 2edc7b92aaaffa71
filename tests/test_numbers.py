"""One rule for numbers: every numeric flag of every command has a range (phi3skip.core.cli.Range), checked before any
work. Each flag is tried at the values just outside its range (refused with one line naming the flag, and the work
never starts) and at its edges (accepted: the command gets as far as its work, which the test stops)."""
from __future__ import annotations

import os

import pytest

from commands import entry, module
from phi3skip.core.cli import Range, UserError, check_range


class Started(Exception):
    """The command got past its checks to its work."""


# command -> (the function its work starts with, where the command looks it up; its arguments but the flag)
BASE = {
    "prepare": ("prepare_script.tokenize", ["--dataset", "{root}/notes.txt", "--model", "{model}", "--out", "{tmp}/o"]),
    "train": ("train_script.Batches", ["--model", "{model}", "--data", "{data}", "--out", "{tmp}/s", "--ckpt-dir", "{tmp}/c",
                          "--log-dir", "{tmp}/l", "--device", "cpu", "--max-seq-len", "32"]),
    "evaluate": ("phi3skip.commands.evaluate.from_pretrained", ["--model", "{model}", "--data", "{data}", "--out", "{tmp}/e", "--no-plot",
                                                 "--seq-len", "32"]),
    "rank_layers": ("phi3skip.commands.rank_layers.from_pretrained", ["--model", "{model}", "--data", "{data}", "--seq-len", "32"]),
    "generate": ("phi3skip.serve.generate.Generator", ["--model", "{model}", "--prompt", "t1 t2", "--max-new-tokens", "8", "--speculative",
                               "--draft-skip", "2"]),
    "export": ("phi3skip.formats.export.from_pretrained", ["--model", "{model}", "--out", "{tmp}/x"]),
    "random_model": ("phi3skip.commands.random_model.save_pretrained", ["{model}", "{tmp}/r"]),
    "check_gguf": ("phi3skip.commands.check_gguf.from_pretrained", ["--model", "{model}", "--gguf", "{model}/config.json",
                                                                    "--data", "{data}", "--seq-len", "32", "--num-skip", "1"]),
}
# The tiny model: 4 layers, hidden size 32, MLP width 64, 64 positions, skip.json's order 2,0 (train's default
# candidates on 4 layers: 2, 0).
NUMBERS = [  # command, flag, refused, accepted
    ("prepare", "--max-tokens", ["0", "-1"], ["1"]),
    ("prepare", "--val-tokens", ["-1"], ["0"]),
    ("prepare", "--val-fraction", ["-0.1", "1", "nan"], ["0", "0.99"]),
    ("prepare", "--workers", ["0"], ["1"]),
    ("prepare", "--seed", ["-1"], ["0"]),
    ("train", "--batch-size", ["0"], ["1"]),
    ("train", "--grad-accum", ["0"], ["1"]),
    ("train", "--max-seq-len", ["0", "65"], ["1", "64"]),
    ("train", "--adapter-rank", ["-1", "33"], ["0", "32"]),  # 0: no map, attention dropped
    ("train", "--adapter-mlp", ["-1", "65"], ["0", "64"]),
    ("train --schedule nested", "--depth-rank", ["-1", "33"], ["0", "32"]),  # per-depth deltas: adapters only
    ("train", "--num-skip", ["0", "3"], ["1", "2"]),
    ("train --layers auto", "--num-skip", ["0", "5"], ["4"]),
    ("train", "--lr", ["0", "-1e-3", "inf", "nan"], ["1e-9"]),
    ("train", "--data-weights", ["0", "-1", "nan"], ["1"]),
    ("train", "--temperature", ["0"], ["0.5"]),
    ("train", "--min-lr-ratio", ["-0.1", "1.1"], ["0", "1"]),
    ("train", "--save-every", ["-1"], ["0"]),
    ("train", "--grad-clip", ["-1"], ["0"]),
    ("train", "--lsq-tokens", ["-1"], ["0"]),
    ("train", "--rank-shortlist", ["-1"], ["0"]),
    ("train", "--seed", ["-1"], ["0"]),
    ("evaluate", "--seq-len", ["0", "65"], ["1", "64"]),
    ("evaluate", "--batch-size", ["0"], ["1"]),
    ("evaluate", "--max-tokens", ["0"], ["1"]),
    ("evaluate", "--speed-tokens", ["-1"], ["0"]),
    ("rank_layers", "--seq-len", ["0", "65"], ["1", "64"]),
    ("rank_layers", "--batch-size", ["0"], ["1"]),
    ("rank_layers", "--max-tokens", ["0"], ["1"]),
    ("rank_layers", "--num-skip", ["0", "5"], ["1", "4"]),
    ("rank_layers", "--greedy", ["-1", "5"], ["0", "4"]),
    ("rank_layers", "--shortlist", ["-1"], ["0"]),
    ("generate", "--max-new-tokens", ["0"], ["1"]),
    ("generate", "--lookahead", ["0", "33"], ["1", "32"]),
    ("generate", "--temperature", ["-0.1", "nan"], ["0"]),
    ("generate", "--top-k", ["0"], ["1"]),
    ("generate", "--top-p", ["0", "1.1"], ["1"]),
    ("generate", "--seed", ["-1"], ["0"]),
    ("export", "--num-skip", ["0", "3"], ["1", "2"]),
    ("check_gguf", "--max-tokens", ["0"], ["1"]),
    ("check_gguf", "--seq-len", ["0", "65"], ["1", "64"]),
    ("check_gguf", "--speed-tokens", ["-1"], ["0"]),
    ("check_gguf", "--repeats", ["0"], ["1"]),
    ("check_gguf", "--threads", ["0"], ["1"]),
    ("check_gguf", "--num-skip", ["0", "3"], ["1", "2"]),
    ("random_model", "--layers", ["0"], ["1"]),
    ("random_model", "--hidden", ["0"], []),
    ("random_model", "--heads", ["0"], []),
    ("random_model", "--kv-heads", ["0"], []),
]


def _cases():
    for command, flag, refused, accepted in NUMBERS:
        for value in refused:
            yield command, flag, value, False
        for value in accepted:
            yield command, flag, value, True


@pytest.mark.parametrize("command,flag,value,accepted", list(_cases()))
def test_every_numeric_flag_is_checked_before_any_work(tiny_run, tmp_path, monkeypatch, command, flag, value,
                                                       accepted):
    root, _ = tiny_run
    monkeypatch.setenv("STDOUT", "1")  # train.py: no log file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, *extra = command.split(" ")
    work, base = BASE[name]

    def started(*args, **kwargs):
        raise Started

    module(name)  # prepare.py and train.py: imported (by path) before their names are patched
    monkeypatch.setattr(work, started)
    fill = dict(root=root, model=root / "model", data=root / "data", tmp=tmp_path)
    argv = [a.format(**fill) for a in base] + extra + [f"{flag}={value}"]
    if accepted:
        with pytest.raises(Started):
            entry(name)(argv)
    else:
        with pytest.raises(UserError, match=f"^{flag}") as e:
            entry(name)(argv)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("allowed,good,bad,words", [
    (Range(1), [1, 10**9], [0, -1, float("nan"), float("inf"), True, "1"], "at least 1"),
    (Range(0), [0, 0.5], [-1e-9], "0 or more"),
    (Range(0, above=True), [1e-12], [0, float("inf")], "positive"),
    (Range(1, 4, note="the model's layers"), [1, 4], [0, 5], "in 1..4"),
    (Range(0.0, 1.0), [0.0, 1.0], [-0.1, 1.1], "between 0 and 1"),
    (Range(0.0, 1.0, below=True), [0.0, 0.999], [1.0], "at least 0 and below 1"),
    (Range(0.0, 1.0, above=True), [1.0, 1e-9], [0.0], "above 0 and at most 1"),
])
def test_range(allowed, good, bad, words):
    for v in good:
        check_range("--x", v, allowed)
    check_range("--x", None, allowed)  # not given
    for v in bad:
        with pytest.raises(UserError, match=r"^--x must be "):
            check_range("--x", v, allowed)
    assert allowed.describe() == words


# Upper bounds from what the machine can honour (issue 29), on a machine made to have 2 CPUs and 1 GiB of memory
# available: threads against the CPUs, tokens held in memory (16 bytes each: 2**26 in 1 GiB) and a forward's
# activations against the memory, decoding against the model's positions less the prompt (the tiny tokenizer reads
# evaluate's speed prompt as 7 words), seeds within numpy's and torch's, repeats within 1000.
MIB = 2**20
FORWARD = 32 * (2 * 64 * 4 + (2 * 64 + 4 * 32) * 4)  # bytes a window of 32 tokens takes in the tiny model's forward
UPPER = [  # command (and extra arguments), flag, refused, accepted
    ("check_gguf", "--threads", ["3", "100000"], ["2"]),
    ("check_gguf", "--repeats", ["1001", "1000000000"], ["1000"]),
    ("check_gguf", "--max-tokens", [str(2**26 + 1)], [str(2**26)]),
    ("check_gguf --against {model}/config.json", "--speed-tokens", ["57", "1000000000"], ["56"]),
    ("evaluate", "--speed-tokens", ["58", "1000000000"], ["57"]),
    ("evaluate", "--max-tokens", [str(2**26 + 1)], [str(2**26)]),
    ("evaluate", "--batch-size", [str(1024 * MIB // FORWARD + 1), str(10**12)], [str(1024 * MIB // FORWARD)]),
    ("rank_layers", "--max-tokens", [str(2**26 + 1)], [str(2**26)]),
    ("rank_layers", "--batch-size", [str(1024 * MIB // FORWARD + 1)], [str(1024 * MIB // FORWARD)]),
    ("rank_layers", "--shortlist", ["5"], ["4"]),
    ("generate", "--seed", [str(2**32), str(2**64)], [str(2**32 - 1)]),
    ("generate", "--temperature", ["100.5", "1e300"], ["100"]),
    ("generate", "--top-k", ["65"], ["64"]),
    ("generate", "--max-new-tokens", ["63", "1000000000"], ["62"]),  # the prompt "t1 t2": 2 tokens
    ("random_model", "--seed", [str(2**32)], [str(2**32 - 1)]),
    ("random_model", "--layers", ["1025"], []),
    ("random_model", "--hidden", ["65537"], []),
    ("random_model", "--heads", ["65"], []),
    ("random_model", "--kv-heads", ["5"], ["4"]),
]


def _upper_cases():
    for command, flag, refused, accepted in UPPER:
        yield from ((command, flag, v, False) for v in refused)
        yield from ((command, flag, v, True) for v in accepted)


@pytest.mark.parametrize("command,flag,value,accepted", list(_upper_cases()))
def test_every_count_has_an_upper_bound_from_the_machine(tiny_run, tmp_path, monkeypatch, command, flag, value,
                                                         accepted):
    from phi3skip.core import machine

    root, _ = tiny_run
    monkeypatch.setattr(machine, "cpu_count", lambda: 2)
    monkeypatch.setattr(machine, "available_memory", lambda: 1024 * MIB)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, *extra = command.split(" ")
    work, base = BASE[name]

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(work, started)
    fill = dict(root=root, model=root / "model", data=root / "data", tmp=tmp_path)
    argv = [a.format(**fill) for a in base + extra] + [f"{flag}={value}"]
    if accepted:
        with pytest.raises(Started):
            entry(name)(argv)
    else:
        with pytest.raises(UserError, match=f"^{flag}[ :]") as e:  # its range, or the memory it needs
            entry(name)(argv)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("command,argv,words", [
    ("evaluate", ["--batch-size", str(10**9), "--seq-len", "64"], "--batch-size 1000000000: a forward of"),
    ("rank_layers", ["--batch-size", str(10**9), "--seq-len", "64"], "needs about"),
    ("random_model", ["--layers", "1024", "--hidden", "65536", "--heads", "512", "--kv-heads", "512"],
     "a random model of"),
])
def test_memory_estimates_are_checked_before_anything_is_allocated(tiny_run, tmp_path, monkeypatch, command, argv,
                                                                  words):
    from phi3skip.core import machine

    root, _ = tiny_run
    monkeypatch.setattr(machine, "available_memory", lambda: 64 * MIB)
    work, base = BASE[command]

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(work, started)
    fill = dict(root=root, model=root / "model", data=root / "data", tmp=tmp_path)
    with pytest.raises(UserError, match="of memory and this machine has 64.0 MiB available; lower") as e:
        entry(command)([a.format(**fill) for a in base] + argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_machine_readings():
    from phi3skip.core import machine

    assert 1 <= machine.cpu_count() <= (__import__("os").cpu_count() or 1)
    assert machine.available_memory() is None or machine.available_memory() > 0
    assert machine.threads().high == machine.cpu_count()
    assert machine.SEED.holds(2**32 - 1) and not machine.SEED.holds(2**32)
    assert machine.REPEATS.describe() == "in 1..1000"


# train.py's and prepare.py's upper bounds (issue 29): both ends of every flag, what the machine can honour --------
_CPUS = os.cpu_count() or 1
_BIG = [  # command, flag, refused, accepted
    ("prepare", "--max-tokens", [str(2**40 + 1)], [str(2**40)]),
    ("prepare", "--val-tokens", [str(2**40 + 1)], [str(2**40)]),
    ("prepare", "--workers", [str(_CPUS + 1)], [str(_CPUS)]),
    ("prepare", "--seed", [str(2**32), str(2**64)], [str(2**32 - 1)]),
    ("train", "--batch-size", ["2147483648", "100000000"], ["1000"]),  # 1e8 x 32 x 64 logits: 1.6 TB
    ("train", "--grad-accum", [str(2**20 + 1)], [str(2**20)]),
    ("train", "--eval-tokens", ["0", str(2**40 + 1)], ["1", str(2**40)]),
    ("train", "--log-every", ["0", str(10**9 + 1)], ["1", str(10**9)]),
    ("train", "--keep-checkpoints", ["0", "10001"], ["1", "10000"]),
    ("train", "--rank-tokens", ["0", str(2**40 + 1)], ["1", str(2**40)]),
    ("train --layers auto", "--rank-tokens", [str(2**40)], ["1024"]),  # 8 TB of token ids to rank on
    ("train", "--steps-per-layer", ["0", str(10**9 + 1)], ["1", str(10**9)]),
    ("train", "--max-steps", ["0", str(10**9 + 1)], ["1", str(10**9)]),
    ("train", "--stop-at", ["0", str(10**9 + 1)], ["1", str(10**9)]),
    ("train", "--kl-chunk", ["0", str(2**31)], ["1", str(2**31 - 1)]),
    ("train", "--num-skip", [str(2**16 + 1)], []),
    ("train", "--lsq-tokens", [str(2**40 + 1)], [str(2**40)]),  # sequential: no least-squares fit
    ("train --schedule nested", "--lsq-tokens", [str(10**9)], ["0", "256"]),  # 640 GB of residuals
    ("train", "--lsq-check-tokens", ["-1", str(2**40 + 1)], ["0", str(2**40)]),
    ("train", "--rank-shortlist", [str(2**16 + 1)], [str(2**16)]),
    ("train", "--save-every", [str(10**9 + 1)], [str(10**9)]),
    ("train", "--eval-every", ["-1", str(10**9 + 1)], ["0", str(10**9)]),
    ("train", "--warmup", ["-1", str(10**9 + 1)], ["0", str(10**9)]),
    ("train", "--kd-weight", ["-1", "1000001"], ["0", "1000000"]),
    ("train", "--ce-weight", ["-1", "1000001", "nan"], ["0", "1000000"]),
    ("train --schedule nested", "--align-weight", ["-1", "1000001"], ["0", "1000000"]),
    ("train", "--weight-decay", ["-0.1", "10.5"], ["0", "10"]),
    ("train", "--grad-clip", ["1000001"], ["1000000"]),
    ("train", "--seed", [str(2**32), str(2**64)], [str(2**32 - 1)]),
    ("train", "--lr", ["10.5"], ["10"]),
    ("train", "--temperature", ["-1", "100.5", "inf"], ["100"]),
    ("train", "--num-epochs", ["0", "1000001"], ["1e-3", "1000000"]),
    ("train", "--data-weights", ["1e13", "inf"], ["1e12"]),
]


@pytest.mark.parametrize("command,flag,value,accepted", [
    (c, f, v, ok) for c, f, refused, accepted in _BIG for vals, ok in ((refused, False), (accepted, True)) for v in vals])
def test_train_and_prepare_counts_have_upper_bounds(tiny_run, tmp_path, monkeypatch, command, flag, value, accepted):
    test_every_numeric_flag_is_checked_before_any_work(tiny_run, tmp_path, monkeypatch, command, flag, value, accepted)


def test_the_memory_check_says_what_it_needs_and_what_the_machine_has(tiny_run, tmp_path, monkeypatch):
    """One line with the estimate, its largest part, the machine's memory and where it was read."""
    from phi3skip.train.job import machine_memory
    have, where = machine_memory()
    assert have > 2**20 and where == "memory (/proc/meminfo)"
    monkeypatch.setattr("phi3skip.train.job.machine_memory", lambda device="cpu": (2**30, "memory (test)"))
    monkeypatch.setenv("STDOUT", "1")
    root, _ = tiny_run
    module("train")
    monkeypatch.setattr(BASE["train"][0], lambda *a, **k: pytest.fail("the work started"))
    argv = [a.format(root=root, model=root / "model", data=root / "data", tmp=tmp_path) for a in BASE["train"][1]]
    with pytest.raises(UserError, match=r"^--batch-size 70000 x --max-seq-len 32: the run needs at least 1\.1 GiB "
                                        r"\(logits 1\.1 GiB\), more than this machine's 1\.0 GiB of memory \(test\); "
                                        r"lower it$"):
        entry("train")(argv + ["--batch-size", "70000"])
