"""Checkpoints: `from_pretrained` (Hub repo or local folder, single or sharded safetensors, Llama/Mistral
layouts fused on the fly) and `save_pretrained` (Phi-3 names, sharded, written atomically)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.cli import UserError
from ..core.devices import dtype_name, parse_dtype
from ..core.hub import hub_errors, hub_offline, is_hub_id
from ..core.paths import atomic_output, read_json_object
from ..model import bypass, quant
from ..model.config import ConfigError, Phi3Config
from ..model.skipsets import ProfileShape, check_profile
from ..model.model import Phi3ForCausalLM

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.gguf", "skip.json"]
# Files that travel with a checkpoint when it is saved again (tokenizer.gguf: the tokenizer metadata of a GGUF the
# model was converted from, see gguf.py).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.gguf",
                 "generation_config.json")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(UserError):
    """Weights missing, corrupt or not matching the config."""


# Finding a checkpoint ---------------------------------------------------------------------------------
def resolve(src: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is, else a Hub repo id downloaded (config, weights, tokenizer files only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    s = str(src)
    if not is_hub_id(s):
        raise CheckpointError(f"{s}: no such folder, and not a Hub repo id of the form org/name")
    from huggingface_hub import snapshot_download

    with hub_errors(s, "download it once with network access, or pass a local folder", CheckpointError, revision):
        # token=None lets huggingface_hub read HF_TOKEN; offline, only the local cache is used (no 25 s retries)
        return Path(snapshot_download(s, revision=revision, token=token, allow_patterns=HUB_FILES,
                                      local_files_only=hub_offline()))


SKIP_FILE = "skip.json"


def read_skip_profile(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's skip.json (written by train.py, extended by scripts/evaluate.py); {} when there is none."""
    path = Path(folder) / SKIP_FILE
    if not path.is_file():
        return {}
    obj = read_json_object(path, error=CheckpointError)
    shape = ProfileShape()
    if (Path(folder) / "config.json").is_file():  # the bounds of its layers and sizes (a damaged config: one line)
        cfg = Phi3Config.from_json(Path(folder) / "config.json")
        shape = ProfileShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    return check_profile(obj, str(path), shape)


def load_config(src: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Phi3Config:
    return Phi3Config.from_json(resolve(src, revision, token) / "config.json")


# Reading weights ---------------------------------------------------------------------------------------
def weight_files(folder: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names, from the index or the single file; missing shards are errors."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: malformed index (expected a weight_map object)") from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index} points to a missing shard: {shard}")
        return shards
    if (folder / SINGLE).is_file():
        return {SINGLE: []}
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}")


def iter_tensors(folder: Path):
    """Yield (name, tensor) one at a time, so peak memory stays near one copy of the weights. The file is mapped
    again for each tensor: the pages of a mapping count in the process's resident memory until it is closed, and
    a mapping kept open over the whole file doubled the peak (a quantizing load held the file's pages as well as
    its int8 weights)."""
    for shard in weight_files(folder):
        path = folder / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
            for name in names:
                with safe_open(str(path), framework="pt") as f:
                    t = f.get_tensor(name)
                yield name, t
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype the folder's weights are stored in (its first floating-point tensor's, read from the header), which
    config.json's torch_dtype need not match; None when there is no floating-point tensor."""
    for shard in weight_files(folder):
        try:
            with safe_open(str(folder / shard), framework="pt") as f:
                for name in f.keys():
                    dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                    if dtype is not None:
                        return dtype
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{folder / shard}: corrupt or truncated safetensors file ({e})") from None
    return None


def fuse_llama(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Llama/Mistral layout -> Phi-3: q,k,v into qkv_proj (rows Q, K, V); gate, up into gate_up_proj."""
    for i in range(num_layers):
        p = f"model.layers.{i}."
        qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        if all(k in sd for k in qkv):
            sd[p + "self_attn.qkv_proj.weight"] = torch.cat([sd.pop(k) for k in qkv])
        gu = [p + f"mlp.{n}_proj.weight" for n in ("gate", "up")]
        if all(k in sd for k in gu):
            sd[p + "mlp.gate_up_proj.weight"] = torch.cat([sd.pop(k) for k in gu])
    return sd


def check_state_dict(sd: Mapping[str, torch.Tensor], model: Phi3ForCausalLM, where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: missing tensors {', '.join(missing[:3])}{more}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{where}: unexpected tensors {', '.join(unexpected[:3])}{more} "
                              f"(not a Phi-3/Llama checkpoint matching config.json?)")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, config.json implies "
                                  f"{tuple(shape)}")
        if not sd[k].is_floating_point():  # an integer (e.g. quantized) tensor is not a weight this model can use
            raise CheckpointError(f"{where}: tensor {k} is {dtype_name(sd[k].dtype)}; weights must be floating point "
                                  f"(float32, bfloat16 or float16; convert quantized checkpoints first)")


def load_weights(model: Phi3ForCausalLM, folder: Path, dtype: torch.dtype,
                 device: torch.device | str | None, quantize: str | None = None) -> None:
    """Assign the folder's weights into a (meta-device) model, converted to dtype/device.

    quantize ("int8", "int4"): every Linear weight is quantized as it is read (`phi3skip.model.quant`), so memory
    peaks near the quantized model, not the full-precision one; the model's Linears become QuantLinears."""
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = model.config.tie_word_embeddings
    if tied:
        linears |= {"model.embed_tokens.weight"}  # becomes the quantized lm_head, which the embedding then reads
    sd: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, t in iter_tensors(folder):
        if name.endswith("rotary_emb.inv_freq"):  # derived buffer some old checkpoints carry
            continue
        t = t.to(device=device or "cpu", dtype=dtype if t.is_floating_point() else t.dtype)
        if quantize and name in linears and t.is_floating_point() and t.dim() == 2:
            packed[name] = quant.quantize_weight(quantize, t)
            t = torch.empty(t.shape, dtype=t.dtype, device="meta")  # the shape, for the checks below
        sd[name] = t
    if model.config.source_model_type != "phi3":
        sd = fuse_llama(sd, model.config.num_hidden_layers)  # q, k, v (gate, up) were read unquantized
    if tied:
        sd.pop("lm_head.weight", None)
    check_state_dict(sd, model, str(folder))
    if quantize:
        for name in linears & sd.keys():
            if name not in packed:  # fused from a Llama layout just now
                packed[name] = quant.quantize_weight(quantize, sd[name])
        quant.quantize_model(model, quantize, dtype=dtype)
        for name, tensors in packed.items():
            del sd[name]
            prefix = ("lm_head.weight" if name == "model.embed_tokens.weight" else name).removesuffix("weight")
            sd.update(zip((prefix + n for n in ("weight", "scale", "offset")), tensors))
    model.load_state_dict(sd, strict=False, assign=True)  # lm_head is absent when tied
    model.tie_weights()


def from_pretrained(src: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: torch.device | str | None = None, revision: str | None = None,
                    token: str | None = None, quantize: str | None = None) -> Phi3ForCausalLM:
    """Load a Phi-3 (or Llama/Mistral) checkpoint from a Hub repo id or a local folder, in eval mode.

    dtype defaults to the config's torch_dtype. The model is built on the meta device and the weights are
    assigned, so memory peaks near one copy of the weights. quantize: "int8" or "int4", weight-only quantization
    for decoding and evaluation, as the weights are read (`phi3skip.model.quant`; the bypasses too); such a model
    is not saved again.
    """
    if quantize is not None and quantize not in quant.MODES:
        raise UserError(f"quantize={quantize!r}: one of {', '.join(quant.MODES)} (or None)")
    folder = resolve(src, revision, token)
    config = Phi3Config.from_json(folder / "config.json")
    target = parse_dtype(dtype, default=parse_dtype(config.torch_dtype) if config.torch_dtype else torch.float32)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    load_weights(model, folder, target, device, quantize)
    model.rotary = type(model.rotary)(config).to(device or "cpu")  # derived buffers, made for real
    model.source_dir = folder
    adapters = read_skip_profile(folder).get("adapters")
    if adapters is not None:  # skip-mode parameters beside the plain checkpoint (phi3skip/model/bypass.py)
        bypass.load(model, folder, adapters)
        if quantize and not model.skip_adapters.depth_rank:  # with deltas: the Generator's merged bypasses are
            quant.quantize_model(model.skip_adapters, quantize)  # quantized (their weights depend on the skip set)
    return model.eval()


# Writing -----------------------------------------------------------------------------------------------
def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns its storage (safetensors refuses views and shared storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], config: Phi3Config, folder: str | os.PathLike, *,
                    files: Mapping[str, str | bytes] | None = None, copy_from: str | os.PathLike | None = None,
                    extra_json: Mapping[str, Any] | None = None, max_shard_size: int = 5 * 2**30,
                    config_json: Mapping[str, Any] | None = None) -> Path:
    """Write a Phi3ForCausalLM checkpoint folder atomically: a temporary sibling folder, then a rename.

    files: extra files by name (tokenizer.json, ...); copy_from: a folder whose tokenizer and generation files
    are carried over; extra_json: name -> object written as JSON (for example skip.json); config_json: another
    config.json than `config`'s (a heterogeneous-block export, phi3skip.formats.deci), `config` still naming the tokens.
    """
    folder = Path(folder)
    sd = {k: _plain(v) for k, v in state_dict.items()
          if not (config.tie_word_embeddings and k == "lm_head.weight")}
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    config = config.replace(source_model_type="phi3",
                            torch_dtype=dtype_name(dtypes.pop()) if len(dtypes) == 1 else config.torch_dtype)
    with atomic_output(folder, "folder") as tmp:
        if copy_from is not None:
            for name in CARRIED_FILES:
                if (Path(copy_from) / name).is_file():
                    shutil.copy2(Path(copy_from) / name, tmp / name)
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(dict(config_json or config.to_dict()), indent=2) + "\n")
        if not (tmp / "generation_config.json").exists():
            gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shards = _shards(sd, max_shard_size)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    return folder


def save_pretrained(model: Phi3ForCausalLM, folder: str | os.PathLike, *,
                    tokenizer_from: str | os.PathLike | None = None, extra_json: Mapping[str, Any] | None = None,
                    max_shard_size: int = 5 * 2**30) -> Path:
    """Save a model so that transformers' Phi3ForCausalLM (and `from_pretrained` here) loads it unchanged.

    Tokenizer and generation files come from `tokenizer_from`, else from the folder the model was loaded from.
    Skip adapters, when the model has them, go to their own file, named in skip.json.
    """
    if getattr(model, "quantization", None):
        raise UserError(f"this model was quantized ({model.quantization}) for decoding; save the full-precision model "
                        f"(load it without quantize=) and quantize when loading it again")
    files, extra = {}, dict(extra_json or {})
    if model.skip_adapters is not None:
        files[bypass.FILE] = bypass.to_bytes(model.skip_adapters)
        skip_json = dict(extra.get(SKIP_FILE) or read_skip_profile(getattr(model, "source_dir", None) or folder))
        extra[SKIP_FILE] = {**skip_json, "adapters": model.skip_adapters.describe()}
    return save_checkpoint(model.base_state_dict(), model.config, folder, files=files,
                           copy_from=tokenizer_from or getattr(model, "source_dir", None),
                           extra_json=extra, max_shard_size=max_shard_size)


__all__ = ["from_pretrained", "save_pretrained", "save_checkpoint", "load_config", "resolve", "CheckpointError",
           "ConfigError"]
