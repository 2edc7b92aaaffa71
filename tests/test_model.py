"""Logit parity with transformers' Phi3ForCausalLM on tiny random models of every Phi-3 variant."""
import math

import pytest
import torch

from phi3skip import KVCache, Phi3Config, Phi3ForCausalLM, validate_skip
from phi3skip.model.skipsets import InvalidSkip

transformers = pytest.importorskip("transformers")

HD = 16


def longrope(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"type": "longrope", "short_factor": (1 + torch.rand(n, generator=g)).tolist(),
            "long_factor": (1 + 8 * torch.rand(n, generator=g)).tolist()}


BASE = dict(model_type="phi3", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32")
VARIANTS = {
    "mini-4k": dict(max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=7),
    "mini-128k-su": dict(max_position_embeddings=256, original_max_position_embeddings=16,
                         rope_scaling={**longrope(8, 0), "type": "su"}, sliding_window=512),
    "medium-gqa": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       original_max_position_embeddings=64, sliding_window=9),
    "phi3.5-longrope": dict(max_position_embeddings=128, original_max_position_embeddings=16,
                            rope_scaling=longrope(8, 1)),
    "phi4-mini": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                      tie_word_embeddings=True, max_position_embeddings=128, original_max_position_embeddings=16,
                      rope_scaling=longrope(6, 2)),
}


def make_pair(variant: str, seed: int = 0):
    d = {**BASE, **VARIANTS[variant]}
    cfg = Phi3Config.from_dict(d)
    torch.manual_seed(seed)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg.to_dict())).eval()
    with torch.no_grad():  # norms are ones at init: randomise them so a wrong norm order shows
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ours = Phi3ForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=not cfg.tie_word_embeddings)
    return hf, ours, cfg


def tokens(T: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant,T", [("mini-4k", 20), ("mini-128k-su", 12), ("mini-128k-su", 40),
                                       ("medium-gqa", 30), ("phi3.5-longrope", 10), ("phi3.5-longrope", 33),
                                       ("phi4-mini", 15), ("phi4-mini", 24)])
@torch.no_grad()
def test_logit_parity(variant, T):
    hf, ours, cfg = make_pair(variant)
    x = tokens(T)
    ref = hf(x).logits
    out = ours(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    if cfg.sliding_window:  # the window really bites: T exceeds it for the 4k-style variants
        assert T > cfg.sliding_window or variant == "mini-128k-su"


def test_longrope_switch_and_attention_factor():
    cfg = Phi3Config.from_dict({**BASE, **VARIANTS["phi3.5-longrope"]})
    assert cfg.attention_factor == pytest.approx(math.sqrt(1 + math.log(8) / math.log(16)))
    model = Phi3ForCausalLM(cfg)
    assert not model.rotary.use_long(15) and model.rotary.use_long(16)
    real = Phi3Config.from_dict({**BASE, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                 "rope_scaling": longrope(8, 0)})
    assert real.attention_factor == pytest.approx(1.19024, abs=1e-5)


@pytest.mark.parametrize("skip", [(), (2,), (3, 1), (0, 1, 2, 3)])
@torch.no_grad()
def test_skip_equals_removed_layers(skip):
    hf, ours, cfg = make_pair("medium-gqa")
    keep = [i for i in range(cfg.num_hidden_layers) if i not in skip]
    hf.model.layers = torch.nn.ModuleList(hf.model.layers[i] for i in keep)
    for j, layer in enumerate(hf.model.layers):
        layer.self_attn.layer_idx = j
    hf.config.num_hidden_layers = len(keep)
    x = tokens(16)
    assert (ours(x, skip=skip) - hf(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("bad", [(4,), (-1,), (1, 1), (1.5,), ("1",), (True,), "12", 3])
def test_invalid_skip(bad):
    with pytest.raises(InvalidSkip, match=r"0\.\.3"):
        validate_skip(bad, 4)
    assert issubclass(InvalidSkip, ValueError)


@pytest.mark.parametrize("variant", ["mini-4k", "phi4-mini"])
@torch.no_grad()
def test_cached_forward_equals_full(variant):
    """Prefill then token-by-token with the static cache equals one full forward (window included)."""
    _, model, cfg = make_pair(variant)
    x = tokens(18)
    full = model(x, skip=(1,))
    long = model.rotary.use_long(17)  # phi4-mini crosses original_max: one factor set for the whole sequence
    cache = KVCache(cfg, batch=2, max_len=32, layers=[0, 2, 3], dtype=torch.float32)
    assert 1 not in cache
    parts = [model(x[:, :10], skip=(1,), cache=cache, input_pos=torch.arange(10), long_rope=long)]
    for t in range(10, 18):
        parts.append(model(x[:, t:t + 1], skip=(1,), cache=cache, input_pos=torch.tensor([t]), long_rope=long))
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_left_padding_with_key_mask():
    """A left-padded row equals the same row alone: padding slots masked, positions shifted."""
    _, model, cfg = make_pair("medium-gqa")
    x = tokens(10, B=1)
    alone = model(x)
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
    key_mask = torch.arange(pad + 10)[None] >= pad
    positions = (torch.arange(pad + 10) - pad).clamp(min=0)[None]
    out = model(padded, key_mask=key_mask, positions=positions)
    assert (out[:, pad:] - alone).abs().max().item() <= 1e-4


def test_sdpa_window_mask_matches_definition():
    from phi3skip.model.model import attention_mask
    s = torch.arange(6)
    m = attention_mask(s, s, 3, None)[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(m[i, j]) == (j <= i and j > i - 3)


def test_bf16_forward_runs_and_is_close():
    _, model, _ = make_pair("phi4-mini")
    x = tokens(8)
    ref = model(x)
    out = model.to(torch.bfloat16)(x).float()
    assert model.rotary.inv_freq_short.dtype == torch.float32  # frequencies are never rounded to bf16
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1
