"""Weight-only quantization (phi3skip.model.quant) and the CPU decode kernels (phi3skip.model.kernels): the codes
against llama.cpp's own q4_0 reader (the gguf package), the kernels against plain torch, quantized models against
fp32 (logits near, greedy tokens equal where the error allows), any skip set per Generator without recompiling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import phi3skip
from phi3skip import Phi3Config, Phi3ForCausalLM, UserError
from phi3skip.formats.checkpoints import save_checkpoint, save_pretrained
from phi3skip.model import bypass, kernels, quant
from phi3skip.serve.generate import Generator

CFG = dict(model_type="phi3", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
           max_position_embeddings=128, original_max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
           pad_token_id=2, torch_dtype="float32")


def tiny(tied: bool = False, seed: int = 0, **kw) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    m = Phi3ForCausalLM(Phi3Config.from_dict({**CFG, "tie_word_embeddings": tied, **kw}))
    m.init_weights(0.05)
    return m.eval()


def saved(tmp_path, m: Phi3ForCausalLM, name: str = "m"):
    return save_checkpoint(m.state_dict(), m.config, tmp_path / name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Codes -------------------------------------------------------------------------------------------------------
def test_int8_codes_per_row():
    w = torch.randn(37, 64) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (37,) and int(q.abs().max()) == 127
    assert ((quant.dequantize("int8", q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()  # round to nearest


def test_int8_zero_row_is_zero():
    w = torch.randn(3, 32)
    w[1] = 0
    q, s = quant.quantize_int8(w)
    assert torch.equal(quant.dequantize("int8", q, s)[1], torch.zeros(32))


def test_int4_layout_is_q4_1_read_by_gguf():
    """Our codes, scales and offsets, written as GGML q4_1 blocks (fp16 scale, fp16 offset, 16 bytes of nibbles),
    decode in the gguf package's own q4_1 reader to our dequantized weight, exactly."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = torch.randn(5, 96) + torch.linspace(-1, 1, 96)  # blocks that are not centred on zero
    q, s, o = quant.quantize_int4(w)
    as_bytes = lambda t: t.numpy().view(np.uint8).reshape(5, 3, 2)  # noqa: E731
    blocks = np.concatenate([as_bytes(s), as_bytes(o), q.numpy().reshape(5, 3, 16)], axis=-1)
    theirs = quants.dequantize(blocks.reshape(5, -1), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(theirs, quant.dequantize("int4", q, s, o).numpy(), rtol=0, atol=1e-6)


def test_int4_refit_and_offset():
    """The least-squares refit (off by default) lowers the range's weight error; the offset serves blocks that are
    not centred, where symmetric codes (q4_0's) waste half their levels."""
    w = torch.randn(64, 256) + 3.0
    err = {n: float((quant.dequantize("int4", *quant.quantize_int4(w, refits=n)) - w).pow(2).sum()) for n in (0, 2)}
    assert err[2] < 0.97 * err[0]
    assert rel(quant.dequantize("int4", *quant.quantize_int4(w)), w) < 0.035
    g = torch.randn(64, 256)
    assert rel(quant.dequantize("int4", *quant.quantize_int4(g)), g) < 0.09  # ~0.075 for Gaussian blocks of 32


def test_int4_constant_block_exact():
    w = torch.full((2, 32), 0.25)
    assert torch.equal(quant.dequantize("int4", *quant.quantize_int4(w)), w)


def test_int4_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiples of 32"):
        quant.quantize_int4(torch.randn(4, 48))


# Kernels against plain torch ---------------------------------------------------------------------------------
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels did not build here")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(1, 32), (7, 96), (130, 576)])  # rows of W not a multiple of 4; odd widths
def test_kernels_equal_torch(rows, N, K):
    g = torch.Generator().manual_seed(N * K + rows)
    x, w = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g)
    torch.testing.assert_close(kernels.linear_f32(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    q, s = quant.quantize_int8(w)
    torch.testing.assert_close(kernels.linear_q8(x, q, s), F.linear(x, quant.dequantize("int8", q, s)),
                               rtol=1e-5, atol=1e-4)
    q4, s4, o4 = quant.quantize_int4(w)
    torch.testing.assert_close(kernels.linear_q4(x, q4, s4, o4), F.linear(x, quant.dequantize("int4", q4, s4, o4)),
                               rtol=1e-5, atol=1e-4)


@needs_kernels
def test_kernels_in_a_compiled_function():
    """The kernels are custom ops: torch.compile keeps them as calls (fullgraph, no graph break)."""
    w = torch.randn(40, 64)
    lin = quant.QuantLinear.from_weight(w, "int8")
    x = torch.randn(1, 64)
    f = torch.compile(lambda x: F.silu(lin(x)), fullgraph=True)
    torch.testing.assert_close(f(x), F.silu(lin(x)))


@pytest.mark.parametrize("mode", quant.MODES)
def test_quant_linear_paths_agree(mode):
    """Few rows (the kernel, where built), many rows (a dequantized product) and bf16 give the same map."""
    w = torch.randn(50, 64)
    lin = quant.QuantLinear.from_weight(w, mode)
    x = torch.randn(20, 64)
    ref = F.linear(x, lin.dequantized())
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin(x[:2]), ref[:2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin(x.bfloat16()).float(), ref, rtol=0.05, atol=0.1)
    assert rel(ref, F.linear(x, w)) < (0.01 if mode == "int8" else 0.12)


def test_quant_linear_refuses_unknown_mode():
    with pytest.raises(ValueError, match="int8, int4"):
        quant.QuantLinear(32, 4, "int3")


# Models --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_load_matches_fp32(tmp_path, tied, mode):
    """from_pretrained(quantize=) quantizes as it reads: every Linear a QuantLinear (a tied embedding reads the
    quantized head), logits near fp32's, int8's greedy choice the same almost everywhere."""
    m = tiny(tied)
    folder = saved(tmp_path, m)
    qm = phi3skip.from_pretrained(folder, dtype=torch.float32, quantize=mode)
    assert qm.quantization == mode
    assert not any(isinstance(x, torch.nn.Linear) for x in qm.modules())
    assert isinstance(qm.model.embed_tokens, quant.QuantEmbedding) == tied
    x = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = m(x), qm(x)
    assert rel(got, ref) < (0.02 if mode == "int8" else 0.3)  # random weights: int4 errors compound
    if mode == "int8":
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert quant.weight_bytes(qm) < (0.35 if mode == "int8" else 0.25) * quant.weight_bytes(m)


def test_quantized_llama_layout_is_fused_then_quantized(tmp_path):
    """A Llama-layout checkpoint (q, k, v and gate, up apart) is fused, then quantized."""
    m = tiny()
    sd = m.state_dict()
    L, H, kv = 4, 64, 32  # 2 kv heads of 16
    for i in range(L):
        p = f"model.layers.{i}."
        q, k, v = sd.pop(p + "self_attn.qkv_proj.weight").split([H, kv, kv])
        sd |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v}
        g, u = sd.pop(p + "mlp.gate_up_proj.weight").chunk(2)
        sd |= {p + "mlp.gate_proj.weight": g, p + "mlp.up_proj.weight": u}
    folder = save_checkpoint(sd, m.config.replace(source_model_type="llama"), tmp_path / "llama")
    cfg = (folder / "config.json").read_text().replace('"model_type": "phi3"', '"model_type": "llama"')
    (folder / "config.json").write_text(cfg)
    qm = phi3skip.from_pretrained(folder, dtype=torch.float32, quantize="int8")
    ref = phi3skip.from_pretrained(saved(tmp_path, m), dtype=torch.float32, quantize="int8")
    x = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(qm(x), ref(x))


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_decoding_any_skip_set(tmp_path, mode):
    """Greedy decoding of the quantized model equals its own forward (cache, kernels, bypasses), for several skip
    sets; int8's tokens equal fp32's on a short prompt."""
    m = tiny()
    bypass.attach(m, [2, 1], rank=8, mlp=32)
    with torch.no_grad():
        for p in m.skip_adapters.parameters():
            p.normal_(0, 0.05)
    folder = m.source_dir = tmp_path / "student"
    save_pretrained(m, folder, extra_json={"skip.json": {"layers": [2, 1]}})
    qm = phi3skip.from_pretrained(folder, dtype=torch.float32, quantize=mode)
    assert isinstance(qm.skip_adapters.bypass["2"].down, quant.QuantLinear)
    ids = torch.randint(3, 101, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    for skip in ((), (2,), (2, 1)):
        toks = Generator(qm, skip).generate([ids], 6).tokens[0]
        seq = list(ids)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(qm(torch.tensor([seq]), skip)[0, -1].argmax()))
        assert toks == seq[len(ids):]
        if mode == "int8":
            assert toks == Generator(m, skip).generate([ids], 6).tokens[0]


def test_per_depth_bypasses_quantized_when_merged(tmp_path):
    m = tiny()
    bypass.attach(m, [2, 1], rank=8, mlp=32, depth_rank=4)
    with torch.no_grad():
        for p in m.skip_adapters.parameters():
            p.normal_(0, 0.05)
    folder = m.source_dir = tmp_path / "student"
    save_pretrained(m, folder, extra_json={"skip.json": {"layers": [2, 1]}})
    qm = phi3skip.from_pretrained(folder, dtype=torch.float32, quantize="int8")
    assert isinstance(qm.skip_adapters.bypass["2"].down, torch.nn.Linear)  # sums made per skip set: kept
    gen = Generator(qm, (2, 1))
    assert all(isinstance(b.down, quant.QuantLinear) for b in gen.bypasses["decode"].values())
    ids = list(range(5, 12))
    assert gen.generate([ids], 5).tokens == Generator(m, (2, 1)).generate([ids], 5).tokens


@needs_kernels
def test_compiled_blocks_serve_every_skip_set_without_recompiling(tmp_path):
    """compile="blocks": a Generator for another skip set reuses the compiled blocks (the skip gates are outside
    them), so changing the set per call compiles nothing new."""
    from torch._dynamo.utils import counters

    qm = phi3skip.from_pretrained(saved(tmp_path, tiny()), dtype=torch.float32, quantize="int8")
    ids = list(range(5, 14))
    eager = {s: Generator(qm, s).generate([ids], 5).tokens for s in ((), (2,), (3, 1))}
    torch._dynamo.reset()
    counters.clear()
    assert Generator(qm, (), compile="blocks").generate([ids], 5).tokens == eager[()]
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1
    for s in ((2,), (3, 1)):
        assert Generator(qm, s, compile="blocks").generate([ids], 5).tokens == eager[s]
    assert counters["stats"]["unique_graphs"] == compiled


def test_fp32_kernels_same_tokens(tmp_path):
    m = tiny(tied=True)
    ids = list(range(5, 14))
    ref = Generator(m, (1,)).generate([ids], 8).tokens
    if not kernels.available():
        with pytest.raises(UserError, match="not built"):
            Generator(m, (1,), kernels=True)
        return
    gen = Generator(m, (1,), kernels=True)
    assert gen.kernels and isinstance(m.lm_head, quant.KernelLinear)
    assert gen.generate([ids], 8).tokens == ref
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied, names unchanged
    assert all(p.is_contiguous() for p in m.parameters())


def test_without_kernels_same_numbers(tmp_path, monkeypatch):
    """PHI3SKIP_KERNELS=0's plain torch path (any machine) computes what the kernels do."""
    qm = phi3skip.from_pretrained(saved(tmp_path, tiny()), dtype=torch.float32, quantize="int4")
    x = torch.randint(0, 101, (1, 1))
    with torch.no_grad():
        a = qm(x)
        monkeypatch.setattr(kernels, "usable", lambda x: False)
        b = qm(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantized_model_is_not_saved(tmp_path):
    qm = phi3skip.from_pretrained(saved(tmp_path, tiny()), dtype=torch.float32, quantize="int8")
    with pytest.raises(UserError, match="quantized"):
        save_pretrained(qm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_quantize_refused(tmp_path):
    with pytest.raises(UserError, match="int8, int4"):
        phi3skip.from_pretrained(saved(tmp_path, tiny()), quantize="fp8")
