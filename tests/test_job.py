"""train.py's settings: its flags parsed once into a typed JobConfig (phi3skip.train.job), the recipe's defaults
resolved from the schedule, the rules that need no model checked, and the run's recorded settings derived."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from phi3skip.core.cli import UserError
from phi3skip.model.config import Phi3Config
from phi3skip.train.job import JobConfig

ROOT = Path(__file__).resolve().parent.parent


def _train_module():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flags_parse_into_one_typed_config():
    train = _train_module()
    job = train.parse_args(["--data", "a", "b", "--data-weights", "1", "3", "--schedule", "nested",
                            "--max-steps", "72", "--max-seq-len", "256", "--layers", "auto", "--ac"])
    assert isinstance(job, JobConfig)
    assert job.data == ("a", "b") and job.data_weights == (1.0, 3.0)
    assert job.max_steps == 72 and job.max_seq_len == 256 and job.layers == "auto"
    assert job.activation_checkpointing is True
    # nested's recipe: frozen base with bypasses, sandwich k, a constant lr 1e-3 with no warmup
    assert (job.train_scope, job.k_dist, job.lr, job.min_lr_ratio, job.warmup) == ("adapters", "sandwich", 1e-3, 1.0, 0)
    assert job.adapters
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.layers = "1,2"  # the settings are a value: nothing rewrites them during the run


def test_parser_defaults_are_the_dataclass_defaults():
    """One place for every default: the flags' defaults are JobConfig's own (before the recipe's)."""
    train = _train_module()
    job = train.parse_args(["--data", "d"])
    expected = JobConfig(data=("d",)).resolved()
    assert job == expected
    assert (job.train_scope, job.k_dist, job.lr, job.min_lr_ratio, job.warmup) == ("all", "uniform", 1e-5, 0.1, None)


def test_the_recipe_keeps_what_was_given():
    job = JobConfig(data=("d",), schedule="nested", lr=3e-4, warmup=5, min_lr_ratio=0.2, k_dist="uniform").resolved()
    assert (job.lr, job.warmup, job.min_lr_ratio, job.k_dist) == (3e-4, 5, 0.2, "uniform")


@pytest.mark.parametrize("change, message", [
    (dict(schedule="zigzag"), "--schedule 'zigzag': unknown"),
    (dict(data=()), "--data: give at least one folder"),
    (dict(data=("a", "b"), data_weights=(1.0,)), "--data-weights: 1 weight(s) for 2"),
    (dict(k_dist="nope"), "--k-dist 'nope': unknown"),
    (dict(schedule="nested", ce_weight=0.5), "--ce-weight: with --train-scope adapters"),
    (dict(align_weight=1.0), "--align-weight aligns the bypasses"),
    (dict(depth_rank=4), "--depth-rank gives the bypasses"),
    (dict(dtype="float16"), "--dtype float16: training runs in bfloat16 or float32"),
    (dict(lr=-1.0), "--lr must be above 0 and at most 10"),
    (dict(batch_size=0), "--batch-size must be in 1..2147483647"),
])
def test_rules_without_a_model(change, message):
    job = JobConfig(**{"data": ("d",), **change}).resolved()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        job.check()


def test_rules_with_the_model():
    cfg = Phi3Config.from_dict(dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64))
    JobConfig(data=("d",), layers="2,0", num_skip=2, max_seq_len=64).resolved().check_model(cfg)
    with pytest.raises(UserError, match="--max-seq-len must be in 1..64"):
        JobConfig(data=("d",), max_seq_len=65).resolved().check_model(cfg)
    with pytest.raises(UserError, match="--num-skip must be in 1..2"):
        JobConfig(data=("d",), layers="2,0", num_skip=3, max_seq_len=64).resolved().check_model(cfg)
    with pytest.raises(UserError, match="--adapter-rank must be in 0..32"):
        JobConfig(data=("d",), adapter_rank=33, max_seq_len=64).resolved().check_model(cfg)


def _data_folder(path: Path, seed: int = 0, meta: dict | None = None) -> Path:
    """A prepare.py-style folder of random tokens; meta.json as given (no fingerprint by default: an older folder)."""
    import json

    import numpy as np

    from phi3skip.data.tokens import write_tokens
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_tokens(path / "train.bin", rng.integers(0, 64, 500), 64, 2)
    write_tokens(path / "val.bin", rng.integers(0, 64, 100), 64, 2)
    (path / "meta.json").write_text(json.dumps(meta or {"vocab_size": 64}))
    return path


def test_recorded_settings_derive_from_the_config(tmp_path):
    _data_folder(tmp_path / "a")
    _data_folder(tmp_path / "b", seed=1)
    job = JobConfig(data=(str(tmp_path / "a"), str(tmp_path / "b")), data_weights=(1.0, 3.0), schedule="nested",
                    batch_size=2, grad_accum=3, seed=7, depth_rank=0).resolved()
    s = job.run_settings(layers=(3, 1), steps_per_phase=10, world_size=4, warmup=0, kd_weight=1.0)
    assert s.global_batch == 2 * 4 * 3 and s.layers == (3, 1) and s.seed == 7 and s.depth_rank is None
    assert s.data == f"1.0 x {tmp_path / 'a'} + 3.0 x {tmp_path / 'b'}"  # the weights as given, every digit
    assert s.data_weights == (1.0, 3.0) and len(s.blend_pattern.split(",")) == 240
    assert [f.split(" ")[0] for f in s.data_files] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert (s.schedule, s.train_scope, s.lr, s.min_lr_ratio) == ("nested", "adapters", 1e-3, 1.0)
    one = dataclasses.replace(job, data=(str(tmp_path / "a"),), data_weights=None)
    assert one.data_setting() == str(tmp_path / "a")  # a single folder is recorded as its path, as runs always did
    assert job.checkpoints == Path("data/checkpoints/student_model")


# The data's identity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second", ["A", "./A", "A/", "A/.", "B/../A", "{tmp}/A", "link"])
def test_a_folder_named_twice_is_refused_by_its_real_path(tmp_path, monkeypatch, second):
    _data_folder(tmp_path / "A")
    (tmp_path / "B").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "A")
    monkeypatch.chdir(tmp_path)
    job = JobConfig(data=("A", second.format(tmp=tmp_path))).resolved()
    with pytest.raises(UserError, match=r"^--data names one folder twice: A and .* are both .*A; name each folder "
                                        r"once \(to weigh one more, use --data-weights\)$"):
        job.check()


def test_two_folders_pass_and_a_folder_not_named_twice_is_kept(tmp_path, monkeypatch):
    _data_folder(tmp_path / "A")
    _data_folder(tmp_path / "AB", seed=1)
    monkeypatch.chdir(tmp_path)
    JobConfig(data=("A", "AB")).resolved().check()  # a prefix is another folder


def test_the_fingerprint_comes_from_meta_json_or_the_files(tmp_path):
    import json

    from phi3skip.data.tokens import data_fingerprint, token_file_hashes
    old = _data_folder(tmp_path / "old")  # prepared before prepare.py kept hashes: hashed now
    new = _data_folder(tmp_path / "new", meta={"fingerprint": token_file_hashes(old)})
    assert data_fingerprint(old) == data_fingerprint(new)
    _data_folder(old, seed=5)  # re-made from other tokens
    assert data_fingerprint(old) != data_fingerprint(new)
    (new / "meta.json").write_text(json.dumps({"fingerprint": {"train.bin": 3}}))  # not hashes: hashed now
    assert data_fingerprint(new) == "sha256:" + __import__("hashlib").sha256(
        "".join(f"{n} {h}\n" for n, h in token_file_hashes(new).items()).encode()).hexdigest()


def test_blend_weights_are_recorded_exactly(tmp_path):
    a, b = _data_folder(tmp_path / "a"), _data_folder(tmp_path / "b", seed=1)
    runs = [JobConfig(data=(str(a), str(b)), data_weights=w).resolved().run_settings(
        layers=(1,), steps_per_phase=1, world_size=1, warmup=0, kd_weight=1.0) for w in [(100.5, 139.5),
                                                                                        (100.4999, 139.5001)]]
    assert runs[0].data != runs[1].data and runs[0].data_weights == (100.5, 139.5)
    assert runs[1].data_change(runs[0].state_dict()) == (
        "was made with --data-weights 100.5 139.5, this run has 100.4999 139.5001; give the run's weights exactly, "
        "or start a new run (another --ckpt-dir)")
