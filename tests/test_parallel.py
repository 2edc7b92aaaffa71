"""distributed and parallel: close leaves no communication thread to race the interpreter's exit; in one process
the collectives are no-ops, init refuses a missing CUDA device, the full state dict and clipping work as in one
model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, torch
from phi3skip import Phi3Config, Phi3ForCausalLM
from phi3skip.core import distributed
from phi3skip.train import parallel

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

env = distributed.init("cpu")
cfg = Phi3Config.from_dict(dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=32, original_max_position_embeddings=32))
sd = Phi3ForCausalLM(cfg).state_dict() if env.is_main else None
model = parallel.build_sharded(cfg, sd, env, dtype=torch.float32, param_dtype=torch.float32)
model(torch.randint(0, 64, (2, 8))).float().mean().backward()
before = threads()
del model  # as train.py leaves it: garbage in reference cycles, not yet collected
distributed.close(env)
# one file per rank: two processes printing to one pipe can interleave their lines
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"rank{env.rank}.txt"), "w") as f:
    f.write(f"before {before} after {threads()}")
'''


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_close_leaves_no_communication_thread(tmp_path):
    (tmp_path / "close.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "close.py")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    for line in lines:
        before, after = line.split(" after ")
        assert "gloo" in before  # the threads existed while the group was up ...
        assert "gloo" not in after, line  # ... and none outlives close()


# In one process, without torchrun -----------------------------------------------------------------------------
def test_one_process_env_and_collectives_are_no_ops(monkeypatch):
    import torch

    from phi3skip.core import distributed
    from phi3skip.train import metrics

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    env = distributed.init("cpu")
    assert env == distributed.Env() and not env.distributed and env.is_main and env.device.type == "cpu"
    t = torch.tensor([1.0, 3.0])
    for op in ("sum", "mean", "max"):
        assert distributed.all_reduce(t, env, op) is t and t.tolist() == [1.0, 3.0]
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj, env) is obj
    distributed.barrier(env)
    distributed.close(env)  # nothing to tear down
    assert metrics.peak_flops(torch.device("cpu")) is None


def test_init_refuses_cuda_without_a_device(monkeypatch):
    import torch

    from phi3skip.core import distributed
    from phi3skip import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: CUDA is not available on this machine"):
        distributed.init("cuda")


@pytest.mark.parametrize("device,torchrun,expect", [
    ("cuda:1", False, "cuda:1"),  # one process: the GPU named is the one used
    ("cuda", False, "cuda:0"),  # the current one
    ("cuda:2", False, "this machine has 2 CUDA device"),
    ("cuda:1", True, "under torchrun each process uses cuda:LOCAL_RANK"),
])
def test_init_uses_the_gpu_named(monkeypatch, device, torchrun, expect):
    import torch

    from phi3skip.core import distributed
    from phi3skip import UserError

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: torchrun)
    if expect.startswith("cuda"):
        assert str(distributed.init(device).device) == expect and [str(d) for d in chosen] == [expect]
    else:
        with pytest.raises(UserError, match=expect):
            distributed.init(device)


def test_state_dict_and_clipping_in_one_process():
    import torch

    from phi3skip.core import distributed
    from phi3skip.train import parallel
    from phi3skip import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config.from_dict(dict(
        model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        original_max_position_embeddings=32)))
    sd = parallel.full_state_dict(model, distributed.Env())
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) and sd[k].device.type == "cpu" for k, v in model.state_dict().items())
    model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    norm = distributed.grad_norm_clip(list(model.parameters()), 1e-3)
    assert torch.allclose(norm, total)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert clipped.item() == pytest.approx(1e-3, rel=1e-4)
    distributed.grad_norm_clip(list(model.parameters()), 0)  # 0: no clipping, the norm is still returned
    assert torch.allclose(clipped, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
