"""distributed.close: after it, no communication thread is left to race the interpreter's exit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, torch
from phi3skip import Phi3Config, Phi3ForCausalLM, distributed, parallel

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
print(f"rank {env.rank} before {before} after {threads()}", flush=True)
'''


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_close_leaves_no_communication_thread(tmp_path):
    (tmp_path / "close.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "close.py")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, r.stdout
    for line in lines:
        before, after = line.split(" after ")
        assert "gloo" in before  # the threads existed while the group was up ...
        assert "gloo" not in after, line  # ... and none outlives close()
