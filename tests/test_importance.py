"""Layer importance: an exact identity block ranks least important, by both measures."""
import pytest
import torch

from phi3skip.eval.importance import block_influence, format_table, rank_layers, recommended_order
from test_model import make_pair, tokens


@torch.no_grad()
def test_identity_layer_ranks_least_important():
    _, model, cfg = make_pair("medium-gqa")
    ident = 2
    model.model.layers[ident].self_attn.o_proj.weight.zero_()  # block output = its input
    model.model.layers[ident].mlp.down_proj.weight.zero_()
    x = tokens(33, B=3)
    batches = [(x[:, :-1], x[:, 1:])]
    full, ranking = rank_layers(model, batches)
    assert ranking[0].layer == ident
    assert abs(ranking[0].ppl_increase) < 1e-6 and ranking[0].block_influence < 1e-6 and ranking[0].kl < 1e-7
    assert all(r.kl > 1e-6 and r.block_influence > 1e-3 for r in ranking[1:])
    assert recommended_order(ranking, 2)[0] == ident and len(recommended_order(ranking)) == cfg.num_hidden_layers
    assert "| 1 | 2 |" in format_table(full, ranking)


@torch.no_grad()
def test_block_influence_matches_direct_computation():
    _, model, _ = make_pair("mini-4k")
    x = tokens(12)
    bi = block_influence(model, [(x, None)])
    # direct: run the blocks by hand
    cos, sin = model.rotary(torch.arange(12), torch.float32, False)
    h = model.model.embed_tokens(x)
    for i, block in enumerate(model.model.layers):
        out = block(h, cos, sin, torch.arange(12))
        want = (1 - torch.nn.functional.cosine_similarity(h, out, dim=-1)).mean().item()
        assert abs(bi[i] - want) < 1e-5
        h = out


@pytest.mark.integration
def test_rank_layers_cli(tiny_run, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root, model = tiny_run
    script = Path(__file__).resolve().parents[1] / "scripts" / "rank_layers.py"
    out = tmp_path / "rank.json"
    r = subprocess.run([sys.executable, str(script), "--model", str(root / "model"), "--data", str(root / "data"),
                        "--seq-len", "32", "--max-tokens", "256", "--num-skip", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert len(res["ranking"]) == 4 and len(res["recommended"]) == 2
    kls = [x["kl"] for x in res["ranking"]]
    assert kls == sorted(kls) and res["recommended"] == [x["layer"] for x in res["ranking"][:2]]
    assert f"--layers {','.join(map(str, res['recommended']))}" in r.stdout
    g = subprocess.run([sys.executable, str(script), "--model", str(root / "model"), "--data", str(root / "data"),
                        "--seq-len", "32", "--max-tokens", "256", "--greedy", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr
    res = json.loads(out.read_text())
    assert len(res["greedy"]) == 2 and res["recommended"] == [x["layer"] for x in res["greedy"]]
    assert res["greedy"][0]["kl"] <= res["greedy"][1]["kl"] and "| 2 |" in g.stdout
    bad = subprocess.run([sys.executable, str(script), "--model", str(root / "model"), "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
