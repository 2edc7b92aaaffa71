"""Readers of the formats we write that we did not write: llama.cpp's own converter (convert_hf_to_gguf.py, from the
llama-cpp-python source distribution) and mlx-lm. A format is only as good as a reader that is not ours.

The converter ships in llama-cpp-python's sdist (its vendored llama.cpp), the version installed here: `pip download`
fetches it once into the test cache ($PHI3SKIP_TEST_CACHE), and only the converter, its `conversion` package and its
`gguf-py` are kept. Offline, or without pip, the tests that need it are skipped with the reason.

Accommodations for the readers' own limits, applied here and nowhere else (README says so):
- llama.cpp's converter reads a DeciLM BPE vocabulary only at Llama 3's 128,256 tokens and sends any other to the
  sentencepiece path (`tokenizer.model`); ours goes the BPE way (`_set_vocab_gpt2`), and a pre-tokenizer it does not
  know by its hash (the tests' tiny vocabularies) is written as "default": the logits compared do not depend on it.
- mlx-lm names the linear-attention weight `self_attn.linear` where NVIDIA's checkpoints say `self_attn.linear_attn`;
  a copy of the folder is renamed for it.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import cache_root

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
DRIVER = r'''
import logging, sys
conv, folder, out, outtype = sys.argv[1:5]
sys.path.insert(0, conv)
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype]
import convert_hf_to_gguf as c
from conversion.base import TextModel
from conversion.deci import DeciModel

DeciModel.set_vocab = lambda self: self._set_vocab_gpt2()  # its DeciLM BPE rule: 128,256 tokens only
known = TextModel.get_vocab_base_pre


def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # a tiny test vocabulary: no pre-tokenizer of its list
        return "default"


TextModel.get_vocab_base_pre = pre
logging.disable(logging.WARNING)
c.main()
'''


def llama_converter() -> Path:
    """The folder holding llama.cpp's converter for the installed llama-cpp-python (skips when it cannot be had)."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llama.cpp's converter comes from llama-cpp-python's source distribution: install the package")
    root = cache_root() / f"llama-cpp-python-{version}-converter"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    tmp = cache_root() / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "-d", str(tmp)],
                           capture_output=True, text=True, timeout=600)
        sdists = list(tmp.glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            pytest.skip(f"llama.cpp's converter: pip could not fetch llama-cpp-python=={version}'s source "
                        f"distribution ({(r.stderr.strip().splitlines() or ['no file'])[-1][:160]})")
        part = tmp / "converter"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name
                       and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(CONVERTER_PARTS)
                       and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
            tar.extractall(part, members=members, filter="data")
        os.replace(part, root)  # complete, or not there
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def convert_with_llama_cpp(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_hf_to_gguf.py on an exported folder (with the vocabulary accommodation above)."""
    conv = llama_converter()
    r = subprocess.run([sys.executable, "-c", DRIVER, str(conv), str(folder), str(out), outtype],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and out.is_file(), f"llama.cpp's converter failed on {folder}:\n{r.stderr[-3000:]}"
    return out


def mlx_logits(folder: Path, ids: list[int], tmp: Path) -> np.ndarray:
    """mlx-lm's logits [T, V] (float32, CPU) for one sequence of an exported folder (skips without mlx-lm)."""
    pytest.importorskip("mlx.core", reason="mlx-lm runs Nemotron-NAS folders: pip install 'mlx[cpu]' mlx-lm")
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from safetensors.numpy import load_file, save_file

    copy = tmp / f"mlx-{folder.name}"
    shutil.copytree(folder, copy)
    for f in copy.glob("*.safetensors"):  # mlx-lm's key for the linear attention
        sd = load_file(f)
        save_file({k.replace("self_attn.linear_attn.", "self_attn.linear."): v for k, v in sd.items()}, f,
                  metadata={"format": "pt"})
    if (copy / "model.safetensors.index.json").is_file():
        index = json.loads((copy / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k.replace("self_attn.linear_attn.", "self_attn.linear."): v
                               for k, v in index["weight_map"].items()}
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_model(copy)
    model.set_dtype(mx.float32)
    out = model(mx.array([ids]))[0]
    return np.array(out.astype(mx.float32))
