"""train_state on its own: atomic saves, `latest`, `keep`, damaged checkpoints, a resume on another number of ranks
(a checkpoint written by two sharded ranks read back by one process); the run's settings compared field by field
(a lower lr allowed), TrainState's state_dict round trip through JSON, and the checkpoint manager's save / resume /
restore cycle in one process."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi3skip.train import train_state
from phi3skip import Phi3Config, Phi3ForCausalLM, UserError
from phi3skip.core.distributed import Env
from phi3skip.train.train_state import CheckpointManager, RunSettings, SettingsMismatch, TrainState

CFG = dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
           original_max_position_embeddings=32)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config.from_dict(CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randint(0, 64, (1, 8))).float().mean().backward()
    opt.step()
    return model, opt, sched


def save(folder: Path, step: int, model, opt, sched, keep: int = 2) -> Path:
    trainer = {**TrainState(SETTINGS, total_steps=9, batches_per_epoch=5, step=step).state_dict(), "note": "x"}
    return train_state.save(folder, step, model, opt, sched, trainer, Env(), keep=keep)


def test_save_writes_a_complete_checkpoint_and_points_latest_at_it(tmp_path):
    model, opt, sched = setup()
    path = save(tmp_path, 3, model, opt, sched)
    assert path == tmp_path / "step-00000003"
    assert {"trainer.json", "rng-0.json", "meta.json", ".metadata"} <= {p.name for p in path.iterdir()}
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    assert train_state.latest(tmp_path) == path and train_state.verify(path) is None
    assert json.loads((path / "meta.json").read_text())["step"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_an_interrupted_save_leaves_the_previous_checkpoint_as_it_was(tmp_path, monkeypatch):
    model, opt, sched = setup()
    first = save(tmp_path, 1, model, opt, sched)
    before = sorted((p.name, p.stat().st_size) for p in first.iterdir())

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while the shards are written

    monkeypatch.setattr(train_state.dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, opt, sched)
    assert not (tmp_path / "step-00000002").exists()
    assert train_state.latest(tmp_path) == first and train_state.list_checkpoints(tmp_path) == [first]
    assert sorted((p.name, p.stat().st_size) for p in first.iterdir()) == before


def test_latest_falls_back_to_the_highest_complete_step(tmp_path):
    model, opt, sched = setup()
    save(tmp_path, 1, model, opt, sched, keep=0)
    second = save(tmp_path, 2, model, opt, sched, keep=0)
    (tmp_path / "latest").write_text("step-00000009\n")  # names a checkpoint that is not there
    assert train_state.latest(tmp_path) == second
    (tmp_path / "latest").unlink()
    (tmp_path / "step-00000005").mkdir()  # no meta.json: incomplete, never chosen
    assert train_state.latest(tmp_path) == second
    assert train_state.latest(tmp_path / "none") is None


def test_keep_removes_all_but_the_newest(tmp_path):
    model, opt, sched = setup()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, sched, keep=2)
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    save(tmp_path, 5, model, opt, sched, keep=0)  # keep 0: nothing removed
    assert len(train_state.list_checkpoints(tmp_path)) == 3


def test_load_restores_weights_optimizer_and_trainer(tmp_path):
    model, opt, sched = setup(0)
    path = save(tmp_path, 7, model, opt, sched)
    other, opt2, sched2 = setup(1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    trainer = train_state.load(path, other, Env(), opt2, sched2, lr_scale=0.5)
    assert trainer["step"] == 7 and trainer["note"] == "x" and trainer == train_state.read_trainer(path)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    p = next(model.parameters())
    assert torch.equal(opt.state[p]["exp_avg"], opt2.state[next(other.parameters())]["exp_avg"])


def test_a_parameter_that_never_had_a_gradient_resumes_without_optimizer_state(tmp_path):
    """A parameter with no gradient before the save (a skip depth the schedule had not drawn yet) has no optimizer
    state in the checkpoint: it resumes with none, as in the run that went on, and the others with theirs."""
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config.from_dict(CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.model.norm(torch.randn(2, 32)).sum().backward()  # only the final norm gets a gradient
    opt.step()
    path = save(tmp_path, 1, model, opt, sched)
    other, opt2, sched2 = setup(1)
    train_state.load(path, other, Env(), opt2, sched2)
    assert [n for n, q in other.named_parameters() if q in opt2.state] == ["model.norm.weight"]
    assert torch.equal(opt2.state[other.model.norm.weight]["exp_avg"], opt.state[model.model.norm.weight]["exp_avg"])


def test_resumable_skips_a_damaged_checkpoint(tmp_path):
    model, opt, sched = setup()
    good = save(tmp_path, 1, model, opt, sched)
    bad = save(tmp_path, 2, model, opt, sched)
    shard = next(p for p in bad.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:10])
    path, damaged = train_state.resumable(tmp_path, Env())
    assert path == good and damaged == [(bad, f"{shard.name} is truncated")]


TWO_RANKS = r'''
import sys, torch
from safetensors.torch import save_file
from phi3skip import Phi3Config, Phi3ForCausalLM
from phi3skip.core import distributed
from phi3skip.train import parallel, train_state

cfg = Phi3Config.from_dict(CFG)
env = distributed.init("cpu")
torch.manual_seed(0)
sd = Phi3ForCausalLM(cfg).state_dict() if env.is_main else None
model = parallel.build_sharded(cfg, sd, env, dtype=torch.float32, param_dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
model(torch.randint(0, 64, (2, 8))).float().mean().backward()
opt.step()
train_state.save(sys.argv[1], 1, model, opt, sched, {"step": 1}, env)
full = parallel.full_state_dict(model, env)
if env.is_main:
    save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight" or not cfg.tie_word_embeddings},
              sys.argv[2])
distributed.close(env)
'''


@pytest.mark.integration
def test_a_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "two.py").write_text(f"CFG = {CFG!r}\n" + TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "two.py"), str(tmp_path / "ckpt"), str(tmp_path / "full.safetensors")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    path = train_state.latest(tmp_path / "ckpt")
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    model, opt, sched = setup(1)
    assert train_state.load(path, model, Env(), opt, sched) == {"step": 1}
    full = load_file(tmp_path / "full.safetensors")
    for k, v in full.items():
        assert torch.equal(model.state_dict()[k], v), k


# The run's settings, its state and the checkpoint manager ----------------------------------------------------
SETTINGS = RunSettings(model="m", data="/d", layers=(2, 0), schedule="sequential", lr=1e-3, steps_per_phase=3,
                       global_batch=4, max_seq_len=32, grad_accum=2, temperature=1.0, kd_weight=0.01, ce_weight=0.0,
                       train_scope="all", warmup=1, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, seed=0,
                       k_dist="uniform", adapter_rank=None, adapter_mlp=None, lsq_tokens=16384)


def other_value(v):
    if isinstance(v, tuple):
        return v + (1,)
    if isinstance(v, str):
        return v + "x"
    if v is None:
        return 8
    return v * 2 + 1  # larger: a larger lr is refused too


def test_settings_mismatch_is_found_field_by_field():
    saved = json.loads(json.dumps(SETTINGS.state_dict()))  # as a checkpoint holds them
    assert SETTINGS.mismatch(saved) is None and saved["layers"] == [2, 0]
    for f in dataclasses.fields(RunSettings):
        changed = dataclasses.replace(SETTINGS, **{f.name: other_value(getattr(SETTINGS, f.name))})
        assert changed.mismatch(saved) == f.name
    assert dataclasses.replace(SETTINGS, lr=5e-4).mismatch(saved) is None  # a lower lr continues the run
    assert SETTINGS.mismatch({k: v for k, v in saved.items() if k != "lsq_tokens"}) == "lsq_tokens"  # older run


def test_train_state_round_trip_and_refusal():
    state = TrainState(SETTINGS, total_steps=6, batches_per_epoch=5, step=4, phase=1, teacher_ppl=12.5)
    saved = json.loads(json.dumps(state.state_dict()))
    assert saved["data_position"] == 8 and saved["epoch"] == 1 and saved["total_steps"] == 6
    again = TrainState(SETTINGS, total_steps=6, batches_per_epoch=5)
    again.load_state_dict(saved)
    assert (again.step, again.phase, again.teacher_ppl) == (4, 1, 12.5)
    assert again.state_dict() == saved
    other = TrainState(dataclasses.replace(SETTINGS, seed=1), total_steps=6, batches_per_epoch=5)
    with pytest.raises(SettingsMismatch, match="made with seed=0, this run has 1"):
        other.load_state_dict(saved)
    assert other.step == 0  # nothing taken from a refused checkpoint


def tiny_model():
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config.from_dict(CFG))


def trained(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randint(0, 64, (2, 8))).float().mean().backward()
    opt.step()
    sched.step()
    return opt, sched


def test_manager_saves_resumes_and_restores(tmp_path):
    env = Env()
    model = tiny_model()
    opt, sched = trained(model)
    ckpt = CheckpointManager(tmp_path, env, every=2, keep=2)
    assert ckpt.due(4) and not ckpt.due(3) and ckpt.due(3, force=True)
    assert not CheckpointManager(tmp_path, env).due(2)  # every=0: only when forced
    ckpt.refuse_earlier_run()  # an empty folder: a fresh run may start
    state = TrainState(SETTINGS, total_steps=6, batches_per_epoch=5, step=3, phase=0, teacher_ppl=9.0)
    path = ckpt.save(model, opt, sched, state)
    assert ckpt.last == path and path.name == "step-00000003"
    with pytest.raises(UserError, match="holds checkpoints of an earlier run"):
        CheckpointManager(tmp_path, env).refuse_earlier_run()

    lower = TrainState(dataclasses.replace(SETTINGS, lr=5e-4), total_steps=6, batches_per_epoch=5)
    resumed = CheckpointManager(tmp_path, env)
    resumed.resume(lower)
    assert (lower.step, lower.phase, lower.teacher_ppl) == (3, 0, 9.0)
    assert resumed.resume_from == resumed.last == path and resumed.lr_scale == 0.5
    fresh = tiny_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=5e-4)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    resumed.restore(fresh, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert sched2.last_epoch == sched.last_epoch and sched2.base_lrs == [lr * 0.5 for lr in sched.base_lrs]
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 0.5)
    state_a, state_b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"]) for i in state_a)

    with pytest.raises(UserError, match=r"--resume: .*step-00000003 was made with grad_accum=2, this run has 3"):
        CheckpointManager(tmp_path, env).resume(TrainState(dataclasses.replace(SETTINGS, grad_accum=3), 6, 5))
    with pytest.raises(UserError, match="no intact checkpoint"):
        CheckpointManager(tmp_path / "none", env).resume(TrainState(SETTINGS, 6, 5))


# Damaged side files: found by verify, so the checkpoint is skipped with the reason, never a traceback -----------------
def _edit_json(name: str, edit):
    def damage(path: Path) -> None:
        obj = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(edit(obj)))
    return damage


def _settings(**kw):
    return lambda t: {**t, "trainer": {**t["trainer"], "settings": {**t["trainer"]["settings"], **kw}}}


def _without_lr(t):
    t["trainer"]["settings"].pop("lr")
    return t


DAMAGE = {
    "rng: python state of the wrong shape": _edit_json("rng-0.json", lambda s: {**s, "python": s["python"][:2]}),
    "rng: python state of the wrong kind": _edit_json("rng-0.json", lambda s: {**s, "python": [3, ["x"] * 625, None]}),
    "rng: numpy state of the wrong kind": _edit_json("rng-0.json", lambda s: {**s, "numpy": ["PCG64", *s["numpy"][1:]]}),
    "rng: torch state too short": _edit_json("rng-0.json", lambda s: {**s, "torch": s["torch"][:100]}),
    "rng: torch state not bytes": _edit_json("rng-0.json", lambda s: {**s, "torch": [True] * len(s["torch"])}),
    "rng: not an object": _edit_json("rng-0.json", lambda s: [1, 2, 3]),
    "rng: missing": lambda path: (path / "rng-0.json").unlink(),
    "trainer: no settings": _edit_json("trainer.json", lambda t: {**t, "trainer": {"step": 2, "total_steps": 9}}),
    "trainer: no lr": _edit_json("trainer.json", _without_lr),
    "trainer: lr 0": _edit_json("trainer.json", _settings(lr=0)),
    "trainer: lr a string": _edit_json("trainer.json", _settings(lr="fast")),
    "trainer: layers not integers": _edit_json("trainer.json", _settings(layers=["a"])),
    "trainer: step negative": _edit_json("trainer.json", lambda t: {**t, "trainer": {**t["trainer"], "step": -1}}),
    "trainer: step past the end": _edit_json("trainer.json", lambda t: {**t, "trainer": {**t["trainer"], "step": 99}}),
    "trainer: teacher_ppl a string": _edit_json("trainer.json",
                                                lambda t: {**t, "trainer": {**t["trainer"], "teacher_ppl": "x"}}),
    "trainer: world_size 0": _edit_json("trainer.json", lambda t: {**t, "world_size": 0}),
    "trainer: world_size a string": _edit_json("trainer.json", lambda t: {**t, "world_size": "1"}),
    "trainer: no optimizer groups": _edit_json("trainer.json", lambda t: {**t, "param_groups": []}),
    "trainer: a group without lr": _edit_json("trainer.json", lambda t: {**t, "param_groups": [{"params": [0]}]}),
    "trainer: scheduler lrs not numbers": _edit_json("trainer.json",
                                                     lambda t: {**t, "scheduler": {**t["scheduler"], "base_lrs": ["x"]}}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_side_file_skips_the_checkpoint(tmp_path, damage, caplog, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("phi3skip"), "propagate", True)  # train.py's logging may have cut it off
    model, opt, sched = setup()
    good = save(tmp_path, 1, model, opt, sched)
    bad = save(tmp_path, 2, model, opt, sched)
    DAMAGE[damage](bad)
    rng_before = torch.get_rng_state()
    path, damaged = train_state.resumable(tmp_path, Env())
    assert path == good and [p for p, _ in damaged] == [bad], damage
    assert "\n" not in damaged[0][1] and ("rng-0.json" if damage.startswith("rng") else "trainer.json") in damaged[0][1]
    assert torch.equal(torch.get_rng_state(), rng_before)  # checking a state restores this process's own
    state = TrainState(SETTINGS, total_steps=9, batches_per_epoch=5)
    manager = CheckpointManager(tmp_path, Env())
    manager.resume(state)  # resumes from the good one, saying why the newer one is skipped
    assert manager.resume_from == good and state.step == 1
    assert f"checkpoint {bad} is damaged" in caplog.text
    manager.restore(model, *trained(model))


def test_latest_never_points_outside_its_folder(tmp_path):
    model, opt, sched = setup()
    elsewhere = save(tmp_path / "elsewhere", 5, model, opt, sched)
    mine = save(tmp_path / "run", 1, model, opt, sched)
    for pointer in (f"../elsewhere/{elsewhere.name}", "\udcff\x00garbage", ""):
        (tmp_path / "run" / "latest").write_text(pointer, errors="surrogateescape")
        assert train_state.latest(tmp_path / "run") == mine


def test_a_symlinked_checkpoint_is_replaced_as_a_link(tmp_path):
    model, opt, sched = setup()
    target = save(tmp_path / "elsewhere", 2, model, opt, sched)
    before = sorted(p.name for p in target.iterdir())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / target.name).symlink_to(target)
    save(tmp_path / "run", 2, model, opt, sched)  # the same step again: the link is replaced, not its target
    assert not (tmp_path / "run" / target.name).is_symlink() and sorted(p.name for p in target.iterdir()) == before
    (tmp_path / "run" / "step-00000001").symlink_to(target)
    for step in (3, 4):
        save(tmp_path / "run", step, model, opt, sched, keep=2)  # step-1, the oldest, goes: the link only
    assert not (tmp_path / "run" / "step-00000001").exists() and sorted(p.name for p in target.iterdir()) == before


def test_metrics_are_never_written_through_a_symlink(tmp_path):
    from phi3skip.train.metrics import Metrics

    outside = tmp_path / "outside.txt"
    outside.write_text('{"step": 1}\nprecious\n')
    run = tmp_path / "run"
    run.mkdir()
    for resume_step in (None, 5):
        (run / "metrics.jsonl").unlink(missing_ok=True)
        (run / "metrics.jsonl").symlink_to(outside)
        m = Metrics(run / "metrics.jsonl", Env(), resume_step)
        m.write(step=6, loss=1.0)
        m.close()
        assert outside.read_text() == '{"step": 1}\nprecious\n'
        assert not (run / "metrics.jsonl").is_symlink()
        assert (run / "metrics.jsonl").read_text() == '{"step": 6, "loss": 1.0}\n'


def test_metrics_resume_drops_damaged_lines(tmp_path):
    from phi3skip.train.metrics import Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n[1]\n{"step": "2"}\n{"step": 3}\n{"step": 9}\n\n')
    Metrics(path, Env(), 3).close()
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'


@pytest.mark.parametrize("version,refused", [("2.5.1+cu124", True), ("2.6.0", False), ("2.13.0+cpu", False)])
def test_checkpoints_are_read_only_with_a_safe_torch(tmp_path, monkeypatch, version, refused):
    model, opt, sched = setup()
    path = save(tmp_path, 1, model, opt, sched)
    monkeypatch.setattr(torch, "__version__", version)
    for read in (lambda: train_state.resumable(tmp_path, Env()), lambda: train_state.load(path, model, Env())):
        if refused:
            with pytest.raises(UserError, match="CVE-2025-32434"):
                read()
        else:
            read()


# The data's identity: a resume refuses other data, saying what changed ------------------------------------------
DATA = dataclasses.replace(SETTINGS, data="1.0 x /a + 3.0 x /b", data_files=("/a sha256:" + "1" * 64,
                                                                            "/b sha256:" + "2" * 64),
                           data_weights=(1.0, 3.0), blend_pattern="0,0,0,1")


@pytest.mark.parametrize("change,words", [
    (dict(data_files=("/a sha256:" + "1" * 64, "/b sha256:" + "3" * 64)),
     r"^was made on other tokens in --data /b \(fingerprint 222222222222\.\.\., now 333333333333\.\.\.: re-made by "
     r"prepare\.py\?\); resume with the original data, or start a new run \(another --ckpt-dir\)$"),
    (dict(data="1.0 x /a + 3.0 x /c", data_files=("/a sha256:" + "1" * 64, "/c sha256:" + "2" * 64)),
     r"^was made on --data /a /b, this run names /a /c; resume with the original data"),
    (dict(data="3.0 x /b + 1.0 x /a", data_files=DATA.data_files[::-1], data_weights=(3.0, 1.0)),
     r"^was made on --data /a /b, this run names /b /a;"),
    (dict(data="1.0000001 x /a + 3.0 x /b", data_weights=(1.0000001, 3.0)),
     r"^was made with --data-weights 1\.0 3\.0, this run has 1\.0000001 3\.0; give the run's weights exactly"),
    (dict(blend_pattern="0,0,1,0"), r"^interleaves its blend in another pattern"),
    (dict(data="/a", data_files=("/a sha256:" + "1" * 64,), data_weights=None, blend_pattern=None),
     r"^was made on --data /a /b, this run names /a;"),
])
def test_a_resume_on_other_data_names_what_changed(change, words):
    saved = json.loads(json.dumps(TrainState(DATA, 6, 5, step=2).state_dict()))
    state = TrainState(dataclasses.replace(DATA, **change), total_steps=6, batches_per_epoch=5)
    with pytest.raises(SettingsMismatch, match=words) as e:
        state.load_state_dict(saved)
    assert "\n" not in str(e.value) and state.step == 0


def test_a_checkpoint_without_data_fingerprints_is_refused():
    older = {k: v for k, v in json.loads(json.dumps(SETTINGS.state_dict())).items()
             if k not in ("data_files", "data_weights", "blend_pattern")}  # as runs before the fingerprints saved
    assert RunSettings.problem(older) is None
    state = TrainState(dataclasses.replace(SETTINGS, data_files=("/d sha256:" + "1" * 64,)), 6, 5)
    with pytest.raises(SettingsMismatch, match=r"^records no fingerprint of its data \(it was made before runs "
                                               r"recorded one\), so its tokens cannot be checked; start a new run"):
        state.load_state_dict({"step": 1, "phase": 0, "settings": older})


@pytest.mark.parametrize("field,value", [("data_files", "/a sha256:1"), ("data_files", [1]), ("data_weights", ["1"]),
                                         ("data_weights", 2.0), ("blend_pattern", [0, 1])])
def test_damaged_data_fields_are_found(field, value):
    saved = {**json.loads(json.dumps(DATA.state_dict())), field: value}
    assert RunSettings.problem(saved) == f"settings field {field} is {value!r:.40}"
