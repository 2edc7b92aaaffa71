"""from_pretrained / save_pretrained: local and (offline) Hub folders, shards, Llama fusion, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi3skip
from phi3skip.model.config import ConfigError, Phi3Config
from phi3skip.formats.checkpoints import CheckpointError

transformers = pytest.importorskip("transformers")
from test_model import make_pair, tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path: Path, variant: str = "medium-gqa", **kw) -> tuple[Path, torch.nn.Module]:
    _, ours, _ = make_pair(variant)
    return phi3skip.save_pretrained(ours, tmp_path / "ckpt", **kw), ours


@pytest.mark.parametrize("variant", ["medium-gqa", "phi4-mini", "mini-128k-su"])
@torch.no_grad()
def test_save_loads_in_transformers_with_same_logits(tmp_path, variant):
    folder, ours = saved(tmp_path, variant, extra_json={"skip.json": {"layers": [2]}})
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["architectures"] == ["Phi3ForCausalLM"]
    assert json.loads((folder / "skip.json").read_text()) == {"layers": [2]}
    hf = transformers.Phi3ForCausalLM.from_pretrained(folder).eval()
    x = tokens(20)
    assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    again = phi3skip.from_pretrained(folder)
    assert torch.equal(again(x), ours(x))
    if ours.config.tie_word_embeddings:
        assert "lm_head.weight" not in load_file(folder / "model.safetensors")
        assert again.lm_head.weight is again.model.embed_tokens.weight


@torch.no_grad()
def test_sharded_round_trip_and_dtype(tmp_path):
    _, ours, _ = make_pair("mini-4k")
    folder = phi3skip.save_pretrained(ours.to(torch.bfloat16), tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((folder / s).is_file() for s in shards)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m = phi3skip.from_pretrained(folder)  # dtype from the config
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(m(tokens(9)), ours(tokens(9)))
    hf = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (hf(tokens(9)).logits - m.float()(tokens(9))).abs().max().item() <= 1e-4


@torch.no_grad()
def test_llama_checkpoint_is_fused_on_load(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    ours = phi3skip.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    x = tokens(12)
    assert (ours(x) - llama(x).logits).abs().max().item() <= 1e-4
    out = phi3skip.save_pretrained(ours, tmp_path / "as_phi3")  # and it becomes a Phi-3 checkpoint
    hf = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    assert (hf(x).logits - llama(x).logits).abs().max().item() <= 1e-4


def make_hub_cache(cache: Path, repo: str, src: Path) -> None:
    """Lay out a Hugging Face cache entry for `repo` holding the files of `src`, as snapshot_download does."""
    commit = "0" * 40
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


@pytest.mark.integration
def test_hub_path_offline(tmp_path):
    folder, ours = saved(tmp_path)
    make_hub_cache(tmp_path / "hub", "tiny-org/tiny-phi3", folder)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret123"}
    code = ("import torch, phi3skip; m = phi3skip.from_pretrained('tiny-org/tiny-phi3');"
            "print(m.source_dir); torch.save(m(torch.arange(10)[None]), 'out.pt')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "snapshots" in r.stdout and "hf_secret123" not in r.stdout + r.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), ours(torch.arange(10)[None]).detach())
    # A repo that is not in the cache: one line, with the offline hint, and no token echoed.
    code = "from phi3skip.core.cli import run_main; import phi3skip; run_main(lambda: phi3skip.from_pretrained('x/absent'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "local Hugging Face cache" in r.stderr
    assert "hf_secret123" not in r.stderr


# Errors: each names what is wrong -----------------------------------------------------------------------
def test_missing_folder():
    with pytest.raises(CheckpointError, match="no such folder"):
        phi3skip.from_pretrained("./does/not/exist")


def test_config_errors(tmp_path):
    folder, _ = saved(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        phi3skip.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        phi3skip.from_pretrained(folder)
    for mt in ("phi3small", "phimoe", "phi", "gpt2"):
        (folder / "config.json").write_text(json.dumps({"model_type": mt}))
        with pytest.raises(ConfigError, match=f"unsupported model_type '{mt}'"):
            phi3skip.from_pretrained(folder)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Phi3Config(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)


def rewrite(folder: Path, change) -> None:
    sd = load_file(folder / "model.safetensors")
    change(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_tensor_errors(tmp_path):
    folder, _ = saved(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite(folder, lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensors {name}"):
        phi3skip.from_pretrained(folder)
    folder, _ = saved(tmp_path / "b")
    rewrite(folder, lambda sd: sd.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensors model.layers.9.extra.weight"):
        phi3skip.from_pretrained(folder)
    folder, _ = saved(tmp_path / "c")
    rewrite(folder, lambda sd: sd.update({name: torch.zeros(64, 95)}))
    with pytest.raises(CheckpointError, match=r"down_proj.weight has shape \(64, 95\).*\(64, 96\)"):
        phi3skip.from_pretrained(folder)
    folder, _ = saved(tmp_path / "d")
    emb = "model.embed_tokens.weight"
    rewrite(folder, lambda sd: sd.update({emb: sd[emb].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=f"{emb} is int32; weights must be floating point"):
        phi3skip.from_pretrained(folder)


def test_corrupt_and_missing_shards(tmp_path):
    folder, _ = saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        phi3skip.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        phi3skip.from_pretrained(folder)
    _, ours, _ = make_pair("mini-4k")
    sharded = phi3skip.save_pretrained(ours, tmp_path / "sharded", max_shard_size=20_000)
    (sharded / "model-00002-of-00004.safetensors").unlink(missing_ok=False) if (
        sharded / "model-00002-of-00004.safetensors").exists() else next(sharded.glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="points to a missing shard: model-00002-of"):
        phi3skip.from_pretrained(sharded)
    (sharded / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="malformed index"):
        phi3skip.from_pretrained(sharded)


def test_interrupted_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    folder, ours = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(phi3skip.formats.checkpoints, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        phi3skip.save_pretrained(ours, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
