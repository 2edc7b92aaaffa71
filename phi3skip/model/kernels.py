"""CPU decode kernels: few-row matrix-vector products in fp32, int8 and int4 (`csrc/gemv.cpp`), built once per
machine with torch's C++ extension loader and kept in its cache (~40 s the first time).

Why a kernel of our own: at one row, torch's CPU int8 product (`aten._weight_int8pack_mm`) is 3.4x slower than
fp32 and a torch.compile'd reduction reads int8 weights at about half the memory bandwidth (docs/benchmarks.md);
one weight row (576 values here) is too short for the hardware prefetcher, so the kernel prefetches the next rows
itself. Built with `-march=native`: the cache is named after this CPU's instruction sets, so a home directory shared
by two machines holds a build for each. Without a compiler (or with PHI3SKIP_KERNELS=0) everything runs in plain
torch (`available()` is False): the same numbers up to float rounding, slower.

The products are registered with torch's dispatcher from C++ (`torch.ops.phi3skip_cpu.gemv_*`), so a call runs no
Python and torch.compile keeps them as calls.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
MAX_ROWS = 8  # rows of x the kernels take; more (a prefill) go through a dequantized matrix product
GROUP = 32  # int4 block size, llama.cpp q4_1's


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: the build uses -march=native."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256((flags + torch.__version__).encode()).hexdigest()[:10]


_EXT: list = []  # [the extension or None] once resolved: a plain global that torch.compile's tracing can read


def extension():
    """The compiled extension, or None (disabled, not on Linux/x86 with a C++ compiler, or the build failed)."""
    if not _EXT:
        _EXT.append(_build())
    return _EXT[0]


def _build():
    if os.environ.get("PHI3SKIP_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        load(name=f"phi3skip_gemv_{_cpu_tag()}", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        _register_fakes()
        return torch.ops.phi3skip_cpu
    except Exception as e:  # noqa: BLE001 - any build failure falls back to plain torch
        warnings.warn(f"phi3skip: the CPU decode kernels did not build ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); decoding in plain torch, slower", stacklevel=2)
        return None


def available() -> bool:
    """Whether the kernels are built (building them on the first call)."""
    return (_EXT[0] if _EXT else extension()) is not None


def usable(x: torch.Tensor) -> bool:
    """Whether x's rows go through the kernels: fp32 on the CPU, at most MAX_ROWS rows, kernels built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
            and bool(_EXT) and _EXT[0] is not None)


def _register_fakes() -> None:
    """Output shapes of the ops for torch.compile's tracing (the ops themselves are registered in C++)."""
    lib = "phi3skip_cpu::"
    torch.library.register_fake(lib + "gemv_f32")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake(lib + "gemv_q8")(lambda x, q, scale: x.new_empty(x.shape[0], q.shape[0]))
    torch.library.register_fake(lib + "gemv_q4")(lambda x, q, scale, offset: x.new_empty(x.shape[0], q.shape[0]))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T through the kernel (x: [..., K] fp32 with few rows, W: [N, K] row-major)."""
    return _EXT[0].gemv_f32(_rows(x), w).view(*x.shape[:-1], w.shape[0])


def linear_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _EXT[0].gemv_q8(_rows(x), q, scale).view(*x.shape[:-1], q.shape[0])


def linear_q4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return _EXT[0].gemv_q4(_rows(x), q, scale, offset).view(*x.shape[:-1], q.shape[0])


__all__ = ["available", "usable", "extension", "linear_f32", "linear_q8", "linear_q4", "MAX_ROWS", "GROUP"]
