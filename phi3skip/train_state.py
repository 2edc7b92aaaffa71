"""Resumable training state, written atomically.

A checkpoint is a folder `step-00000120/` in the run's checkpoint folder, holding everything a run needs to
continue exactly where it stopped:

    *.distcp, .metadata   student weights and optimizer state through torch.distributed.checkpoint (DCP): each
                          rank writes its own shards (a run may resume on another number of ranks)
    trainer.pt            scheduler state and the run's position: step, phase, data position, run settings
    rng-<rank>.pt         each rank's RNG states (python, numpy, torch CPU and CUDA)
    meta.json             a readable summary, written last

It is written as `.step-00000120.tmp/`, renamed when complete, and then `latest` is pointed at it (replaced
atomically), so an interrupted save leaves the previous checkpoint as it was. With several nodes the folder
must be on a filesystem that every node sees.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .cli import UserError
from .io import atomic_write_text
from .parallel import Env, barrier, broadcast_object

LATEST = "latest"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (the one `latest` names, else the highest step), or None."""
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save(folder: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, trainer: dict[str, Any], env: Env, keep: int = 2) -> Path:
    """Write a checkpoint of every rank's state at `step` (all ranks call this); returns its folder.

    `trainer` is the run's position and settings (plain Python values). Keeps the newest `keep` checkpoints.
    """
    folder = Path(folder)
    name = checkpoint_name(step)
    final = folder / name
    tmp = folder / f".{name}.tmp"
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(env)
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # DCP warns that one process means no process group: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not env.distributed)
    torch.save(rng_state(), tmp / f"rng-{env.rank}.pt")
    barrier(env)
    if env.is_main:
        torch.save({"trainer": trainer, "scheduler": scheduler.state_dict(), "world_size": env.world_size},
                   tmp / "trainer.pt")
        summary = {"step": step, "world_size": env.world_size,
                   **{k: v for k, v in trainer.items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
        atomic_write_text(tmp / "meta.json", json.dumps(summary, indent=2) + "\n")
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(folder / LATEST, name + "\n")
        for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def read_trainer(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (step, phase, settings, ...) of a checkpoint, without loading any weights."""
    return _read(Path(path))["trainer"]


def _read(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "trainer.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); resume from another one "
                        f"or start without --resume") from None


def load(path: str | os.PathLike, model: nn.Module, env: Env, optimizer: torch.optim.Optimizer | None = None,
         scheduler: Any = None) -> dict[str, Any]:
    """Restore model weights (and optimizer, scheduler, RNG when given) from a checkpoint; returns `trainer`.

    Every rank calls this. RNG states are restored when the checkpoint has one for this rank.
    """
    path = Path(path)
    saved = broadcast_object(_read(path) if env.is_main else None, env)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not env.distributed)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    rng = path / f"rng-{env.rank}.pt"
    if rng.is_file() and saved["world_size"] == env.world_size:
        set_rng_state(torch.load(rng, weights_only=False))
    return saved["trainer"]
