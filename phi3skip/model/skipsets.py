"""Layer lists and skip sets: the one command-line syntax for them, and the rules a set must follow.

Every command reads layer lists through `parse_layer_list`:

    30,28        layer indices, in the given order (spaces and empty items are ignored)
    none, ''     no layer (where a skip set is asked for)
    first:K      the first K layers of the student's trained order (skip.json's "layers"), so nobody copies
                 layer numbers
    a;b;c        several skip sets (`parse_skip_sets`: scripts/evaluate.py --skip-sets, export's --skip)

`--layers auto` (train.py) is decided by train.py before it reaches `parse_layers`. Ranges are checked against
the model once, when a `SkipSet` is made (`validate_skip`); a SkipSet then passes through unchecked.
"""
from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Iterable, NamedTuple, NoReturn, Sequence

from ..core.cli import Range, UserError, check_range


class InvalidSkip(UserError, ValueError):
    """A skip set that names no valid set of layers."""


class SkipSet(frozenset):
    """A skip set as a value: distinct layer indices of a model with `num_layers` layers, checked when it is made.

    Make one where a set is parsed or built (`SkipSet.of`, `validate_skip`); the model's forward, the Generator's
    decode step and every library function take it as it is (`of` returns a SkipSet of the same model unchanged),
    and anything else they are given is checked there, once. It is a frozenset: `i in skip`, set algebra and
    equality are a set's."""

    num_layers: int

    def __new__(cls, skip: Iterable[int] | None, num_layers: int) -> SkipSet:
        self = super().__new__(cls, _checked(skip, num_layers))
        self.num_layers = num_layers
        return self

    @classmethod
    def of(cls, skip: Iterable[int] | None, num_layers: int) -> SkipSet:
        """`skip` itself when it is already a SkipSet of a `num_layers`-layer model, else a checked new one."""
        if isinstance(skip, SkipSet) and skip.num_layers == num_layers:
            return skip
        return cls(skip, num_layers)

    def __reduce__(self):
        return SkipSet, (tuple(sorted(self)), self.num_layers)

    def __repr__(self) -> str:
        return f"SkipSet({sorted(self, reverse=True)}, num_layers={self.num_layers})"


def _checked(skip: Iterable[int] | None, num_layers: int) -> list[int]:
    """Integers in [0, num_layers), no duplicates; InvalidSkip naming the range otherwise."""
    if skip is None:
        return []
    valid = f"layer indices are integers in 0..{num_layers - 1}"
    if isinstance(skip, (str, bytes)) or not isinstance(skip, Iterable):
        raise InvalidSkip(f"skip must be a collection of layer indices, got {skip!r}; {valid}")
    out: list[int] = []
    for s in skip:
        if isinstance(s, bool):
            raise InvalidSkip(f"skip index {s!r} is not an integer; {valid}")
        try:
            i = operator.index(s)
        except TypeError:
            raise InvalidSkip(f"skip index {s!r} is not an integer; {valid}") from None
        if not 0 <= i < num_layers:
            raise InvalidSkip(f"skip index {i} is out of range; {valid}")
        out.append(i)
    if len(set(out)) != len(out):
        raise InvalidSkip(f"skip {sorted(out)} names a layer twice; {valid}")
    return out


def validate_skip(skip: Iterable[int] | None, num_layers: int) -> SkipSet:
    """A checked skip set (`SkipSet.of`): raises InvalidSkip naming the range."""
    return SkipSet.of(skip, num_layers)


# The greedy order's (phi3skip.eval.importance.greedy_order) default shortlist: candidates re-scored per pick after
# the first (SmolLM2, 1,024 tokens: 6 gave the full order).
SHORTLIST = 8


def default_layers(num_layers: int) -> list[int]:
    """Every other layer counting down from the second-to-last: L-2, L-4, ..., down to 0 or 1."""
    return list(range(num_layers - 2, -1, -2))


def parse_layer_list(text: str, flag: str, trained: Sequence[int] | None = None,
                     example: str = "30,28,26") -> tuple[int, ...]:
    """The one parser: comma-separated layer indices; with `trained` (a skip set: the trained order, possibly
    empty) also 'none' or '' (no layer) and 'first:K'. `flag` and `example` are for error messages."""
    raw = text
    if trained is not None:
        text = text.strip().lower()
        if text in ("", "none"):
            return ()
        if text.startswith("first:"):
            k = text.split(":", 1)[1]
            if not trained:
                raise UserError(f"{flag} {text}: this model has no trained skip order (skip.json); name the layers")
            if not k.isdigit() or not 0 <= int(k) <= len(trained):
                raise UserError(f"{flag} {text}: K must be in 0..{len(trained)}, the length of the trained order "
                                f"{','.join(map(str, trained))}")
            return tuple(trained[:int(k)])
    try:
        return tuple(int(s) for s in text.replace(" ", "").split(",") if s != "")
    except ValueError:
        if trained is None:
            raise UserError(f"{flag} {raw!r}: expected comma-separated layer indices like {example}") from None
        raise UserError(f"{flag} {text!r}: expected layer indices like 30,28, first:K (the first K of the "
                        f"trained order) or none") from None


def parse_skip(text: str | None, trained: Sequence[int] = (), flag: str = "--skip") -> tuple[int, ...]:
    """A skip set from the command line: '30,28'; 'none' or '' (skip nothing); 'first:K', the first K layers of
    the trained order `trained` (skip.json's). Ranges are checked later, against the model (`validate_skip`)."""
    return parse_layer_list("" if text is None else text, flag, tuple(trained))


def skip_prefixes(layers: Sequence[int]) -> list[tuple[int, ...]]:
    """(), (l1,), (l1, l2), ...: every skip set a user may pick from a trained list."""
    return [tuple(layers[:k]) for k in range(len(layers) + 1)]


def parse_skip_sets(text: str, layers: Sequence[int], flag: str = "--skip-sets") -> list[tuple[int, ...]]:
    """'prefixes' (every prefix of `layers`) or sets '30,28;first:2;none' (see `parse_skip`); the full model is
    always first. `flag` names the option in error messages."""
    if text.strip() == "prefixes":
        return skip_prefixes(layers)
    sets: list[tuple[int, ...]] = []
    for part in text.split(";"):
        s = parse_skip(part, layers, flag)
        if s not in sets:
            sets.append(s)
    return [()] + [s for s in sets if s]  # the full model first: the baseline every speedup is against


def parse_layers(text: str | Sequence[int] | None, num_layers: int, num_skip: int | None = None) -> list[int]:
    """`--layers 30,28,26` (or None for the default), checked, optionally cut to the first `num_skip`."""
    if text is None or text == "":
        layers = default_layers(num_layers)
    elif isinstance(text, str):
        example = ",".join(map(str, default_layers(num_layers)[:3]))
        layers = list(parse_layer_list(text, "--layers", example=example))
    else:
        layers = list(text)
    if not layers:
        raise UserError(f"--layers names no layer; give indices in 0..{num_layers - 1}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"--layers: layer {bad[0]} is out of range; this model has layers 0..{num_layers - 1}")
    seen = {i for i in layers if layers.count(i) > 1}
    if seen:
        raise UserError(f"--layers names layer {min(seen)} more than once")
    if num_skip is not None:
        if not 1 <= num_skip <= len(layers):
            raise UserError(f"--num-skip {num_skip}: must be in 1..{len(layers)} (the number of candidate layers)")
        layers = layers[:num_skip]
    return layers


def untrained(skip: Iterable[int], trained: Sequence[int]) -> list[int]:
    """The layers of `skip` that training did not make skippable (skipping them is the naive skip)."""
    return sorted(set(skip) - set(trained), reverse=True)


# Tokens drafted per round: a whole draft is accepted with probability about a^K (a, one token's acceptance; the
# best measured K is 2-6, docs/benchmarks.md), while every drafted token costs a draft pass and widens the verify.
LOOKAHEAD = Range(1, 32)


def check_draft_skip(skip: Sequence[int] | None, draft_skip: Sequence[int], num_layers: int,
                     lookahead: int = 1) -> SkipSet:
    """Self-speculative decoding's draft skip set, checked: valid layers, every layer the verifier skips, and at
    least one more; and the lookahead (drafts per round) an integer >= 1."""
    skipped = validate_skip(skip, num_layers)
    d = validate_skip(draft_skip, num_layers)
    missing = skipped - d
    if missing:
        raise UserError(f"the draft skip set must include every layer that --skip skips; it lacks "
                        f"{','.join(map(str, sorted(missing, reverse=True)))}")
    if d == skipped:
        raise UserError("the draft skip set must skip more layers than --skip (the verifier)")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int):
        raise UserError(f"lookahead must be an integer, got {lookahead!r}")
    check_range("lookahead", lookahead, LOOKAHEAD)
    return d


def default_draft_skip(trained: Sequence[int], skip: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The verifier's skips plus the student's trained order when there is one, else plus every other layer
    of the upper half (the last layer always runs)."""
    extra = [i for i in trained if 0 <= i < num_layers]
    if not [i for i in extra if i not in skip]:
        extra = list(range(num_layers - 2, num_layers // 2 - 1, -2))
    return tuple(sorted(set(skip) | set(extra), reverse=True))


def measured_speculative(profile: dict) -> tuple[tuple[int, ...], int | None, dict]:
    """skip.json's "speculative" entry (written by `benchmarks/bench_generate.py --record`): the draft skip set
    and lookahead that decoded fastest there, and its measured speedups; ((), None, {}) when absent or malformed."""
    entry = profile.get("speculative")
    try:
        draft = tuple(int(i) for i in entry["draft_skip"])
        lookahead = int(entry["lookahead"])
        speedup = {str(k): float(v) for k, v in dict(entry.get("speedup", {})).items()}
    except (KeyError, TypeError, ValueError):
        return (), None, {}
    return (draft, lookahead, speedup) if lookahead >= 1 else ((), None, {})


# What skip.json's "adapters" may name (phi3skip.model.bypass takes them from here: one list)
KIND = "bypass"
FORMS = ("sequential", "parallel")


# skip.json: every field checked once, where it is read (phi3skip.formats.checkpoints.read_skip_profile) -------------
class ProfileShape(NamedTuple):
    """The model a skip.json describes: the bounds of its layer indices and bypass sizes (None: not known)."""

    num_layers: int | None = None
    hidden: int | None = None
    intermediate: int | None = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_profile(obj: dict, where: str, shape: ProfileShape = ProfileShape()) -> dict:
    """skip.json's fields, each of its type and range (one line naming the file and the field, else `obj` as is).
    Fields this phi3skip does not know are kept and not read."""

    def bad(field: str, want: str, got: object) -> NoReturn:
        raise UserError(f"{where}: field {field!r} must be {want}, got {json.dumps(got)[:80]}; fix or delete the "
                        f"field, or re-save the student (train.py, scripts/evaluate.py)")

    def integer(field: str, v: object, low: int, high: int | None = None, note: str = "") -> int:
        if not _is_int(v) or v < low or (high is not None and v > high):
            bad(field, (f"an integer {low}..{high}" if high is not None else f"an integer, {low} or more") + note, v)
        return v

    def layer_list(field: str, v: object, empty: bool = True) -> None:
        n = shape.num_layers
        if not isinstance(v, list) or (not v and not empty) or not all(_is_int(i) for i in v) \
                or len(set(v)) != len(v) or any(i < 0 or (n is not None and i >= n) for i in v):
            bad(field, f"a list of distinct layer indices{f' 0..{n - 1}' if n else ''}" + ("" if empty else
                                                                                            ", not empty"), v)

    def number(field: str, v: object, none: bool = True) -> None:
        if not (_is_number(v) or (none and v is None)):
            bad(field, "a finite number" + (" or null" if none else ""), v)

    def kind(field: str, v: object, t: type, what: str) -> None:
        if not isinstance(v, t) or isinstance(v, bool) and t is not bool:
            bad(field, what, v)

    h = shape.hidden
    for key, t, what in (("teacher", str, "a string"), ("schedule", str, "a string"), ("weights_dtype", str,
                         "a string"), ("train_scope", str, "a string"), ("perplexity", dict, "an object"),
                         ("evaluation", dict, "an object"), ("speculative", dict, "an object"),
                         ("adapters", dict, "an object")):
        if key in obj and obj[key] is not None:
            kind(key, obj[key], t, what)
    if "layers" in obj and obj["layers"] is not None:
        layer_list("layers", obj["layers"])
    for key in ("steps", "val_tokens"):
        if obj.get(key) is not None:
            integer(key, obj[key], 0)
    ppl = obj.get("perplexity") or {}
    for key in ("student", "teacher"):
        number(f"perplexity.{key}", ppl.get(key))
    prefixes = ppl.get("prefixes")
    if prefixes is not None:
        if not isinstance(prefixes, list) or not all(isinstance(p, dict) for p in prefixes):
            bad("perplexity.prefixes", "a list of objects", prefixes)
        for i, p in enumerate(prefixes):
            layer_list(f"perplexity.prefixes[{i}].skip", p.get("skip", []))
            number(f"perplexity.prefixes[{i}].perplexity", p.get("perplexity"))
    a = obj.get("adapters")
    if a is not None:
        for key in ("file", "kind", "form"):
            if key in a:
                kind(f"adapters.{key}", a[key], str, "a string")
        if Path(str(a.get("file", "x"))).name != str(a.get("file", "x")) or a.get("file") in ("", ".", ".."):
            bad("adapters.file", "a file name inside the student's folder", a.get("file"))
        if a.get("kind") != KIND:
            bad("adapters.kind", f"{KIND!r} (the only kind this phi3skip knows)", a.get("kind"))
        if a.get("form", "parallel") not in FORMS:
            bad("adapters.form", " or ".join(map(repr, FORMS)), a.get("form"))
        rank = integer("adapters.rank", a.get("rank"), 0, h, " (0: no map; at most the hidden size)")
        mlp = integer("adapters.mlp", a.get("mlp", 0), 0, shape.intermediate, " (at most the MLP width)")
        integer("adapters.depth_rank", a.get("depth_rank", 0), 0, h, " (at most the hidden size)")
        if not rank and not mlp:
            bad("adapters.rank", "above 0 where adapters.mlp is 0 (a bypass that runs nothing)", rank)
        layer_list("adapters.layers", a.get("layers"), empty=False)
    ev = obj.get("evaluation") or {}
    results = ev.get("results", [])
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        bad("evaluation.results", "a list of objects", results)
    for i, r in enumerate(results):
        layer_list(f"evaluation.results[{i}].skip", r.get("skip") or [])
        number(f"evaluation.results[{i}].tokens_per_s", r.get("tokens_per_s"))
        for who in ("student", "teacher"):
            by = r.get(who) or {}
            if not isinstance(by, dict) or not all(isinstance(v, dict) for v in by.values()):
                bad(f"evaluation.results[{i}].{who}", "an object of perplexities by dataset", by)
            for data, v in by.items():
                for key in ("ppl", "low", "high"):
                    number(f"evaluation.results[{i}].{who}.{data}.{key}", v.get(key))
                if v.get("tokens") is not None:
                    integer(f"evaluation.results[{i}].{who}.{data}.tokens", v["tokens"], 0)
    spec = obj.get("speculative")
    if spec is not None:
        layer_list("speculative.draft_skip", spec.get("draft_skip"))
        integer("speculative.lookahead", spec.get("lookahead"), int(LOOKAHEAD.low), int(LOOKAHEAD.high))
        speedup = spec.get("speedup", {})
        if not isinstance(speedup, dict) or not all(_is_number(v) and v > 0 for v in speedup.values()):
            bad("speculative.speedup", "an object of positive numbers", speedup)
    return obj
