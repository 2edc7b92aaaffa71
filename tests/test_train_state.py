"""The run's state and the checkpoint manager, directly: settings compared field by field (a lower lr allowed),
TrainState's state_dict round trip through JSON, and a save / resume / restore cycle in one process."""
import dataclasses
import json

import pytest
import torch

from phi3skip import Phi3Config, Phi3ForCausalLM, UserError
from phi3skip.distributed import Env
from phi3skip.train_state import CheckpointManager, RunSettings, SettingsMismatch, TrainState

SETTINGS = RunSettings(model="m", data="/d", layers=(2, 0), schedule="sequential", lr=1e-3, steps_per_phase=3,
                       global_batch=4, max_seq_len=32, grad_accum=2, temperature=1.0, kd_weight=0.01, ce_weight=0.0,
                       train_scope="all", warmup=1, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, seed=0,
                       k_dist="uniform", adapter_rank=None, lsq_tokens=16384)


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
    cfg = Phi3Config.from_dict(dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=32, original_max_position_embeddings=32))
    return Phi3ForCausalLM(cfg)


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
