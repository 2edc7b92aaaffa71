"""The tokenizer: `tokenizer.json` from a Hub id or a local folder, read with the `tokenizers` library only.

Special and stop tokens live here; the chat format will join them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer

from ..core.cli import UserError
from ..core.hub import hub_errors, hub_offline, is_hub_id
from .tokens import read_meta

TOKENIZER_FILE = "tokenizer.json"
# Small files next to tokenizer.json that name the end-of-text token when its name is not a standard one.
SIDE_FILES = ("tokenizer_config.json", "config.json")
# Document separators by preference: Phi-3, SmolLM2, GPT-2 and Phi-4 use <|endoftext|>; Llama-3 <|end_of_text|>.
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")
FALLBACK_EOS = ("</s>", "<eos>", "<|im_end|>")


class TokenizerError(UserError):
    """tokenizer.json missing, unreadable, or without an end-of-text token."""


def _download(repo_id: str, filename: str, revision: str | None, token: str | None, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(f"{repo_id} ({filename})", "pass --model DIR, a folder that holds tokenizer.json",
                    TokenizerError, revision):
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, local_files_only=offline))


def tokenizer_file(src: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """Path of `tokenizer.json`: in a local folder (or the file itself), else downloaded from a Hub model id.

    From the Hub, tokenizer_config.json and config.json are fetched beside it when present: they name the
    end-of-text token of models that do not call it <|endoftext|>.
    """
    path = Path(src).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return path
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise TokenizerError(f"{path}: no {TOKENIZER_FILE} in this folder; pass a model folder or Hub id "
                                 f"that has one (this project reads tokenizer.json only, no sentencepiece)")
        return path / TOKENIZER_FILE
    src = str(src)
    if not is_hub_id(src):
        raise TokenizerError(f"{src}: no such folder, and not a Hub model id of the form org/name")
    offline = hub_offline()
    file = _download(src, TOKENIZER_FILE, revision, token, offline)
    for side in SIDE_FILES:
        try:
            _download(src, side, revision, token, offline)
        except TokenizerError:
            pass  # optional: only needed for an unusual end-of-text token
    return file


def load_tokenizer(src: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a Hub model id or a folder holding tokenizer.json."""
    return read_tokenizer(tokenizer_file(src, revision, token))


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({first})") from None


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 of the tokenizer.json bytes: two token files are compatible only if these match."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Vocabulary and special tokens ----------------------------------------------------------------------------
def vocab_size(tok: Tokenizer) -> int:
    """One past the largest token id, added tokens included (not the model's padded embedding size)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _named_eos(folder: Path) -> list[str | int]:
    """End-of-sequence token names or ids that tokenizer_config.json and config.json give, in that order."""
    found: list[str | int] = []
    for name in SIDE_FILES:
        try:
            cfg = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict):
            continue
        eos = cfg.get("eos_token") if name == "tokenizer_config.json" else cfg.get("eos_token_id")
        if isinstance(eos, dict):  # {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, (str, int)) and not isinstance(eos, bool):
            found.append(eos)
    return found


def eos_token_id(tok: Tokenizer, folder: str | os.PathLike | None = None) -> int:
    """The end-of-text token that separates documents.

    <|endoftext|> (Phi-3, Phi-4, SmolLM2) or <|end_of_text|> (Llama-3) when the vocabulary has it, else the
    eos of tokenizer_config.json / config.json in `folder` (where tokenizer.json lives), else </s> or <eos>.
    """
    candidates: list[str | int] = [*END_OF_TEXT]
    if folder is not None:
        candidates += _named_eos(Path(folder))
    candidates += [*FALLBACK_EOS]
    size = vocab_size(tok)
    for c in candidates:
        tid = c if isinstance(c, int) else tok.token_to_id(c)
        if tid is not None and 0 <= tid < size:
            return tid
    where = f" in {folder}" if folder is not None else ""
    raise TokenizerError(f"no end-of-text token found{where}: the vocabulary has none of {', '.join(END_OF_TEXT)}, "
                         f"{', '.join(FALLBACK_EOS)}, and no eos_token in tokenizer_config.json/config.json")


# Token files and their tokenizer ----------------------------------------------------------------------------
def check_data_tokenizer(data: str | os.PathLike, model: str | os.PathLike, revision: str | None = None,
                         token: str | None = None) -> dict:
    """meta.json of a folder made by prepare.py, after checking it was tokenized with `model`'s tokenizer.json,
    byte for byte (its sha256): token ids from another tokenizer would train or score garbage."""
    meta = read_meta(data)
    path = tokenizer_file(model, revision, token)
    if meta.get("tokenizer_sha256") != tokenizer_hash(path):
        raise TokenizerError(f"{data} was tokenized with another tokenizer ({meta.get('tokenizer', '?')}) than "
                             f"{model}'s; prepare it with this model: python prepare.py --model {model}")
    return meta
