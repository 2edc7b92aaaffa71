"""Phi-3 checkpoint -> GGUF (llama.cpp's phi3 architecture), the reverse of gguf.py; a bypassed skip set ->
GGUF of llama.cpp's deci architecture (`write_deci_gguf`, over phi3skip.formats.deci's heterogeneous blocks).

    from phi3skip.formats.gguf_writer import write_gguf
    write_gguf(model.state_dict(), model.config, "model.gguf", tokenizer_dir=folder, outtype="q8_0")

Tensors keep Phi-3's fused layout, which llama.cpp's phi3 architecture reads as it is (attn_qkv, ffn_up = gate then
up, NEOX rotary: no row permutation); names come from the tables in gguf.py. Metadata are the keys llama.cpp reads
for phi3: sliding window, LongRoPE (rope_factors_long/short tensors, original context, attention factor), partial
rotary (rope.dimension_count). The tokenizer is embedded: the source GGUF's own metadata when the checkpoint came
from one (tokenizer.gguf, written by gguf.convert_gguf), else built from tokenizer.json (byte-level BPE -> 'gpt2',
SentencePiece-style BPE with byte fallback -> 'llama'). Needs the optional `gguf` package.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.paths import atomic_output
from ..model.config import Phi3Config
from .deci import check, context_length
from .gguf import (_LLAMA3_SPLIT, BYTE, CONTROL, NORMAL, ROPE_FACTORS, TOKENIZER_GGUF, UNKNOWN, UNUSED, USER_DEFINED,
                   GGUFError, gguf_name, tokenizer_fields)

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# GPT-4o / o200k split (Phi-4-mini's tokenizer), llama.cpp's "gpt-4o" pre-tokenizer.
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _GPT4O_SPLIT: "gpt-4o"}

Field = tuple[str, Any, Any, Any]  # key, value, GGUFValueType, array element type


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("the `gguf` package is needed to write GGUF files: pip install gguf "
                        "(or the project's extra: pip install -e \".[gguf]\")") from None
    return gguf


# Tokenizer --------------------------------------------------------------------------------------------
def tokenizer_metadata(folder: str | os.PathLike, config: Phi3Config) -> list[Field]:
    """The tokenizer.* fields for a GGUF of this checkpoint, padded with unused tokens to the embedding rows."""
    folder = Path(folder)
    if (folder / TOKENIZER_GGUF).is_file():
        fields = _from_gguf(folder / TOKENIZER_GGUF)
    elif (folder / "tokenizer.json").is_file():
        fields = _from_tokenizer_json(folder, config)
    else:
        raise GGUFError(f"{folder}: no tokenizer.json (or {TOKENIZER_GGUF}); llama.cpp needs the tokenizer in the GGUF")
    return _pad(fields, config.vocab_size, folder)


def _from_gguf(path: Path) -> list[Field]:
    gguf = require_gguf()
    try:
        return tokenizer_fields(gguf.GGUFReader(path, "r"))
    except Exception as e:  # truncated or corrupt: the reader raises assorted errors
        raise GGUFError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to use tokenizer.json instead") from None


def _pad(fields: list[Field], vocab_size: int, folder: Path) -> list[Field]:
    """Embedding rows without a token (Phi-3 pads 32011 tokens to 32064 rows) get unused '[PAD{i}]' tokens, as
    llama.cpp's converter writes them: llama.cpp and transformers take the vocabulary size from the token list."""
    by_key = {f[0]: list(f) for f in fields}
    tokens = by_key["tokenizer.ggml.tokens"][1]
    if len(tokens) > vocab_size:
        raise GGUFError(f"{folder}: the tokenizer has {len(tokens)} tokens, the model only {vocab_size} embedding rows")
    extra = range(len(tokens), vocab_size)
    pads = {"tokenizer.ggml.tokens": [f"[PAD{i}]" for i in extra], "tokenizer.ggml.token_type": [UNUSED] * len(extra),
            "tokenizer.ggml.scores": [-1000.0] * len(extra)}
    for key, more in pads.items():
        if key in by_key and more:
            by_key[key][1] = list(by_key[key][1]) + more
    return [tuple(f) for f in by_key.values()]


def _nodes(node: Any, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder and the members of its Sequences, flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [n for child in node.get(key, []) for n in _nodes(child, key)]
    return [node]


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _from_tokenizer_json(folder: Path, config: Phi3Config) -> list[Field]:
    """llama.cpp's tokenizer metadata from a Hugging Face tokenizer.json (+ tokenizer_config.json)."""
    from gguf import GGUFValueType as T

    path = folder / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        tc_path = folder / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise GGUFError(f"{folder}: cannot read the tokenizer files ({e})") from None
    model = tj.get("model") or {}
    pre = _nodes(tj.get("pre_tokenizer"), "pretokenizers")
    norm = _nodes(tj.get("normalizer"), "normalizers")
    dec = _nodes(tj.get("decoder"), "decoders")
    byte_level = any(n.get("type") == "ByteLevel" for n in pre + dec)
    spm = model.get("byte_fallback") or any(n.get("type") == "Metaspace" for n in pre + dec)
    if model.get("type") != "BPE" or not (byte_level or spm):
        kind = model.get("type") if model.get("type") != "BPE" else "BPE that is neither byte-level nor SentencePiece"
        raise GGUFError(f"{path}: a {kind} has no llama.cpp form here (byte-level BPE and SentencePiece-style BPE "
                        "with byte fallback do)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    added = {t["id"]: t for t in tj.get("added_tokens") or []}
    size = max([*vocab.values(), *added, -1]) + 1
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    for i, t in added.items():
        tokens[i] = t["content"]
    unk = model.get("unk_token")
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            types.append(UNUSED)
        elif spm and text == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    fields: list[Field] = [("tokenizer.ggml.model", "gpt2" if byte_level else "llama", T.STRING, None)]
    if byte_level:
        fields.append(("tokenizer.ggml.pre", _pre_name(pre, path), T.STRING, None))
    else:
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest: a piece scores minus the
        # rank of the first merge that makes it, which reproduces the BPE merge order.
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), r)
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
        prefix = any(n.get("type") == "Prepend" for n in norm) or any(
            n.get("type") == "Metaspace" and (n.get("prepend_scheme") in ("first", "always") or n.get("add_prefix_space"))
            for n in pre)
        fields += [("tokenizer.ggml.scores", scores, T.ARRAY, T.FLOAT32),
                   ("tokenizer.ggml.add_space_prefix", bool(prefix), T.BOOL, None)]
    fields += [("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
               ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32)]
    if merges:
        fields.append(("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING))
    ids = {text: i for i, text in enumerate(tokens)}
    special = {"bos": config.bos_token_id, "eos": config.eos_token_ids[0] if config.eos_token_ids else None,
               "unk": ids.get(unk) if unk else None, "padding": config.pad_token_id}
    for name, tc_key in (("bos", "bos_token"), ("eos", "eos_token"), ("unk", "unk_token"), ("padding", "pad_token")):
        if special[name] is None:
            special[name] = ids.get(_token_text(tc.get(tc_key)))
        if special[name] is not None:
            fields.append((f"tokenizer.ggml.{name}_token_id", int(special[name]), T.UINT32, None))
    # BOS/EOS added around the text: tokenizer_config.json says so, else the post-processor's template does.
    post = next((n.get("single") or [] for n in _nodes(tj.get("post_processor"), "processors")
                 if n.get("type") == "TemplateProcessing"), [])
    marks = ["A" if "Sequence" in item else "S" for item in post]
    text_at = marks.index("A") if "A" in marks else len(marks)
    add_bos = tc.get("add_bos_token", "S" in marks[:text_at])
    add_eos = tc.get("add_eos_token", "S" in marks[text_at + 1:])
    fields += [("tokenizer.ggml.add_bos_token", bool(add_bos), T.BOOL, None),
               ("tokenizer.ggml.add_eos_token", bool(add_eos), T.BOOL, None)]
    template = tc.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        fields.append(("tokenizer.chat_template", template, T.STRING, None))
    return fields


def _pre_name(pre: list[dict], path: Path) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level tokenizer.json's pre-tokenizer."""
    kinds = [n.get("type") for n in pre]
    splits = [(n.get("pattern") or {}).get("Regex") for n in pre if n.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in _SPLIT_PRE and kinds[-1] == "ByteLevel":
        return _SPLIT_PRE[splits[0]]
    if kinds == ["Digits", "ByteLevel"] and pre[0].get("individual_digits") and pre[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after every digit alone (SmolLM2, StarCoder)
    if kinds == ["ByteLevel"] and pre[0].get("use_regex", True):
        return "gpt-2"
    raise GGUFError(f"{path}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one this writer can "
                    "name for llama.cpp (GPT-2, SmolLM2, Llama-3, GPT-4o splits); convert that model with llama.cpp's "
                    "convert_hf_to_gguf.py")


# Model ------------------------------------------------------------------------------------------------
def check_config(config: Phi3Config) -> None:
    if config.hd * config.num_attention_heads != config.hidden_size:
        raise GGUFError(f"head_dim {config.hd} x {config.num_attention_heads} heads != hidden_size "
                        f"{config.hidden_size}: llama.cpp's phi3 architecture cannot hold it")


def _qtype(outtype: str, shape: tuple[int, ...]):
    """The GGML type of one tensor: 1-D tensors (norms, rope factors) stay F32, as llama.cpp's converter keeps them;
    a row that is not a whole number of Q8_0 blocks falls back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[outtype]
    return kind if shape[-1] % GGML_QUANT_SIZES[kind][0] == 0 else Q.F16


def _encode(name: str, t: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q, quants

    t = t.detach().to("cpu")
    if qtype == Q.F32:
        return t.float().numpy()
    if qtype == Q.BF16:  # torch rounds to nearest even, as ggml does
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    if qtype == Q.F16:
        big = t.abs().max().item() if t.numel() else 0.0
        if big > 65504:
            raise GGUFError(f"tensor {name} holds {big:.4g}, beyond float16's range: use --outtype bf16, f32 or q8_0")
        return t.to(torch.float16).numpy()
    return quants.quantize(t.float().numpy(), qtype)


def _plan(state_dict: Mapping[str, torch.Tensor], config: Phi3Config) -> list[tuple[str, str, torch.Tensor]]:
    """(GGUF name, Phi-3 name, tensor) in writing order: rope factors, embeddings, blocks, final norm, output."""
    out = []
    rs = config.rope_scaling
    if rs is not None:
        for kind, factors in (("long", rs.long_factor), ("short", rs.short_factor)):
            out.append((ROPE_FACTORS[kind], f"rope_scaling.{kind}_factor", torch.tensor(factors, dtype=torch.float32)))
    for name, t in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        out.append((gguf_name(name), name, t))
    return out


def _blocks(w: Any, config: Phi3Config, *, context: int, blocks: int, ffn: int | list[int], heads: int | list[int],
            kv_heads: int | list[int]) -> None:
    """The hyperparameters every architecture here has; per-block lists where blocks differ (deci)."""
    w.add_context_length(context)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(blocks)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_rope_freq_base(config.rope_theta)


def _hparams(w: Any, config: Phi3Config) -> None:
    _blocks(w, config, context=config.max_position_embeddings, blocks=config.num_hidden_layers,
            ffn=config.intermediate_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads)
    w.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    w.add_sliding_window(config.sliding_window or 0)  # 0: none (llama.cpp currently runs phi3 without it anyway)
    if config.rope_scaling is not None:
        w.add_rope_scaling_attn_factors(config.attention_factor)


def write_gguf(state_dict: Mapping[str, torch.Tensor], config: Phi3Config, path: str | os.PathLike, *,
               tokenizer_dir: str | os.PathLike, outtype: str = "f32", name: str | None = None,
               overwrite: bool = False) -> Path:
    """Write a Phi-3 state dict as a phi3-architecture GGUF with its tokenizer embedded; returns the path.

    outtype: f32, f16, bf16, q8_0, q4_0 or q4_1 (2-D weights; norms and rope factors stay F32). The file is written under a
    temporary name and renamed into place; an existing file is an error unless overwrite=True.
    """
    check_config(config)
    return _write(path, "phi3", lambda w: _hparams(w, config), _plan(state_dict, config),
                  tokenizer_metadata(tokenizer_dir, config), outtype, name, overwrite)


def write_deci_gguf(state_dict: Mapping[str, torch.Tensor], config: Phi3Config, slots: Sequence[Any],
                    path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike, outtype: str = "f32",
                    name: str | None = None, overwrite: bool = False) -> Path:
    """Write a heterogeneous-block model (phi3skip.formats.deci.export_state's state dict and slots) as a GGUF of
    llama.cpp's deci architecture: per-block head counts (0 KV heads: linear attention; 0 heads: attention dropped)
    and FFN lengths (the student's own, unpadded: llama.cpp reads them as they are), Q/K rows
    permuted for its interleaved RoPE as llama.cpp's own converter does. Same outtypes and rules as write_gguf."""

    check(config)
    check_config(config)
    nH, nKV = config.num_attention_heads, config.num_key_value_heads
    attention = [s.attention for s in slots]
    state_dict = dict(state_dict)
    if attention and attention[0] == "no_op":
        # llama.cpp reads the head size only when the first block has heads: block 0 without attention becomes a
        # linear attention whose map is zero (adds exactly nothing), one H x H product more per token
        like = state_dict["model.norm.weight"]
        state_dict["model.layers.0.input_layernorm.weight"] = torch.ones_like(like)
        state_dict["model.layers.0.self_attn.linear_attn.weight"] = like.new_zeros(config.hidden_size, config.hidden_size)
        attention[0] = "linear"
    plan = []
    for hf, t in state_dict.items():
        if hf.endswith("self_attn.q_proj.weight"):
            t = _permute(t, nH)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = _permute(t, nKV)
        plan.append((_deci_name(hf), hf, t))

    def hparams(w: Any) -> None:  # llama.cpp's deci: 0 KV heads, a linear attention; 0 heads, no attention
        _blocks(w, config, context=context_length(config), blocks=len(slots), ffn=[s.ffn for s in slots],
                heads=[0 if a == "no_op" else nH for a in attention], kv_heads=[nKV if a == "gqa" else 0 for a in attention])
        w.add_key_length(config.hd)
        w.add_value_length(config.hd)
        w.add_vocab_size(config.vocab_size)

    return _write(path, "deci", hparams, plan, tokenizer_metadata(tokenizer_dir, config), outtype, name, overwrite)


_DECI_LEAVES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                "self_attn.o_proj.weight": "attn_output.weight", "self_attn.linear_attn.weight": "attn_output.weight",
                "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_DECI_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def _deci_name(name: str) -> str:
    if name.startswith("model.layers."):
        i, leaf = name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{i}.{_DECI_LEAVES[leaf]}"
    return _DECI_GLOBALS[name]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q/K rows from rotate-half (Hugging Face, Phi-3) to llama.cpp's interleaved RoPE order: its converter's
    `permute` (gguf._unpermute is the inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp gives these tokens Phi-3's strip attributes when general.name contains "phi3" or "phi-3", and fails to
# load ("error loading model vocabulary: unordered_map::at") when one is missing from the vocabulary.
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _safe_name(name: str, fields: list[Field]) -> str:
    """The model's name, kept from matching llama.cpp's Phi-3 name rule unless the vocabulary has its tokens."""
    tokens = set(next((f[1] for f in fields if f[0] == "tokenizer.ggml.tokens"), ()))
    if all(t in tokens for t in _PHI3_NAMED_TOKENS):
        return name
    return re.sub(r"(?i)phi(-?)3", lambda m: f"phi{m.group(1)} 3", name)


def _write(path: str | os.PathLike, arch: str, hparams: Callable[[Any], None],
           tensors: list[tuple[str, str, torch.Tensor]], fields: list[Field], outtype: str, name: str | None,
           overwrite: bool) -> Path:
    """The GGUF file itself: metadata, the tokenizer, then each tensor; through a temporary sibling and a rename."""
    gguf = require_gguf()
    path = Path(path).expanduser()
    if outtype not in OUTTYPES:
        raise GGUFError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    if path.exists() and (path.is_dir() or not overwrite):
        raise GGUFError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it"
                        if not path.is_dir() else f"{path}: is a folder, expected a .gguf file name")
    plan = [(gg, hf, t, _qtype(outtype, tuple(t.shape))) for gg, hf, t in tensors]
    with atomic_output(path) as tmp:  # a writer killed with -9 leaves what the next one cleans
        w = gguf.GGUFWriter(tmp, arch)
        if name:
            w.add_name(_safe_name(name, fields))
        hparams(w)
        ft = gguf.LlamaFileType
        w.add_file_type({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0,
                        "q4_0": ft.MOSTLY_Q4_0, "q4_1": ft.MOSTLY_Q4_1}[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype, sub in fields:
            w.add_key_value(key, value, vtype, sub)
        for gg, _, t, qtype in plan:  # sizes first: the data is then written one tensor at a time
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(gg, tuple(t.shape), np.dtype(np.float32), t.numel() // block * size, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gg, hf, t, qtype in plan:
            w.write_tensor_data(_encode(hf, t, qtype))
        w.close()
    return path


__all__ = ["write_gguf", "write_deci_gguf", "tokenizer_metadata", "check_config", "require_gguf", "OUTTYPES"]
