"""Bypassed skip sets in NVIDIA's Nemotron-NAS layout (phi3skip.formats.deci), read by readers we did not write:
llama.cpp's own converter (its GGUF then run by llama.cpp) and mlx-lm, against phi3skip's logits for the same skip
set. Both kinds of bypassed slot: a linear map + narrow FFN (`replace_with_linear`), and attention dropped with the
block's FFN kept (`no_op` attention). The readers' own limits are accommodated in tests/readers.py, nowhere else."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import phi3skip  # noqa: E402
from phi3skip.formats import deci  # noqa: E402
from phi3skip.formats.export import export  # noqa: E402
from readers import convert_with_llama_cpp, mlx_logits  # noqa: E402
from test_export_gguf import VARIANTS, tokenizers  # noqa: E402,F401  (tokenizers: a fixture)
from test_llama_cpp import NO_DECI, inputs, length, ours, with_bypasses  # noqa: E402

DECI_VARIANTS = sorted(v for v in VARIANTS if v not in NO_DECI)
KINDS = {"linear": dict(rank=8, mlp=16), "no_op": dict(rank=0, mlp=96)}  # mlp 96: the tiny models' whole FFN


# The sets exported: bypasses on 2 and 0; an attention-dropped 2 beside a removed 1 (llama.cpp loads a deci model
# only when its first block has attention heads: it reads the head size from that block)
SKIPS = {"linear": "2,0", "no_op": "2,1"}


def bypassed_export(tmp_path: Path, tokenizers, variant: str, kind: str):
    """A random student of `variant` with bypasses of `kind` on layers 2 and 0, exported as a folder."""
    folder, model = with_bypasses(tmp_path, variant, tokenizers["bpe"], **KINDS[kind])
    res = export(folder, skip=SKIPS[kind], out=tmp_path / f"nas-{variant}-{kind}", warn=lambda m: None)
    assert {s.attention for s in res.slots if s.bypass} == {kind}
    return res, model


def test_the_folder_is_nvidias_layout(tmp_path, tokenizers):
    """block_configs as NVIDIA writes them: attention by n_heads_in_group / replace_with_linear / no_op, each FFN by
    `ffn_mult`, whose reading (int(2 m H / 3) rounded up to 256) is the width of the FFN tensors, zero-padded."""
    from safetensors.torch import load_file

    res, model = bypassed_export(tmp_path, tokenizers, "medium-gqa", "linear")
    cfg = json.loads((res.folder / "config.json").read_text())
    H = cfg["hidden_size"]
    sd = load_file(res.folder / "model.safetensors")
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    for n, (block, slot) in enumerate(zip(cfg["block_configs"], res.slots)):
        assert set(block["ffn"]) == {"no_op", "replace_with_linear", "ffn_mult"}
        width = -(-int(2 * block["ffn"]["ffn_mult"] * H / 3) // 256) * 256
        assert sd[f"model.layers.{n}.mlp.gate_proj.weight"].shape[0] == width == deci.padded(slot.ffn)
        assert sd[f"model.layers.{n}.mlp.down_proj.weight"].shape[1] == width
        assert not sd[f"model.layers.{n}.mlp.down_proj.weight"][:, slot.ffn:].any()  # the padding adds nothing
        a = block["attention"]
        if slot.attention == "gqa":
            assert (a["n_heads_in_group"], a["replace_with_linear"], a["no_op"]) == (2, False, False)
        else:
            assert (a["n_heads_in_group"], a["replace_with_linear"], a["no_op"]) == (None, True, False)
            assert f"model.layers.{n}.self_attn.linear_attn.weight" in sd  # NVIDIA's name
    card = (res.folder / "README.md").read_text()
    assert "zero-padded" in card and "llama.cpp" in card and "not vLLM" in card
    dropped, _ = bypassed_export(tmp_path, tokenizers, "medium-gqa", "no_op")
    cfg = json.loads((dropped.folder / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in cfg["block_configs"]] == [s.attention == "no_op" for s in dropped.slots]
    card = (dropped.folder / "README.md").read_text()
    assert "vLLM, SGLang and TensorRT-LLM" in card and "attention dropped" in card


@pytest.mark.parametrize("ffn,hidden", [(1536, 576), (128, 576), (32, 576), (8192, 3072), (96, 64), (17920, 5120),
                                        (300, 640), (2816, 1024)])
def test_ffn_mult_reads_back_as_the_padded_width(ffn, hidden):
    m = deci.ffn_mult(ffn, hidden)
    for reading in (m, round(m, 6)):  # mlx-lm rounds it to 6 decimals first
        assert deci.padded(int(2 * reading * hidden / 3)) == deci.padded(ffn) >= ffn


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("variant", DECI_VARIANTS)
def test_llama_cpp_converter_computes_the_student(tmp_path, tokenizers, variant, kind):
    """llama.cpp's own convert_hf_to_gguf.py turns the folder into a GGUF whose logits in llama.cpp are phi3skip's
    for the skip set (f32)."""
    from phi3skip.eval import llamacpp

    res, model = bypassed_export(tmp_path, tokenizers, variant, kind)
    gguf = convert_with_llama_cpp(res.folder, tmp_path / "converted.gguf")
    x = inputs(model.config, length(model.config))
    got = llamacpp.logits(gguf, x[0].tolist())
    assert np.abs(got - ours(model, x, res.skip)).max() <= 2e-4


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("variant", ["medium-gqa", "gqa-tied"])
def test_mlx_lm_computes_the_student(tmp_path, tokenizers, variant, kind):
    """mlx-lm (its CPU build) loads the folder as nemotron-nas and computes phi3skip's logits for the skip set."""
    res, model = bypassed_export(tmp_path, tokenizers, variant, kind)
    x = inputs(model.config, length(model.config))
    got = mlx_logits(res.folder, x[0].tolist(), tmp_path)
    assert np.abs(got - ours(model, x, res.skip)).max() <= 2e-4


def test_attention_dropped_gguf_runs_in_llama_cpp(tmp_path, tokenizers):
    """Our own deci GGUF of an attention-dropped set: 0 heads in those blocks (llama.cpp's attention-free layer), the
    FFN unpadded; llama.cpp's logits are phi3skip's. llama.cpp reads the head size only when the first block has
    heads, so a first block without attention is written as a zero linear attention (the same function)."""
    gguf = pytest.importorskip("gguf")
    from phi3skip.eval import llamacpp

    folder, model = with_bypasses(tmp_path, "gqa-tied", tokenizers["bpe"], **KINDS["no_op"])
    res = export(folder, skip="2,0", gguf=tmp_path / "m.gguf", warn=lambda m: None)
    r = gguf.GGUFReader(res.gguf)
    assert list(r.fields["deci.attention.head_count"].contents()) == [4, 4, 0, 4]
    assert list(r.fields["deci.attention.head_count_kv"].contents()) == [0, 2, 0, 2]
    assert list(r.fields["deci.feed_forward_length"].contents()) == [96, 96, 96, 96]
    x = inputs(model.config, length(model.config))
    assert np.abs(llamacpp.logits(res.gguf, x[0].tolist()) - ours(model, x, (2, 0))).max() <= 2e-4


@pytest.mark.integration
def test_smollm2_student_folder_in_other_readers(smollm2_dir, tmp_path):
    """The real model with least-squares bypasses on the demo's layers, exported as a folder: llama.cpp's own
    converter makes a GGUF that scores it as phi3skip does (f32, within 0.5%), and mlx-lm computes its logits."""
    from phi3skip.data.tokenizer import load_tokenizer
    from phi3skip.data.tokens import eval_batches
    from phi3skip.eval import llamacpp
    from phi3skip.eval.evaluate import perplexity_ci
    from phi3skip.model import bypass
    from phi3skip.train import bypass_init

    model = phi3skip.from_pretrained(smollm2_dir, dtype=torch.float32)
    layers = [14, 13, 17, 25]
    tok = load_tokenizer(str(smollm2_dir))
    ids = np.asarray(tok.encode(Path(deci.__file__).read_text() + Path(bypass.__file__).read_text()).ids, np.int64)
    bypass.attach(model, layers)
    bypass_init.fit_lstsq(model, [torch.from_numpy(ids[:2048]).view(8, 256)], layers)
    phi3skip.save_pretrained(model, tmp_path / "student", extra_json={"skip.json": {"layers": layers}})
    res = export(tmp_path / "student", skip="first:4", out=tmp_path / "skipset", warn=lambda m: None)
    windows = list(eval_batches(ids[2048:2048 + 1024], 4, 256, max_tokens=1024))
    mine = perplexity_ci(model, windows, layers).ppl
    gguf = convert_with_llama_cpp(res.folder, tmp_path / "converted.gguf")
    theirs = llamacpp.perplexity(gguf, [w for x, y in windows for w in torch.cat([x, y[:, -1:]], 1).tolist()])
    assert abs(theirs / mine - 1) <= 0.005, (theirs, mine)
    x = torch.from_numpy(ids[3100:3164])[None]
    assert np.abs(mlx_logits(res.folder, x[0].tolist(), tmp_path) - ours(model, x, layers)).max() <= 1e-3
