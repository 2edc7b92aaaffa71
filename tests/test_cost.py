"""The per-token decode cost model (phi3skip.model.cost) against figures worked by hand on a tiny config, and against
the parameters a built model really has."""
from fractions import Fraction

import pytest
import torch

from phi3skip.model import bypass
from phi3skip import Phi3Config, Phi3ForCausalLM
from phi3skip.model.cost import BypassShape, attended_keys, cost_fraction, model_cost, token_cost

# H 32, MLP 64, 4 layers, 4 query heads of 8, 2 KV heads, vocabulary 64.
CFG = dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           original_max_position_embeddings=64, torch_dtype="float32")
# By hand: a block's weights qkv (4 + 2*2)*8*32 = 2048 + o 4*8*32 = 1024 + MLP 3*32*64 = 6144 = 9216, its norms
# 2*32; the lm_head 64*32 = 2048; the final norm 32. At 16 tokens of context a block's attention is 2*4*8*16 =
# 1024 multiply-adds and its KV cache 2*2*8*16 = 512 values.
BLOCK, BLOCK_NORMS, HEAD, FINAL_NORM, ATTN16, KV16 = 9216, 64, 2048, 32, 1024, 512


def cfg(**kw) -> Phi3Config:
    return Phi3Config.from_dict({**CFG, **kw})


def test_full_model_by_hand():
    c = token_cost(cfg(), context=16, dtype_bytes=2)
    assert c.weight_macs == 4 * BLOCK + HEAD == 38912
    assert c.attention_macs == 4 * ATTN16 == 4096
    assert c.weight_bytes == 2 * (4 * (BLOCK + BLOCK_NORMS) + HEAD + FINAL_NORM) == 78400
    assert c.kv_bytes == 2 * 4 * KV16 == 4096
    assert (c.macs, c.bytes) == (43008, 82496)


def test_plain_skip_and_bypass_by_hand():
    shape = BypassShape(rank=4, mlp=8, layers=frozenset({1}))  # (2*4 + 3*8)*32 = 1024 weights, norms 2*32
    plain = token_cost(cfg(), (1, 3), None, context=16)
    assert plain.macs == 2 * BLOCK + HEAD + 2 * ATTN16
    assert plain.bytes == 2 * (2 * (BLOCK + BLOCK_NORMS) + HEAD + FINAL_NORM + 2 * KV16)
    # layer 1 runs its bypass (no attention, no KV cache), layer 3 has none: nothing runs there
    c = token_cost(cfg(), (1, 3), shape, context=16)
    assert c.macs == 2 * BLOCK + 1024 + HEAD + 2 * ATTN16 == 23552
    assert c.bytes == 2 * (2 * (BLOCK + BLOCK_NORMS) + 1024 + 64 + HEAD + FINAL_NORM + 2 * KV16) == 45504
    f = cost_fraction(cfg(), (1, 3), shape, context=16)
    assert f.macs == Fraction(23552, 43008) == Fraction(23, 42)
    assert f.bytes == Fraction(45504, 82496)
    assert token_cost(cfg(), (), shape, context=16) == token_cost(cfg(), context=16)  # no skip: no bypass runs


def test_attention_only_skip_drops_attention_and_its_cache_only():
    shape = BypassShape(rank=4, mlp=64, layers=frozenset({2}))  # the whole MLP (64 = intermediate) + a rank-4 map
    full, c = token_cost(cfg(), context=16), token_cost(cfg(), (2,), shape, context=16)
    assert full.macs - c.macs == (2048 + 1024) - 2 * 4 * 32 + ATTN16  # q/k/v/o and attention out, the map in
    assert full.bytes - c.bytes == 2 * ((2048 + 1024) - 2 * 4 * 32 + KV16)  # the norms stay: two either way


def test_context_window_and_dtypes():
    assert attended_keys(cfg(), 16) == 16 and attended_keys(cfg(sliding_window=8), 16) == 8
    assert token_cost(cfg(sliding_window=8), context=16) == token_cost(cfg(), context=8)
    q8 = token_cost(cfg(), context=16, dtype_bytes=Fraction(34, 32), kv_dtype_bytes=2)  # q8_0 weights, f16 cache
    assert q8.weight_bytes == Fraction(34, 32) * 39200 and q8.kv_bytes == 4096
    # one dtype for both: the bytes fraction does not depend on which
    assert cost_fraction(cfg(), (1,), context=16, dtype_bytes=4) == cost_fraction(cfg(), (1,), context=16)
    with pytest.raises(ValueError, match="context"):
        token_cost(cfg(), context=0)


def test_bypass_shape_from_skip_json():
    assert BypassShape.from_description(None) is None
    d = {"file": "skip_adapters.safetensors", "kind": "bypass", "rank": 64, "mlp": 128, "form": "sequential",
         "layers": [14, 13]}
    assert BypassShape.from_description(d) == BypassShape(64, 128, frozenset({13, 14}))
    with pytest.raises(ValueError, match="kind"):
        BypassShape.from_description({**d, "kind": "lora"})


@pytest.mark.parametrize("tied", [False, True])
def test_model_cost_counts_exactly_the_parameters_a_step_reads(tied):
    """The arithmetic against a built model: every running block's parameters, the bypasses of skipped slots, the
    final norm and the lm_head (the embedding only as the tied lm_head); and the config's parameter count."""
    c = cfg(tie_word_embeddings=tied)
    model = Phi3ForCausalLM(c)
    bypass.attach(model, [1, 2], rank=4, mlp=8)
    skip = (1, 3)
    read = [*(p for i, b in enumerate(model.model.layers) if i not in skip for p in b.parameters()),
            *model.skip_adapters.bypass["1"].parameters(), model.model.norm.weight, model.lm_head.weight]
    assert model_cost(model, skip).weight_bytes == sum(p.numel() * 4 for p in read)
    embedding = 0 if tied else c.vocab_size * c.hidden_size  # a row lookup: not read whole
    assert token_cost(c, dtype_bytes=1).weight_bytes == c.num_params() - embedding
    assert model_cost(model.to(torch.bfloat16), ()).weight_bytes == 2 * (c.num_params() - embedding)
