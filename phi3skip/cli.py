"""One-line user errors for every command-line tool.

Library code raises `UserError` (or a subclass) for bad input; a script wraps its `main` in `run_main`,
which prints the message on one line and exits with code 2, with no traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


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
