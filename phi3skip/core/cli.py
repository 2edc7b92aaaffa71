"""One-line user errors for every command-line tool.

Library code raises `UserError` (or a subclass) for bad input; a script wraps its `main` in `run_main`,
which prints the message on one line and exits with code 2, with no traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Mapping, NamedTuple, NoReturn


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_main(main: Callable[[], object]) -> None:
    """Run a command-line entry point: `UserError` -> one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError: one line (what is wrong, and --help for the rest), exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")  # run_main prints it and exits 2


# Numbers: every numeric flag has a range, checked before any work ------------------------------------------------
class Range(NamedTuple):
    """low <= value <= high (strictly with `above`, `below`); a bound of None is open. NaN and infinities never are."""

    low: float | None = None
    high: float | None = None
    above: bool = False  # value > low
    below: bool = False  # value < high
    note: str = ""  # where a bound comes from, e.g. "the model's positions"

    def holds(self, value: float) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.above else value >= self.low
        return ok and (self.high is None or (value < self.high if self.below else value <= self.high))

    def describe(self) -> str:
        lo, hi = (f"{b:,}" if isinstance(b, int) else f"{b:g}" if b is not None else None for b in (self.low, self.high))
        if self.below:
            return f"at least {lo} and below {hi}"
        if self.above:
            return "positive" if self.low == 0 and hi is None else f"above {lo}" + (f" and at most {hi}" if hi else "")
        if hi is None:
            return "0 or more" if self.low == 0 else f"at least {lo}"
        if lo is None:
            return f"at most {hi}"
        ints = all(isinstance(b, int) for b in (self.low, self.high))
        return f"in {lo}..{hi}" if ints else f"between {lo} and {hi}"


def check_range(flag: str, value: Any, allowed: Range) -> None:
    """The one rule for a number a user gives: None (not given) passes; anything outside `allowed` is one line.
    A flag that takes several numbers (nargs) is checked number by number."""
    if isinstance(value, (list, tuple)):
        for v in value:
            check_range(flag, v, allowed)
        return
    if value is not None and not allowed.holds(value):
        what = allowed.describe() if not isinstance(value, float) or math.isfinite(value) else "a finite number"
        raise UserError(f"{flag} must be {what}{f' ({allowed.note})' if allowed.note else ''}, got {value}")


def check_ranges(settings: object, ranges: Mapping[str, Range]) -> None:
    """`check_range` for each `--flag: Range` of a command's table, the flag's value read from `settings` by its
    field name (argparse's dest: `--max-seq-len` -> `max_seq_len`), a parsed command line or a settings dataclass."""
    for flag, allowed in ranges.items():
        check_range(flag, getattr(settings, flag.lstrip("-").replace("-", "_")), allowed)
