"""Prompts for generation: the chat format of a model folder, and the token ids that stop generation.

The chat format comes from the `chat_template` of tokenizer_config.json, rendered with jinja2 as transformers'
`apply_chat_template(..., add_generation_prompt=True)` renders it. Without jinja2 (or without a template) a
built-in format is used when the vocabulary tells which one the model speaks: Phi-3's
`<|user|>\\n…<|end|>\\n<|assistant|>\\n`, or ChatML (`<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n`).
Anything else is a clear error rather than a silently wrong prompt.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer

from ..core.cli import UserError
from ..model.config import Phi3Config

Message = dict[str, str]


class ChatError(UserError):
    """A chat prompt that cannot be built for this model."""


def read_json(folder: str | os.PathLike | None, name: str) -> dict[str, Any] | None:
    """A JSON object file of the model folder, or None when absent or not an object."""
    if folder is None:
        return None
    try:
        obj = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# Stop tokens --------------------------------------------------------------------------------------------
def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def stop_token_ids(folder: str | os.PathLike | None, config: Phi3Config,
                   tokenizer: Tokenizer | None = None) -> list[int]:
    """Ids that end a generation: generation_config.json's eos_token_id, then config.json's (transformers'
    rule), then the tokenizer_config.json eos_token when the vocabulary has it. Order kept, no duplicates."""
    found: list[int] = []
    gen = read_json(folder, "generation_config.json") or {}
    found += _ids(gen.get("eos_token_id"))
    found += config.eos_token_ids
    if tokenizer is not None:
        name = _token_name((read_json(folder, "tokenizer_config.json") or {}).get("eos_token"))
        tid = tokenizer.token_to_id(name) if name else None
        if tid is not None:
            found.append(tid)
    out: list[int] = []
    for i in found:
        if 0 <= i < config.vocab_size and i not in out:
            out.append(i)
    return out


# Chat format ----------------------------------------------------------------------------------------------
def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template(folder: str | os.PathLike | None) -> str | None:
    """The folder's chat template: tokenizer_config.json's `chat_template` (a string, or a list of named
    templates of which "default" is used), else a chat_template.jinja file beside it."""
    cfg = read_json(folder, "tokenizer_config.json") or {}
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    if isinstance(tpl, str) and tpl.strip():
        return tpl
    if folder is not None:
        path = Path(folder) / "chat_template.jinja"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def builtin_format(tokenizer: Tokenizer) -> str | None:
    """"phi3" or "chatml" when the vocabulary has that format's special tokens, else None."""
    has = lambda *names: all(tokenizer.token_to_id(n) is not None for n in names)  # noqa: E731
    if has("<|user|>", "<|assistant|>", "<|end|>"):
        return "phi3"
    if has("<|im_start|>", "<|im_end|>"):
        return "chatml"
    return None


def render_builtin(kind: str, messages: Sequence[Message]) -> str:
    """Phi-3's or ChatML's format, ending with the assistant's turn opened."""
    if kind == "phi3":
        return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"
    if kind == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    raise ValueError(f"unknown chat format {kind!r}")


def render_template(template: str, messages: Sequence[Message], folder: str | os.PathLike | None) -> str:
    """Render a chat template as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    cfg = read_json(folder, "tokenizer_config.json") or {}
    special = {k: _token_name(cfg.get(k)) or "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=True, **special)
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"the chat template of {folder or 'this model'} failed: {e}") from None


def _have_jinja2() -> bool:
    try:
        import jinja2  # noqa: F401
        import jinja2.sandbox  # noqa: F401
    except ImportError:
        return False
    return True


def format_chat(user: str, tokenizer: Tokenizer, folder: str | os.PathLike | None = None,
                system: str | None = None, *, use_template: bool | None = None) -> str:
    """The text of a one-turn chat prompt (an optional system message, the user's message, the assistant's
    turn opened). use_template=None: the folder's template when there is one and jinja2 is importable."""
    messages: list[Message] = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}]
    template = chat_template(folder)
    if use_template is None:
        use_template = template is not None and _have_jinja2()
    if use_template and template is not None:
        return render_template(template, messages, folder)
    kind = builtin_format(tokenizer)
    if kind is None:
        why = ("its chat template needs jinja2 (pip install jinja2)" if template is not None
               else "it has no chat_template in tokenizer_config.json")
        raise ChatError(f"--chat: cannot build a chat prompt for {folder or 'this model'}: {why}, and its "
                        f"vocabulary has neither Phi-3's nor ChatML's special tokens")
    if template is not None:
        print(f"warning: jinja2 is not installed; using the built-in {kind} chat format instead of the "
              f"model's template", file=sys.stderr)
    return render_builtin(kind, messages)


def encode_prompt(text: str, tokenizer: Tokenizer, *, chat: bool) -> list[int]:
    """Token ids of a prompt. Plain text gets the tokenizer's own special tokens (its BOS, if any), as
    transformers' tokenizer(text) does; a rendered chat prompt carries its special tokens in the text."""
    return tokenizer.encode(text, add_special_tokens=not chat).ids


def decode_skipping(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class StreamDecoder:
    """Incremental detokenisation: text for newly generated ids, holding back an incomplete UTF-8 character.

    Decodes a window that starts at the previous boundary, so tokenizers that drop a leading space at the
    start of a decode (SentencePiece's ▁) still print it between tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] are already printed and anchor the window
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") or len(full) < len(done):  # a character split across tokens: wait
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]

    def flush(self) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return full[len(done):]
