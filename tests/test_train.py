"""train.py end to end on a tiny model (CPU): the loss falls, one and two (gloo FSDP) processes agree, resume
is exact in both, a non-finite loss stops the run, the output loads in transformers, bad input is one line."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from phi3skip import Phi3Config, Phi3ForCausalLM, UserError, from_pretrained, save_checkpoint
from phi3skip.data.tokens import write_tokens
from phi3skip.data.tokenizer import tokenizer_hash

ROOT = Path(__file__).resolve().parent.parent
V = 128
spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


def markov(n: int, seed: int) -> np.ndarray:
    """A learnable stream: next = 7 * previous + U{0..3} (mod V)."""
    rng = np.random.default_rng(seed)
    ids = np.empty(n, dtype=np.int64)
    ids[0] = 5
    noise = rng.integers(0, 4, n)
    for i in range(1, n):
        ids[i] = (ids[i - 1] * 7 + noise[i]) % V
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer model briefly trained on the stream (a teacher worth distilling), its tokenizer, a data folder."""
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("tiny")
    model_dir, data = root / "model", root / "data"
    model_dir.mkdir()
    data.mkdir()
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")).save(str(model_dir / "tokenizer.json"))
    cfg = Phi3Config.from_dict(dict(model_type="phi3", vocab_size=V, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, original_max_position_embeddings=64,
                                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                    torch_dtype="float32"))
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    model.init_weights(0.05)
    train_ids, val_ids = markov(20000, 0), markov(3000, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    w = torch.from_numpy(train_ids[:8 * 33 * 40]).view(-1, 33)
    for i in range(40):
        x = w[i * 8:(i + 1) * 8]
        torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(model.state_dict(), cfg, model_dir, copy_from=model_dir)
    write_tokens(data / "train.bin", train_ids, V, 2)
    write_tokens(data / "val.bin", val_ids, V, 2)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "tiny", "vocab_size": V,
                                               "tokenizer_sha256": tokenizer_hash(model_dir / "tokenizer.json")}))
    return root


def args(tiny: Path, run: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny / "model"), "--data", str(tiny / "data"), "--out", str(run / "out"),
            "--ckpt-dir", str(run / "ckpt"), "--log-dir", str(run / "logs"), "--max-seq-len", "32",
            "--eval-tokens", "512", "--eval-every", "0", "--log-every", "100", *extra]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("STDOUT", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ckpt" / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run) if "loss" in m]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "out" / "model.safetensors")


def torchrun(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "STDOUT": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *argv]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


SEQ = ("--layers", "2,0", "--steps-per-layer", "3", "--lr", "2e-3", "--kd-weight", "1")


def test_loss_falls_and_output(tiny, tmp_path):
    run = tmp_path / "fall"
    out = train.main(args(tiny, run, "--layers", "1", "--steps-per-layer", "24", "--lr", "5e-4",
                          "--kd-weight", "1", "--batch-size", "8", "--save-every", "0"))
    ls = losses(run)
    assert len(ls) == 24 and np.mean(ls[-4:]) < 0.6 * np.mean(ls[:2])
    skip = json.loads((out / "skip.json").read_text())
    assert skip["layers"] == [1] and skip["schedule"] == "sequential"
    ppl = skip["perplexity"]
    first = metrics(run)[0]["eval"]
    assert ppl["teacher"] == first["teacher"]  # measured once
    assert ppl["prefixes"][0]["skip"] == [1]
    assert ppl["prefixes"][0]["perplexity"] < first["prefixes"][0]["perplexity"]  # distillation helped skipping
    assert (out / "tokenizer.json").is_file()
    transformers = pytest.importorskip("transformers")
    hf = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    ours = from_pretrained(out)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-4)


def test_resume_is_exact_in_one_process(tiny, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(args(tiny, whole, *SEQ, "--save-every", "2"))
    assert train.main(args(tiny, parts, *SEQ, "--save-every", "2", "--stop-at", "5")) is None
    assert sorted(p.name for p in (parts / "ckpt").glob("step-*")) == ["step-00000003", "step-00000004"]
    assert not (parts / "out").exists()
    train.main(args(tiny, parts, *SEQ, "--save-every", "2", "--resume"))
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(whole) == losses(parts)  # the resumed run replaced the lines after its checkpoint


@pytest.mark.integration
def test_two_processes_agree_and_resume_exactly(tiny, tmp_path):
    one, two, two_parts = tmp_path / "one", tmp_path / "two", tmp_path / "two_parts"
    train.main(args(tiny, one, *SEQ, "--batch-size", "4", "--save-every", "2"))
    torchrun(*args(tiny, two, *SEQ, "--batch-size", "2", "--save-every", "2"))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-3, atol=1e-5)  # same global batches
    a, b = json.loads((one / "out" / "skip.json").read_text()), json.loads((two / "out" / "skip.json").read_text())
    assert b["perplexity"]["student"] == pytest.approx(a["perplexity"]["student"], rel=1e-3)
    torchrun(*args(tiny, two_parts, *SEQ, "--batch-size", "2", "--save-every", "2", "--stop-at", "5"))
    torchrun(*args(tiny, two_parts, *SEQ, "--batch-size", "2", "--save-every", "2", "--resume"))
    a, b = weights(two), weights(two_parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    real = train.distill_step
    calls = []

    def poisoned(*a, **kw):
        stats = real(*a, **kw)
        calls.append(1)
        return stats * float("nan") if len(calls) == 3 else stats

    monkeypatch.setattr(train, "distill_step", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny, run, *SEQ, "--save-every", "2"))
    assert e.value.code == 1
    assert [p.name for p in (run / "ckpt").glob("step-*")] == ["step-00000002"]
    assert (run / "ckpt" / "latest").read_text().strip() == "step-00000002"
    assert not (run / "out").exists()
    advice = "the same command with --resume --lr 0.001"
    assert advice in capsys.readouterr().err
    monkeypatch.setattr(train, "distill_step", real)
    assert train.main(args(tiny, run, *SEQ, "--save-every", "2", "--resume", "--lr", "1e-3"))  # the advice works
    lrs = [m["lr"] for m in metrics(run) if "lr" in m]
    assert lrs[2] == pytest.approx(1e-3 * train.lr_lambda(3, 1, 0.1)(2))  # the schedule goes on at the new rate
    with pytest.raises(UserError, match="a lower --lr is allowed"):
        train.main(args(tiny, run, *SEQ, "--save-every", "2", "--resume", "--lr", "1e-2", "--overwrite"))


def test_nested_schedule_runs(tiny, tmp_path, monkeypatch):
    run = tmp_path / "nested"
    monkeypatch.chdir(tiny)  # the teacher given as a relative path
    argv = args(tiny, run, "--schedule", "nested", "--max-steps", "6", "--lr", "1e-3", "--train-scope", "1-3",
                "--k-dist", "uniform", "--grad-accum", "2", "--save-every", "0")
    argv[argv.index("--model") + 1] = "model"
    out = train.main(argv)
    schedule = train.Schedule("nested", (2, 0), 6, 0)
    rows = [m for m in metrics(run) if "skip" in m]
    assert [m["skip"] for m in rows] == [[list(schedule.skip(m["step"] - 1, i)) for i in range(2)] for m in rows]
    assert any(m["skip"][0] != m["skip"][1] for m in rows)  # micro-batches differ: each one is logged
    skip = json.loads((out / "skip.json").read_text())
    assert skip["teacher"] == str((tiny / "model").resolve())  # found again from any folder
    assert [p["skip"] for p in skip["perplexity"]["prefixes"]] == [[2], [2, 0]]
    before, after = from_pretrained(tiny / "model"), from_pretrained(out)
    assert torch.equal(before.model.layers[0].mlp.down_proj.weight, after.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(before.model.layers[1].mlp.down_proj.weight, after.model.layers[1].mlp.down_proj.weight)


# Outputs: nothing lost, checked before the work --------------------------------------------------------------
def test_out_never_replaces_the_teacher_or_an_existing_folder(tiny, tmp_path):
    model = tiny / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for out in (model, model / "student", tiny):
        argv = args(tiny, tmp_path, "--overwrite")
        argv[argv.index("--out") + 1] = str(out)
        with pytest.raises(UserError, match="--model"):
            train.main(argv)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="out: already exists; pass --overwrite"):
        train.main(args(tiny, tmp_path))
    assert (tmp_path / "out" / "keep.txt").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("flag", ["--out", "--ckpt-dir", "--log-dir"])
def test_unwritable_output_fails_before_any_work(tiny, tmp_path, monkeypatch, flag):
    monkeypatch.setenv("STDOUT", "0")  # a log file is written: --log-dir matters
    (tmp_path / "blocker").write_text("a file where a folder should be")
    argv = args(tiny, tmp_path)
    argv[argv.index(flag) + 1] = str(tmp_path / "blocker" / "x")
    with pytest.raises(UserError, match=f"{flag} .*blocker is a file, not a folder"):
        train.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # nothing started: no log, no checkpoint


# Checkpoints: damaged ones are skipped, none can run code -----------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    """A run stopped after step 5 (checkpoints 3 and 4), and the straight run's weights."""
    root = tmp_path_factory.mktemp("stopped")
    train.main(args(tiny, root / "whole", *SEQ, "--save-every", "2"))
    train.main(args(tiny, root / "parts", *SEQ, "--save-every", "2", "--stop-at", "5"))
    return root


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst / "ckpt" / "step-00000004"


def _garble(f: Path) -> None:
    """Same size, first bytes overwritten (a disk error): only reading the file finds out."""
    data = f.read_bytes()
    f.write_bytes(b"\xff" * 64 + data[64:])


@pytest.mark.parametrize("damage", ["rng", "metadata", "shard"])
def test_resume_skips_a_damaged_checkpoint(tiny, stopped, tmp_path, capsys, damage):
    run = tmp_path / "run"
    newest = _copy_run(stopped / "parts", run)
    if damage == "rng":
        (newest / "rng-0.json").write_text('{"python": [3, [1, 2')
    else:
        f = newest / ".metadata" if damage == "metadata" else next(newest.glob("*.distcp"))
        f.write_bytes(f.read_bytes()[:100])  # truncated
    train.main(args(tiny, run, *SEQ, "--save-every", "2", "--resume"))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged" in out and "resuming from" in out and "step-00000003" in out
    a, b = weights(stopped / "whole"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 3: still the straight run's weights


def test_resume_with_no_intact_checkpoint_is_one_line(tiny, stopped, tmp_path):
    run = tmp_path / "run"
    _copy_run(stopped / "parts", run)
    for f in (run / "ckpt").glob("step-*/rng-0.json"):
        f.unlink()
    with pytest.raises(UserError, match=r"no intact checkpoint in .*rng-0\.json is missing"):
        train.main(args(tiny, run, *SEQ, "--save-every", "2", "--resume"))
    _copy_run(stopped / "parts", tmp_path / "run2")
    for f in (tmp_path / "run2" / "ckpt").glob("step-*/__0_0.distcp"):
        _garble(f)
    with pytest.raises(UserError, match=r"checkpoint .*step-00000004 is damaged .*delete it to resume from the one"):
        train.main(args(tiny, tmp_path / "run2", *SEQ, "--save-every", "2", "--resume"))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a crafted pickle does when loaded: here, create a file
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_runs_no_code(tiny, stopped, tmp_path):
    import pickle

    run = tmp_path / "run"
    newest = _copy_run(stopped / "parts", run)
    marker = tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    older = run / "ckpt" / "step-00000003"
    (older / "trainer.json").unlink()  # an older-format checkpoint: pickled trainer.pt and rng files
    torch.save({"trainer": _Payload(marker)}, older / "trainer.pt")
    torch.save(_Payload(marker), older / "rng-0.pt")
    with pytest.raises(UserError, match="no intact checkpoint"):
        train.main(args(tiny, run, *SEQ, "--save-every", "2", "--resume"))
    assert not marker.exists()


def _other_data(tiny: Path, tmp_path: Path, n: int = 20000, tokenizer_sha256: str | None = None) -> Path:
    data = tmp_path / "data2"
    data.mkdir()
    write_tokens(data / "train.bin", markov(n, 0), V, 2)
    write_tokens(data / "val.bin", markov(max(n // 4, 40), 1), V, 2)
    sha = tokenizer_sha256 or tokenizer_hash(tiny / "model" / "tokenizer.json")
    (data / "meta.json").write_text(json.dumps({"vocab_size": V, "tokenizer": "other", "tokenizer_sha256": sha}))
    return data


@pytest.mark.parametrize("extra,message", [
    (("--data", "/nonexistent/data"), "no such folder"),
    (("--layers", "4"), "out of range"),
    (("--layers", "2,2"), "more than once"),
    (("--schedule", "random"), "unknown"),
    (("--max-seq-len", "100"), r"--max-seq-len must be in 1\.\.64 \(the model's positions\), got 100"),
    (("--adapter-rank", "65"), r"--adapter-rank must be in 0\.\.64 \(the model's hidden size\), got 65"),
    (("--schedule", "nested", "--adapter-mlp", "129"), r"--adapter-mlp must be in 0\.\.128 \("),
    (("--layers", "auto", "--num-skip", "5"), r"--num-skip must be in 1\.\.4 \(the number of candidate layers\)"),
    (("--layers", "2,0", "--num-skip", "3"), r"--num-skip must be in 1\.\.2"),
    (("--num-skip", "0"), r"--num-skip must be in 1\.\.65536 \(then the model's layers\), got 0"),
    (("--seed", "-1"), r"--seed must be in 0\.\.4294967295 \(what numpy and torch seed with"),
    (("--lr", "inf"), r"--lr must be a finite number \(a rate above 10 diverges at once\), got inf"),
    (("--train-scope", "2", "--layers", "2"), "no gradient from the skip term"),
    (("--resume",), "no intact checkpoint"),
    (("--bogus",), "unrecognized arguments"),
    (("--stop-at", "-3"), r"--stop-at must be in 1\.\.1000000000 \(a billion steps\)"),
    (("--save-every", "-1"), r"--save-every must be in 0\.\.1000000000"),
    (("--kd-weight", "-1"), r"--kd-weight must be between 0 and 1e\+06 \(a loss weight\)"),
    (("--ce-weight", "nan"), r"--ce-weight must be a finite number \(a loss weight\), got nan"),
    (("--align-weight", "1"), "--align-weight aligns the bypasses of --train-scope adapters"),
    (("--depth-rank", "2"), "--depth-rank gives the bypasses of --train-scope adapters per-depth deltas"),
    (("--schedule", "nested", "--depth-rank", "65"), r"--depth-rank must be in 0\.\.64 \(the model's hidden size\)"),
    (("--schedule", "nested", "--align-weight", "-1"), r"--align-weight must be between 0 and 1e\+06"),
    (("--min-lr-ratio", "2"), "--min-lr-ratio must be between 0 and 1"),
    (("--dtype", "float16"), "loss scaler"),
    (("--data-weights", "1", "1"), r"--data-weights: 2 weight\(s\) for 1 --data folder\(s\)"),
    (("--data-weights", "0"), r"--data-weights must be above 0 and at most 1e\+12 \(a blend's weight\), got 0\.0"),
])
def test_bad_input(tiny, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train.main(args(tiny, tmp_path, *extra))


def test_bad_data(tiny, tmp_path):
    with pytest.raises(UserError, match="another tokenizer"):
        train.main(args(tiny, tmp_path, "--data", str(_other_data(tiny, tmp_path, tokenizer_sha256="0" * 64))))
    short = tmp_path / "short"
    short.mkdir()
    with pytest.raises(UserError, match="fewer than one global batch"):
        train.main(args(tiny, short, "--data", str(_other_data(tiny, short, n=100))))


@pytest.mark.integration
def test_command_line_error_is_one_line(tiny, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(tiny, tmp_path, "--layers", "9")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "out of range" in res.stderr


def test_the_schedule_picks_the_recipe_defaults():
    nested = train.parse_args(["--data", "d", "--schedule", "nested"])
    assert (nested.train_scope, nested.k_dist, nested.lr) == ("adapters", "sandwich", 1e-3)
    seed = train.parse_args(["--data", "d"])
    assert (seed.schedule, seed.train_scope, seed.k_dist, seed.lr) == ("sequential", "all", "uniform", 1e-5)
    blocks = train.parse_args(["--data", "d", "--schedule", "nested", "--train-scope", "12-29", "--k-dist", "uniform"])
    assert (blocks.train_scope, blocks.k_dist, blocks.lr) == ("12-29", "uniform", 1e-5)


def test_layers_auto_uses_the_greedy_order(tiny, tmp_path):
    from phi3skip.data.tokens import Batches
    from phi3skip.eval.importance import greedy_order

    run = tmp_path / "auto"
    train.main(args(tiny, run, "--layers", "auto", "--num-skip", "2", "--schedule", "nested", "--max-steps", "1",
                    "--batch-size", "4", "--rank-tokens", "256", "--rank-shortlist", "2"))
    model = from_pretrained(tiny / "model", dtype="float32")
    batches = Batches(tiny / "data" / "train.bin", 4, 32, seed=0)
    order = greedy_order(model, [batches.get(i, "cpu") for i in range(2)], 2, shortlist=2)
    assert json.loads((run / "out" / "skip.json").read_text())["layers"] == [layer for layer, _ in order]


def test_adapters_keep_the_teacher_exact_and_resume_bitwise(tiny, tmp_path):
    """--train-scope adapters: the saved base is the teacher bit for bit, only the bypasses change, skipping
    gets better than the least-squares start, and a run stopped and resumed ends where a straight run ends."""
    from phi3skip.model import bypass

    extra = ("--schedule", "nested", "--k-dist", "sandwich", "--layers", "2,1", "--train-scope", "adapters",
             "--max-steps", "6", "--lr", "3e-3", "--adapter-rank", "8", "--lsq-tokens", "256", "--save-every", "2")
    straight = train.main(args(tiny, tmp_path / "a", *extra))
    train.main(args(tiny, tmp_path / "b", *extra, "--stop-at", "3"))
    resumed = train.main(args(tiny, tmp_path / "b", *extra, "--resume"))
    assert load_file(straight / "model.safetensors").keys() == load_file(tiny / "model" / "model.safetensors").keys()
    teacher = load_file(tiny / "model" / "model.safetensors")
    assert all(torch.equal(v, teacher[k]) for k, v in load_file(straight / "model.safetensors").items())
    a, b = load_file(straight / bypass.FILE), load_file(resumed / bypass.FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prof = json.loads((straight / "skip.json").read_text())
    assert prof["adapters"]["layers"] == [2, 1] and prof["adapters"]["rank"] == 8
    ppl = prof["perplexity"]
    assert ppl["student"] == ppl["teacher"]
    start = [m for m in metrics(tmp_path / "a") if "eval" in m][0]["eval"]
    assert ppl["prefixes"][1]["perplexity"] < start["prefixes"][1]["perplexity"]  # trained beats least squares
    model = from_pretrained(straight)
    assert model.skip_adapters is not None and model.skip_adapters.layers == (2, 1)


def test_a_data_blend_trains_resumes_bitwise_and_is_held_to(tiny, tmp_path):
    """Two --data folders blended 3:1: the run resumes bit for bit, and its checkpoints refuse another blend."""
    from phi3skip.model import bypass

    other = _other_data(tiny, tmp_path)
    blend = ("--data", str(tiny / "data"), str(other), "--data-weights", "3", "1")
    extra = ("--schedule", "nested", "--layers", "2,1", "--max-steps", "4", "--adapter-rank", "8",
             "--lsq-tokens", "256", "--save-every", "2", *blend)
    straight = train.main(args(tiny, tmp_path / "a", *extra))
    train.main(args(tiny, tmp_path / "b", *extra, "--stop-at", "2"))
    resumed = train.main(args(tiny, tmp_path / "b", *extra, "--resume"))
    a, b = load_file(straight / bypass.FILE), load_file(resumed / bypass.FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    single = train.main(args(tiny, tmp_path / "c", *extra[:-len(blend)]))
    assert not torch.equal(load_file(single / bypass.FILE)["layers.2.up.weight"], a["layers.2.up.weight"])
    with pytest.raises(UserError, match="data"):
        train.main(args(tiny, tmp_path / "b", *extra[:-2], "1", "1", "--resume"))


def test_skip_json_describes_the_saved_weights(tiny, tmp_path):
    """A bfloat16 teacher: the student is saved in bfloat16, and skip.json's perplexities are those of the saved
    files (measured after the fp32 master weights were rounded), not of the in-memory fp32 weights."""
    from phi3skip.eval.evaluate import perplexity, val_batches

    teacher = from_pretrained(tiny / "model")
    bf16 = save_checkpoint({k: v.to(torch.bfloat16) for k, v in teacher.state_dict().items()}, teacher.config,
                           tmp_path / "bf16", copy_from=tiny / "model")
    out = train.main(args(tiny, tmp_path / "run", "--model", str(bf16), "--layers", "2", "--steps-per-layer", "3",
                          "--lr", "2e-3", "--kd-weight", "1", "--save-every", "0"))
    skip = json.loads((out / "skip.json").read_text())
    assert skip["weights_dtype"] == "bfloat16" and {t.dtype for t in weights(tmp_path / "run").values()} == {torch.bfloat16}
    saved = from_pretrained(out, dtype=torch.float32)
    val = val_batches(tiny / "data" / "val.bin", 4, 32, 512, V)
    assert perplexity(saved, val) == pytest.approx(skip["perplexity"]["student"], rel=1e-6)
    assert perplexity(saved, val, [2]) == pytest.approx(skip["perplexity"]["prefixes"][0]["perplexity"], rel=1e-6)


def test_adapters_save_the_teacher_as_stored_whatever_its_config_says(tiny, tmp_path):
    """A teacher stored in float32 whose config.json says bfloat16: with --train-scope adapters the saved base is
    still the teacher bit for bit (not rounded to the config's dtype), so skip.json's student = teacher is true."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny / "model", teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    out = train.main(args(tiny, tmp_path / "run", "--model", str(teacher), "--schedule", "nested", "--layers", "2",
                          "--max-steps", "1", "--adapter-rank", "8", "--lsq-tokens", "64", "--lsq-check-tokens", "0",
                          "--save-every", "0"))
    stored = load_file(teacher / "model.safetensors")
    assert all(torch.equal(v, stored[k]) for k, v in load_file(out / "model.safetensors").items())
    skip = json.loads((out / "skip.json").read_text())
    assert skip["weights_dtype"] == "float32" and skip["perplexity"]["student"] == skip["perplexity"]["teacher"]


def test_depth_deltas_train_every_depth_and_resume_bitwise(tiny, tmp_path):
    """--depth-rank: the deltas of every depth train; a checkpoint saved before the sandwich first drew a depth
    holds no optimizer state for its deltas and still resumes bit for bit; skip.json records the rank."""
    from phi3skip.model import bypass
    from phi3skip.train.distill import Schedule

    extra = ("--schedule", "nested", "--layers", "2,1,0", "--max-steps", "6", "--adapter-rank", "8",
             "--depth-rank", "2", "--lsq-tokens", "256", "--save-every", "2")
    drawn = [len(Schedule("nested", (2, 1, 0), 6, k_dist="sandwich").skip_sets(i)[1]) for i in range(6)]
    assert drawn[:4] == [2, 2, 2, 2] and 1 in drawn  # depth 1 first trains after the checkpoints
    straight = train.main(args(tiny, tmp_path / "a", *extra))
    train.main(args(tiny, tmp_path / "b", *extra, "--stop-at", "3"))
    resumed = train.main(args(tiny, tmp_path / "b", *extra, "--resume"))
    a, b = load_file(straight / bypass.FILE), load_file(resumed / bypass.FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[f"layers.{i}.depth.{k}.up.B"].any() for i, ks in ((2, (1, 2, 3)), (1, (2, 3)), (0, (3,))) for k in ks)
    assert json.loads((straight / "skip.json").read_text())["adapters"]["depth_rank"] == 2
    assert from_pretrained(straight).skip_adapters.depth_rank == 2


def _remade(folder: Path, seed: int) -> Path:
    """The folder as prepare.py --overwrite leaves it: other tokens, meta.json with their fingerprint."""
    from phi3skip.data.tokens import token_file_hashes
    folder.mkdir(exist_ok=True)
    write_tokens(folder / "train.bin", markov(20000, seed), V, 2)
    write_tokens(folder / "val.bin", markov(3000, seed + 1), V, 2)
    meta = json.loads((folder.parent / "meta.template.json").read_text())  # the tiny model's tokenizer
    (folder / "meta.json").write_text(json.dumps({**meta, "fingerprint": token_file_hashes(folder)}))
    return folder


def test_a_resume_refuses_data_remade_in_the_same_folder(tiny, tmp_path):
    """prepare.py --overwrite into the run's --data folder: the path is the same, the tokens are not."""
    (tmp_path / "meta.template.json").write_text((tiny / "data" / "meta.json").read_text())
    data = _remade(tmp_path / "data", seed=0)
    run = ("--data", str(data), *SEQ, "--save-every", "2")
    train.main(args(tiny, tmp_path, *run, "--stop-at", "2"))
    train.main(args(tiny, tmp_path, *run, "--stop-at", "3", "--resume"))  # the same data resumes
    _remade(data, seed=7)
    with pytest.raises(UserError, match=r"^--resume: .*step-00000003 was made on other tokens in --data "
                                        rf"{data} \(fingerprint .*re-made by prepare\.py\?\); resume with the original "
                                        r"data, or start a new run \(another --ckpt-dir\)$"):
        train.main(args(tiny, tmp_path, *run, "--resume"))


def test_a_resume_refuses_blend_weights_that_differ_in_any_digit(tiny, tmp_path):
    other = _other_data(tiny, tmp_path)
    blend = ("--data", str(tiny / "data"), str(other), "--data-weights")
    run = (*SEQ, "--save-every", "2")
    train.main(args(tiny, tmp_path, *run, *blend, "100.5", "139.5", "--stop-at", "2"))
    with pytest.raises(UserError, match=r"^--resume: .* was made with --data-weights 100\.5 139\.5, this run has "
                                        r"100\.4999 139\.5001; give the run's weights exactly"):
        train.main(args(tiny, tmp_path, *run, *blend, "100.4999", "139.5001", "--resume"))


@pytest.mark.parametrize("spelling", ["same", "slash", "dot", "symlink"])
def test_a_data_folder_named_twice_is_refused(tiny, tmp_path, spelling):
    data = tiny / "data"
    (tmp_path / "link").symlink_to(data)
    second = {"same": str(data), "slash": f"{data}/", "dot": f"{data}/.", "symlink": str(tmp_path / "link")}[spelling]
    with pytest.raises(UserError, match=r"^--data names one folder twice: .* are both .*; name each folder once"):
        train.main(args(tiny, tmp_path / "run", "--data", str(data), second))
    assert not (tmp_path / "run").exists()
