"""The Phi-3 configuration: parsed from a Hub config.json (Phi-3, or Llama/Mistral layouts), written back."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.cli import UserError

SUPPORTED = ("phi3", "llama", "mistral")
# Phi-family models whose layout is not Phi-3's: say so instead of failing on a missing tensor later.
KNOWN_OTHERS = ("phi3small", "phimoe", "phi", "phi3v", "phi4mm", "phi4_multimodal", "phi4flash")


class ConfigError(UserError):
    """config.json missing, malformed, or for a model this project does not support."""


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE ("su"/"longrope"/"yarn" in Phi-3 configs): per-frequency short and long factors."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    factor: float | None = None
    attention_factor: float | None = None
    type: str = "longrope"  # "su" and "yarn" are old names for it, written back as "longrope"


# The largest size a config may give: 10x beyond any Phi-3 or Llama released (a config of 10**12 layers spent minutes
# and gigabytes building its modules before failing); a checkpoint past them is damaged, not large.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**17, "intermediate_size": 2**20, "num_hidden_layers": 2**12,
               "num_attention_heads": 2**12, "num_key_value_heads": 2**12, "max_position_embeddings": 2**24}


@dataclass(frozen=True)
class Phi3Config:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    torch_dtype: str | None = "bfloat16"
    source_model_type: str = "phi3"  # "llama"/"mistral": separate q/k/v and gate/up tensors on disk
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown keys, written back as they were

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.hd * self.partial_rotary_factor)

    @property
    def attention_factor(self) -> float:
        """LongRoPE's cos/sin multiplier (1 for plain RoPE), exactly as transformers computes it."""
        rs = self.rope_scaling
        if rs is None:
            return 1.0
        if rs.attention_factor is not None:
            return rs.attention_factor
        s = rs.factor if rs.factor is not None else self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def num_params(self) -> int:
        H, I, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.hd * H
        block = qkv + self.num_attention_heads * self.hd * H + 3 * H * I + 2 * H
        return V * H * (1 if self.tie_word_embeddings else 2) + L * block + H

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"invalid config: {msg}")

        for name, most in SIZE_LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= most:
                bad(f"{name} must be a positive integer, at most {most:,}, got {v!r}")
        for name in ("head_dim", "sliding_window", "original_max_position_embeddings"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 2**24):
                bad(f"{name} must be a positive integer, at most {2**24:,}, got {v!r}")
        for name in ("rope_theta", "rms_norm_eps", "partial_rotary_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                bad(f"{name} must be a positive finite number, got {v!r}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in
                   (v if isinstance(v, list) else [] if v is None else [v])):
                bad(f"{name} must be a token id (or, for eos_token_id, a list of them), got {v!r}")
        if self.num_key_value_heads > self.num_attention_heads:
            bad(f"num_key_value_heads ({self.num_key_value_heads}) must be at most num_attention_heads "
                f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            bad(f"partial_rotary_factor {self.partial_rotary_factor} gives an odd or empty rotary dimension")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad(f"sliding_window must be positive, got {self.sliding_window}")
        rs = self.rope_scaling
        if rs is not None:
            for name in ("short_factor", "long_factor"):
                if len(getattr(rs, name)) != self.rotary_dim // 2:
                    bad(f"rope_scaling.{name} has {len(getattr(rs, name))} entries, expected rotary_dim/2 = "
                        f"{self.rotary_dim // 2}")

    # Parsing ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "Phi3Config":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            hint = " (a different architecture from Phi-3)" if mt in KNOWN_OTHERS else ""
            raise ConfigError(f"{source}: unsupported model_type {mt!r}{hint}; supported: {', '.join(SUPPORTED)}")
        d = dict(d)
        # transformers >= 5 nests rope settings in rope_parameters; Hub configs use the flat form.
        rp = d.pop("rope_parameters", None) or {}
        theta = d.pop("rope_theta", rp.get("rope_theta", 10000.0))
        partial = d.pop("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))
        scaling = d.pop("rope_scaling", None)
        if scaling is None and rp.get("rope_type", rp.get("type", "default")) != "default":
            scaling = rp
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta", "partial_rotary_factor",
                                                               "source_model_type", "extra"}
        kw = {k: d.pop(k) for k in list(d) if k in known}
        if "num_key_value_heads" not in kw or kw["num_key_value_heads"] is None:
            kw["num_key_value_heads"] = kw.get("num_attention_heads", 32)
        if kw.get("torch_dtype") is None:
            kw["torch_dtype"] = d.pop("dtype", None)
        d.pop("dtype", None)
        act = d.pop("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Phi-3 uses silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if d.pop(flag, False):
                raise ConfigError(f"{source}: {flag}=true is not supported (Phi-3 layers have no biases)")
        if mt != "phi3":
            kw.pop("original_max_position_embeddings", None)
            if scaling is not None:
                raise ConfigError(f"{source}: rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
                                  f"supported for {mt} checkpoints (only default RoPE)")
            kw["original_max_position_embeddings"] = kw.get("max_position_embeddings", 4096)
        kw.setdefault("original_max_position_embeddings", kw.get("max_position_embeddings", 4096))
        if kw.get("head_dim") is not None and kw["head_dim"] == kw.get("hidden_size", 0) // kw.get("num_attention_heads", 1):
            kw["head_dim"] = None
        rope_scaling = _parse_scaling(scaling, source)
        try:
            return cls(rope_theta=float(theta), partial_rotary_factor=float(partial),
                       rope_scaling=rope_scaling, source_model_type=mt, extra=d, **kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: malformed config ({e})") from None
        except ConfigError as e:  # the file named with what is wrong in it
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Phi3Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict[str, Any]:
        """A Phi-3 config.json that transformers' Phi3ForCausalLM reads (v4 and v5 alike)."""
        d: dict[str, Any] = {k: v for k, v in self.extra.items()
                             if k not in ("architectures", "model_type", "auto_map", "transformers_version")}
        d.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
        for f in dataclasses.fields(self):
            if f.name in ("source_model_type", "extra", "rope_scaling", "head_dim"):
                continue
            d[f.name] = getattr(self, f.name)
        if self.head_dim is not None:
            d["head_dim"] = self.head_dim
        rs = self.rope_scaling
        d["rope_scaling"] = None if rs is None else {
            "type": rs.type, "short_factor": list(rs.short_factor), "long_factor": list(rs.long_factor),
            **({"factor": rs.factor} if rs.factor is not None else {}),
            **({"attention_factor": rs.attention_factor} if rs.attention_factor is not None else {}),
        }
        d.update(hidden_act="silu", attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=True)
        return d

    def replace(self, **changes: Any) -> "Phi3Config":
        return dataclasses.replace(self, **changes)


def _parse_scaling(s: dict[str, Any] | None, source: str) -> RopeScaling | None:
    if not s:
        return None
    if not isinstance(s, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object (or null), got {json.dumps(s)[:60]}")
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    if not isinstance(kind, str) or kind not in ("su", "longrope", "yarn"):
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (Phi-3 uses longrope/su)")
    try:
        out = RopeScaling(short_factor=tuple(float(x) for x in s["short_factor"]),
                          long_factor=tuple(float(x) for x in s["long_factor"]),
                          factor=None if s.get("factor") is None else float(s["factor"]),
                          attention_factor=None if s.get("attention_factor") is None else float(s["attention_factor"]))
        if not all(math.isfinite(x) and x > 0 for x in (*out.short_factor, *out.long_factor, out.factor or 1,
                                                        out.attention_factor or 1)):
            raise ValueError("factors must be positive finite numbers")
        return out
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: malformed rope_scaling ({e!r})") from None
