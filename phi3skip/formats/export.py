"""Export a chosen skip set for other engines: the student with those layers removed, or run as their bypasses.

    from phi3skip.formats.export import export
    export("data/llm_cache/student_model", num_skip=4, out="exported/", gguf="exported.gguf", outtype="q8_0")

A skip set whose layers run no bypass (the full model, a student trained without skip adapters, or layers the
adapters do not cover) becomes a standard, shallower `Phi3ForCausalLM`: the skipped blocks dropped, the rest
renumbered (`num_hidden_layers` updated), so transformers, vLLM, TGI and llama.cpp (the `phi3` GGUF) compute exactly
what `model(x, skip=...)` computes. A set whose layers run trained bypasses (the default recipe) becomes a
heterogeneous-block model (phi3skip.formats.deci): each bypass a block of llama.cpp's `deci` architecture, which runs the
GGUF exactly; the folder has the Nemotron-NAS (DeciLM) layout. Both folders carry the tokenizer, generation files
and a model card (README.md) naming the source, the skip set, its measured perplexity from skip.json, the engines
that compute it and the command that made it; the GGUF comes from gguf_writer.py.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.cli import UserError
from ..core.devices import dtype_name, parse_dtype
from ..core.paths import check_apart, check_output
from ..model.config import Phi3Config
from ..model.model import Phi3ForCausalLM
from ..model.skipsets import parse_skip_sets, validate_skip
from . import deci
from .checkpoints import check_state_dict, from_pretrained, read_skip_profile, resolve, save_checkpoint
from .gguf_writer import OUTTYPES, check_config, require_gguf, write_deci_gguf, write_gguf


class ExportError(UserError):
    """A skip set or an output that cannot be exported as asked."""


# The skip set ------------------------------------------------------------------------------------------
def trained_order(profile: Mapping[str, Any], num_layers: int) -> list[int]:
    """skip.json's candidate layers in the order they were made skippable ([] when there is none)."""
    layers = profile.get("layers")
    if isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        validate_skip(layers, num_layers)
        return list(layers)
    return []


def choose_skip(profile: Mapping[str, Any], num_layers: int, skip: str | Sequence[int] | None = None,
                num_skip: int | None = None) -> tuple[int, ...]:
    """`--skip 28,26`, or the first `--num-skip K` layers of skip.json's trained order."""
    order = trained_order(profile, num_layers)
    if skip is not None and num_skip is not None:
        raise ExportError("give --skip or --num-skip, not both")
    if skip is not None:
        if isinstance(skip, str):
            sets = [s for s in parse_skip_sets(skip, order, flag="--skip") if s]
            if len(sets) > 1:
                raise ExportError(f"--skip {skip!r}: one skip set only (layer indices like 28,26)")
            skip = sets[0] if sets else ()
        validate_skip(skip, num_layers)
        return tuple(skip)
    if not order:
        raise ExportError("no trained skip order (skip.json with 'layers') in the model folder: pass --skip LAYERS")
    if num_skip is None:
        raise ExportError(f"pass --skip LAYERS or --num-skip K (K in 1..{len(order)}: a prefix of the trained order "
                          f"{','.join(map(str, order))})")
    if not 1 <= num_skip <= len(order):
        raise ExportError(f"--num-skip {num_skip}: must be in 1..{len(order)} (the trained order "
                          f"{','.join(map(str, order))})")
    return tuple(order[:num_skip])


def is_trained(profile: Mapping[str, Any], skip: Sequence[int], num_layers: int) -> bool:
    """True when the student was trained to run without exactly these layers: a prefix of the trained order."""
    order = trained_order(profile, num_layers)
    return not skip or any(set(order[:k]) == set(skip) for k in range(1, len(order) + 1))


def measurements(profile: Mapping[str, Any], skip: Sequence[int]) -> list[dict[str, Any]]:
    """What skip.json records about this skip set's quality: train.py's validation perplexity (`perplexity`) and
    scripts/evaluate.py's results (`evaluation`), each with the full student's and the teacher's for reference."""
    key = set(skip)
    out: list[dict[str, Any]] = []
    ppl = profile.get("perplexity") or {}
    if isinstance(ppl, dict):
        mine = ppl.get("student") if not key else next(
            (p.get("perplexity") for p in ppl.get("prefixes") or [] if set(p.get("skip") or []) == key), None)
        if isinstance(mine, (int, float)):
            out.append(dict(by="train.py", data="validation", tokens=profile.get("val_tokens"), ppl=mine, interval=None,
                            full=ppl.get("student"), teacher=ppl.get("teacher")))
    ev = profile.get("evaluation") or {}
    results = ev.get("results") or [] if isinstance(ev, dict) else []
    full = next((r for r in results if not r.get("skip")), None)
    for r in results:
        if set(r.get("skip") or []) != key:
            continue
        for data, v in (r.get("student") or {}).items():
            teacher = ((full or {}).get("teacher") or {}).get(data) or {}
            out.append(dict(by="scripts/evaluate.py", data=data, tokens=v.get("tokens"), ppl=v.get("ppl"),
                            interval=(v.get("low"), v.get("high")),
                            full=(((full or {}).get("student") or {}).get(data) or {}).get("ppl"),
                            teacher=teacher.get("ppl")))
    return out


# Who serves an exported set, by what its skipped slots run (deci.engines and the model card say why).
SERVED_BY = {"plain": "transformers, vLLM, SGLang, TGI, llama.cpp, mlx-lm",
             "no_op": "vLLM, SGLang, TensorRT-LLM, llama.cpp, mlx-lm",
             "linear": "llama.cpp, mlx-lm"}


def serving_table(profile: Mapping[str, Any], num_layers: int, model: str) -> str:
    """The trained skip sets as one short markdown table, to choose one to serve: k, the layers, each measured
    perplexity (train.py's validation; scripts/evaluate.py's texts), the measured decode speedup over the full
    model (evaluate.py's, phi3skip on its device), the engines that serve its export, and the export command."""
    order = trained_order(profile, num_layers)
    ev = profile.get("evaluation") if isinstance(profile.get("evaluation"), dict) else {}
    results = {tuple(sorted(r.get("skip") or [])): r for r in ev.get("results") or [] if isinstance(r, dict)}
    texts = list((results.get((), {}).get("student") or {}))
    full_speed = results.get((), {}).get("tokens_per_s")
    head = ["k", "skip", "validation ppl (train.py)", *(f"{t} ppl (evaluate.py)" for t in texts), "speedup (phi3skip)",
            "served by", "export"]
    adapters = profile.get("adapters") if isinstance(profile.get("adapters"), dict) else {}
    bypassed = {int(i) for i in adapters.get("layers") or [] if isinstance(i, int)}
    kind = "no_op" if adapters.get("rank") == 0 else "linear"
    rows = []
    for k in range(len(order) + 1):
        skip = order[:k]
        by = {(m["by"], m["data"]): m["ppl"] for m in measurements(profile, skip)}
        if not skip:
            ppl = profile.get("perplexity") or {}
            by[("train.py", "validation")] = ppl.get("student") if isinstance(ppl, dict) else None
        speed = results.get(tuple(sorted(skip)), {}).get("tokens_per_s")
        num = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
        what = f"--num-skip {k}" if k else "--skip none"
        rows.append([str(k), ",".join(map(str, skip)) or "none", num(by.get(("train.py", "validation"))),
                     *(num(by.get(("scripts/evaluate.py", t))) for t in texts),
                     f"{speed / full_speed:.2f}x" if speed and full_speed else "–",
                     SERVED_BY[kind if bypassed & set(skip) else "plain"],
                     f"`python scripts/export.py --model {model} {what} --out DIR --gguf FILE.gguf`"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe(m: dict[str, Any]) -> str:
    ci = f" [{m['interval'][0]:.2f}, {m['interval'][1]:.2f}]" if m.get("interval") and None not in m["interval"] else ""
    return f"{m['data']} perplexity {m['ppl']:.2f}{ci} ({m['by']})"


def quality_note(profile: Mapping[str, Any], skip: Sequence[int], num_layers: int) -> str | None:
    """A warning for a skip set the student was not trained for (or a model with no skip.json), or None."""
    shown = ",".join(map(str, skip))
    measured = measurements(profile, skip)
    quality = ("measured " + "; ".join(map(describe, measured)) if measured else
               f"its quality was never measured (scripts/evaluate.py --skip-sets '{shown}' measures it)")
    if not profile:
        return f"no skip.json in the model folder: the model was not trained for skipping by phi3skip, and {quality}"
    if is_trained(profile, skip, num_layers):
        return None
    order = ",".join(map(str, trained_order(profile, num_layers))) or "none"
    return f"--skip {shown} is not a prefix of the trained order {order}: the student was not trained for it; {quality}"


# Weights -----------------------------------------------------------------------------------------------
def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def prune(state_dict: Mapping[str, torch.Tensor], config: Phi3Config,
          skip: Sequence[int]) -> tuple[dict[str, torch.Tensor], Phi3Config]:
    """Remove the skipped blocks of a full-depth Phi-3 state dict and renumber the rest; returns the state dict
    and its config. A tied config whose lm_head differs from the embedding (an adapter fold changed one of
    them) is written untied, with both tensors."""
    skipped = validate_skip(skip, config.num_hidden_layers)
    keep = [i for i in range(config.num_hidden_layers) if i not in skipped]
    renumber = {old: new for new, old in enumerate(keep)}
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(i) in skipped:
                continue
            name = f"model.layers.{renumber[int(i)]}.{rest}"
        out[name] = t
    tied = config.tie_word_embeddings
    if tied and "lm_head.weight" in out:
        if same_tensor(out["lm_head.weight"], out["model.embed_tokens.weight"]):
            del out["lm_head.weight"]
        else:
            tied = False
    extra = dict(config.extra)
    if isinstance(extra.get("layer_types"), list) and len(extra["layer_types"]) == config.num_hidden_layers:
        extra["layer_types"] = [extra["layer_types"][i] for i in keep]
    new_config = config.replace(num_hidden_layers=len(keep), tie_word_embeddings=tied, extra=extra)
    with torch.device("meta"):
        check_state_dict(out, Phi3ForCausalLM(new_config), "the state dict to export")
    return out, new_config


# The model card ----------------------------------------------------------------------------------------
def model_card(*, source: str, profile: Mapping[str, Any], skip: Sequence[int], config: Phi3Config,
               num_layers: int, dtype: torch.dtype, student_dtype: torch.dtype, command: str | None,
               gguf: Path | None = None, outtype: str | None = None, slots: Sequence[deci.Slot] | None = None) -> str:
    """The export's README.md: what it is, where from, which engines compute it, its measured quality, how to load
    it."""
    shown = ",".join(map(str, skip)) or "none"
    keep = [i for i in range(num_layers) if i not in set(skip)] if slots is None else [s.layer for s in slots]
    bypassed = [s.layer for s in slots or () if s.bypass]
    removed = [i for i in skip if i not in bypassed]
    trained = is_trained(profile, skip, num_layers) if profile else False
    order = ",".join(map(str, trained_order(profile, num_layers)))
    same = fidelity(dtype, student_dtype, gguf, outtype)
    if slots is None:
        title = f"layer{'s' if len(skip) > 1 else ''} {shown} removed"
        what = (f"A standard Phi-3 (`Phi3ForCausalLM`) checkpoint made by phi3skip from the skippable student `{source}`"
                + (f" (distilled from `{profile['teacher']}`)" if profile.get("teacher") else "") + ": decoder "
                + (f"layers {shown} are" if len(skip) > 1 else f"layer {shown} is")
                + f" removed, so {len(keep)} of {num_layers} layers remain, renumbered 0..{len(keep) - 1}. " + same)
        engines = "transformers, vLLM, TGI (this folder); llama.cpp and Ollama (the GGUF, `phi3` architecture)"
    else:
        dropped = [s.layer for s in slots if s.attention == "no_op"]
        mapped = [s.layer for s in slots if s.attention == "linear"]
        title = f"layers {shown} skipped (bypass blocks)"
        parts = []
        if mapped:
            parts.append(f"layers {','.join(map(str, mapped))} run as their trained bypasses — a block whose "
                         "attention is a linear map (`replace_with_linear`: no keys, no values, no KV cache) followed "
                         "by a narrow SwiGLU FFN")
        if dropped:
            parts.append(f"layers {','.join(map(str, dropped))} keep only their trained FFN — attention dropped "
                         "(`no_op`: no keys, no values, no KV cache)")
        if removed:
            parts.append(f"layers {','.join(map(str, removed))} are removed")
        student_ffn, padded_ffn = deci.padding_cost(slots, config.hidden_size)
        what = (f"A heterogeneous-block checkpoint (NVIDIA's Nemotron-NAS / DeciLM layout) made by phi3skip from the "
                f"skippable student `{source}`" + (f" (distilled from `{profile['teacher']}`)" if profile.get("teacher")
                                                   else "")
                + ": " + "; ".join(parts) + f"; {len(slots)} blocks, {len(slots) - len(bypassed)} of them full. "
                + same)
        if padded_ffn != student_ffn:
            what += (f" Every Nemotron-NAS reader sizes an FFN by `ffn_mult`, rounded up to {deci.FFN_MULTIPLE} "
                     "channels, so this folder's FFNs are zero-padded to that (zero channels add exactly nothing): "
                     f"{padded_ffn - student_ffn:,} more FFN weights than the student runs "
                     f"(+{100 * (padded_ffn / student_ffn - 1):.1f}% of its FFNs'). The GGUF is not padded.")
        engines = deci.engines(slots)
    window = deci.context_length(config)
    lines = [f"# {Path(source).name or source}, {title}", "", what, "",
             "| | |", "|---|---|",
             f"| source | `{source}` |",
             f"| skipped layers | {shown} "
             + (f"(a prefix of the trained skip order {order})" if trained and skip else
                f"(**not** a skip set the student was trained for; trained order: {order or 'none'})" if skip else "")
             + " |",
             f"| layer map | blocks 0..{len(keep) - 1} here are the student's {_ranges(keep)} |",
             f"| weights | {dtype_name(dtype)}, "
             + (f"{config.num_params() / 1e6:.1f}M parameters" if slots is None else f"{len(slots)} blocks")
             + (", embeddings tied" if config.tie_word_embeddings else "") + " |",
             f"| computed by | {engines} |"]
    if slots is not None and window < config.max_position_embeddings:
        lines.append(f"| context | {window} tokens: the model's sliding window, which the deci architecture lacks; "
                     "within it the window changes nothing |")
    if gguf is not None:
        lines.append(f"| GGUF | `{gguf.name}` ({outtype}, llama.cpp's {'phi3' if slots is None else 'deci'} "
                     "architecture) |")
    if command:
        lines.append(f"| made by | `{command}` |")
    lines += ["", "## Measured quality (from the student's skip.json)", ""]
    measured = measurements(profile, skip)
    if measured:
        lines += ["| measured by | data | tokens | this model | full student | teacher |", "|---|---|---|---|---|---|"]
        for m in measured:
            ci = (f" [{m['interval'][0]:.2f}, {m['interval'][1]:.2f}]"
                  if m.get("interval") and None not in m["interval"] else "")
            num = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
            lines.append(f"| {m['by']} | {m['data']} | {m['tokens'] or '–'} | {num(m['ppl'])}{ci} | {num(m['full'])} "
                         f"| {num(m['teacher'])} |")
        # train.py measures the weights as saved (weights_dtype); before that field, it measured the fp32 weights
        weights = profile.get("weights_dtype") or ("float32" if student_dtype == torch.float32 else None)
        lines += ["", "Perplexity, lower is better."]
        if any(m["by"] == "train.py" for m in measured):
            lines[-1] += (f" train.py measured the student's weights as saved ({weights})" if weights else
                          " train.py measured the student's fp32 weights before they were rounded for saving "
                          f"({dtype_name(student_dtype)})")
            lines[-1] += f"; this export is {dtype_name(dtype)}." if dtype_name(dtype) != weights else "."
    else:
        lines.append("None recorded for this skip set: measure it with `scripts/evaluate.py --skip-sets "
                     f"'{shown}'` on the student.")
    lines += ["", "## Use", ""]
    if slots is None:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```", ""]
    elif gguf is None:
        lines += ["Write the GGUF that llama.cpp runs: `python scripts/export.py --model "
                  f"{source} --skip {shown} --gguf FILE`.", ""]
    if gguf is not None:
        lines += ["```bash", f'llama-cli -m {gguf.name} -p "def fibonacci(n):"      # llama.cpp; Ollama: FROM ./{gguf.name}',
                  "```", ""]
    return "\n".join(lines)


def fidelity(dtype: torch.dtype, student_dtype: torch.dtype, gguf: Path | None, outtype: str | None) -> str:
    """What the card may promise: exactly the student's computation only when no weight was rounded on the way."""
    if dtype == student_dtype:
        folder = "It computes exactly what the student computes with those layers skipped"
    else:
        folder = (f"Its weights are the student's {dtype_name(student_dtype)} weights cast to {dtype_name(dtype)}: it "
                  f"computes what the student computes with those layers skipped, up to that rounding")
    if gguf is None or outtype == default_outtype(dtype):
        return folder + (" (the GGUF holds these weights exactly)." if gguf is not None else ".")
    return folder + f"; the GGUF's {outtype} weights round them further (its outputs differ slightly)."


def _ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 3, 5, 7, 8] -> '0-3, 5, 7-8'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


# The whole export --------------------------------------------------------------------------------------
@dataclass
class Exported:
    skip: tuple[int, ...]
    config: Phi3Config
    dtype: torch.dtype
    folder: Path | None
    gguf: Path | None
    note: str | None  # the quality warning, if any
    slots: list[deci.Slot] | None = None  # the blocks of a bypassed export (deci); None: a plain Phi-3


def default_outtype(dtype: torch.dtype) -> str:
    """The GGUF type that holds the exported weights exactly."""
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]


def _check_outputs(out: Path | None, gguf: Path | None, overwrite: bool) -> None:
    """Both outputs writable (tried now, not after the work), an existing one only with --overwrite."""
    if out is None and gguf is None:
        raise ExportError("nothing to write: give --out DIR and/or --gguf FILE")
    if out is not None:  # an empty folder made for the export is taken as is
        check_output(out, "--out", "folder", overwrite or (out.is_dir() and not any(out.iterdir())))
    if gguf is not None:
        check_output(gguf, "--gguf", "file", overwrite)
        check_apart({"--out": out}, {}, {"--gguf": gguf})


def export(src: str | os.PathLike, *, skip: str | Sequence[int] | None = None, num_skip: int | None = None,
           out: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
           gguf: str | os.PathLike | None = None, outtype: str | None = None, overwrite: bool = False,
           command: str | None = None, warn: Callable[[str], None] | None = None) -> Exported:
    """Export the student `src` (folder or Hub id) with `skip` removed: a checkpoint folder `out` and/or a GGUF.

    dtype: the exported weights (default: the student's own). outtype: the GGUF's (default: the one that holds
    those weights exactly). warn receives the quality warning for a skip set the student was not trained for.
    """
    out_path = Path(out).expanduser() if out is not None else None
    gguf_path = Path(gguf).expanduser() if gguf is not None else None
    _check_outputs(out_path, gguf_path, overwrite)
    folder = resolve(src)
    check_apart({"--out": out_path, "--gguf": gguf_path}, {"--model": folder})
    if gguf_path is not None:
        require_gguf()  # the optional package, before any work
        if outtype is not None and outtype not in OUTTYPES:
            raise ExportError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    profile = read_skip_profile(folder)
    student_config = Phi3Config.from_json(folder / "config.json")
    L = student_config.num_hidden_layers
    chosen = choose_skip(profile, L, skip, num_skip)  # before the weights load
    if len(chosen) == L:
        raise ExportError(f"--skip removes all {L} layers; keep at least one")
    adapters = profile.get("adapters") if isinstance(profile.get("adapters"), dict) else {}
    if set(chosen) & set(adapters.get("layers") or []):  # bypasses: what deci cannot compute is refused now
        deci.check(student_config, str(adapters.get("form", "parallel")))
    model = from_pretrained(folder)  # in its stored dtype: pruning does not change any weight
    note = quality_note(profile, chosen, L) if chosen else None
    if note:
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(note)
    slots: list[deci.Slot] | None = None
    if deci.bypassed(model, chosen):  # trained bypasses: heterogeneous blocks (llama.cpp's deci)
        state, slots = deci.export_state(model, chosen)
        config = model.config.replace(num_hidden_layers=len(slots))
    else:
        state, config = prune(model.base_state_dict(), model.config, chosen)
    target = parse_dtype(dtype, default=model.lm_head.weight.dtype)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ExportError(f"tensor {bad} is not finite in {dtype_name(target)}"
                          + (" (beyond float16's range): use --dtype bfloat16 or float32" if target == torch.float16 else ""))
    if gguf_path is not None:
        check_config(config)  # before the folder is written
        outtype = outtype or default_outtype(target)
    card = model_card(source=str(src), profile=profile, skip=chosen, config=config, num_layers=L, dtype=target,
                      student_dtype=model.lm_head.weight.dtype, command=command, gguf=gguf_path, outtype=outtype,
                      slots=slots)
    if out_path is not None:
        config_json = None if slots is None else deci.config_dict(model.config, slots, dtype_name(target))
        folder_state = state if slots is None else deci.nvidia_state(state, slots)  # FFNs as readers size them
        save_checkpoint(folder_state, config, out_path, copy_from=folder, files={"README.md": card},
                        config_json=config_json)
    if gguf_path is not None:
        shown = "-".join(map(str, chosen)) or "none"
        common = dict(tokenizer_dir=folder, outtype=outtype, overwrite=overwrite, name=f"{folder.name} skip {shown}")
        if slots is None:
            write_gguf(state, config, gguf_path, **common)
        else:
            write_deci_gguf(state, model.config, slots, gguf_path, **common)
    return Exported(chosen, config.replace(torch_dtype=dtype_name(target)), target, out_path, gguf_path, note, slots)


__all__ = ["export", "prune", "serving_table", "choose_skip", "measurements", "model_card", "ExportError"]
