"""The project's commands called in this process, as the tests that walk every command need them: `entry(name)` is
the function that raises UserError (prepare.py's and train.py's `main`, imported by path once, or
phi3skip.commands.<name>.run) and `module(name)` the module that holds it (to patch the work it starts)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("prepare", "train")  # read as scripts at the top of the repository


def module(command: str) -> ModuleType:
    if command not in SCRIPTS:
        return importlib.import_module(f"phi3skip.commands.{command}")
    name = f"{command}_script"
    if name not in sys.modules:  # registered first: dataclasses look their module up while it executes
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{command}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def entry(command: str) -> Callable[[list[str]], object]:
    m = module(command)
    return m.main if command in SCRIPTS else m.run
