"""Where and in what precision a command runs: the one place for the defaults of --device and --dtype.

    device   --device as given, else CUDA when available, else the CPU
    dtype    --dtype as given, else float32 on the CPU; on CUDA the command's own default (`CUDA_DTYPE`):
             generation runs in the checkpoint's torch_dtype (bfloat16 when it names none), measurements
             (evaluate, rank_layers) in float32, so that perplexities compare across machines

train.py chooses its compute dtype the same way (bfloat16 on CUDA, float32 on the CPU) in its own run.
"""
from __future__ import annotations

import torch

from .cli import UserError

CHECKPOINT = "checkpoint"  # on CUDA: the checkpoint's own torch_dtype
CUDA_DTYPE = {"generate": CHECKPOINT, "evaluate": "float32", "rank_layers": "float32"}


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return names[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pick_device(name: str | None, flag: str = "--device") -> torch.device:
    """The device named, else CUDA when available, else the CPU; a name this machine cannot use is one line."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UserError(f"{flag} {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def pick_dtype(name: str | None, device: torch.device, command: str,
               checkpoint_dtype: str | None = None) -> torch.dtype:
    """The dtype named, else float32 on the CPU, else `command`'s CUDA default (see the module docstring)."""
    if device.type == "cpu":
        default = torch.float32
    elif CUDA_DTYPE[command] == CHECKPOINT:
        default = parse_dtype(checkpoint_dtype or "bfloat16")
    else:
        default = parse_dtype(CUDA_DTYPE[command])
    return parse_dtype(name, default=default)
