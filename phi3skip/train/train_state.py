"""Resumable training state, written atomically, read without running anything it holds.

A checkpoint is a folder `step-00000120/` in the run's checkpoint folder, holding everything a run needs to
continue exactly where it stopped:

    *.distcp, .metadata   student weights and optimizer tensors through torch.distributed.checkpoint (DCP): each
                          rank writes its own shards (a run may resume on another number of ranks)
    trainer.json          the run's position and settings, the scheduler state, the optimizer's hyperparameters
    rng-<rank>.json       each rank's RNG states (python, numpy, torch CPU and CUDA)
    meta.json             a readable summary, written last

Nothing read back can execute code: JSON for the small files, tensors only through DCP (`weights_only` loads),
and DCP's pickled `.metadata` through an unpickler that builds nothing but DCP's own metadata classes.

It is written as a temporary sibling, renamed when complete, and then `latest` is pointed at it (replaced
atomically), so an interrupted save leaves the previous checkpoint as it was. With several nodes the folder
must be on a filesystem that every node sees. `resumable` skips damaged checkpoints, newest first.

On top of these functions, as torchtitan's checkpoint manager over its `Stateful` objects: `RunSettings` (what a
checkpoint is only valid for, compared field by field on resume), `TrainState` (the run's position, with
`state_dict`/`load_state_dict`) and `CheckpointManager` (when to save, which checkpoint to resume from, and the
one restore before the loop).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..core.cli import UserError
from ..core.distributed import Env, barrier, broadcast_object
from ..core.paths import atomic_write_text, clean_stale, publish, remove, temp_sibling

log = logging.getLogger("phi3skip.train_state")

LATEST = "latest"
PREFIX = "step-"
TRAINER = "trainer.json"
METADATA = ".metadata"  # DCP's file name


class CheckpointDamaged(UserError):
    """A checkpoint piece that is missing, truncated or not what it should be."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# RNG states as JSON ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path.name} is unreadable ({type(e).__name__})") from None


def _read_rng(path: Path) -> dict[str, Any]:
    """A rank's RNG states, checked by restoring them (then this process's own again): whatever set_rng_state would
    refuse, a wrong shape or kind anywhere, fails here, while the checkpoint can still be skipped."""
    state = _read_json(path)
    mine = rng_state()
    try:
        assert all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in state["torch"])
        set_rng_state(state)
    except Exception:  # noqa: BLE001 - any failure of a restore is damage
        raise CheckpointDamaged(f"{path.name} does not hold RNG states") from None
    finally:
        set_rng_state(mine)
    return state


# DCP's metadata, unpickled safely -----------------------------------------------------------------------------------
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and sizes, paths; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_metadata(path: Path) -> Any:
    try:
        with open(path / METADATA, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointDamaged(f"{METADATA} is missing") from None
    except Exception as e:  # truncated, garbage, or a pickle that asks for something else: never run
        raise CheckpointDamaged(f"{METADATA} is unreadable ({type(e).__name__}: {str(e)[:80]})") from None


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _TensorsOnly(DefaultLoadPlanner):
    """Our checkpoints hold tensors only; DCP would unpickle any other entry with weights_only=False."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointDamaged(f"unexpected non-tensor entry {read_item.dest_index.fqn}")


# Which checkpoints there are ------------------------------------------------------------------------------------
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
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        path = folder / name
        if Path(name).name == name and name.startswith(PREFIX) and (path / "meta.json").is_file():  # in `folder` only
            return path
    found = list_checkpoints(folder)
    return found[-1] if found else None


def verify(path: str | os.PathLike) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when every piece is there and readable: the JSON files
    parse, DCP's metadata unpickles safely, and every shard it names exists and is long enough."""
    path = Path(path)
    try:
        if (path / "trainer.pt").exists() and not (path / TRAINER).exists():
            return "written by an older phi3skip as pickles (trainer.pt), which are not read: they could run code"
        saved = _read_json(path / TRAINER)
        why = trainer_problem(saved)
        if why is not None:
            return f"{TRAINER}: {why}"
        for rank in range(saved["world_size"]):
            _read_rng(path / f"rng-{rank}.json")
        need: dict[str, int] = {}
        for info in read_metadata(path).storage_data.values():
            name = str(info.relative_path)
            if Path(name).name != name:
                return f"{METADATA} names a file outside the checkpoint ({name})"
            need[name] = max(need.get(name, 0), info.offset + info.length)
        for name, size in sorted(need.items()):
            if not (path / name).is_file():
                return f"{name} is missing"
            if (path / name).stat().st_size < size:
                return f"{name} is truncated"
    except CheckpointDamaged as e:
        return str(e)
    except (OSError, AttributeError, TypeError, ValueError, KeyError) as e:
        return f"unreadable ({type(e).__name__})"
    return None


def _number(v: Any, low: float = -math.inf, positive: bool = False) -> bool:
    """A finite JSON number (not a boolean) >= low (> 0 when positive)."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low
            and (v > 0 or not positive))


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def trainer_problem(saved: Any) -> str | None:
    """What is missing or absurd in a trainer.json, or None: every field a resume reads, of the kind it needs, so
    that a damaged file is found while the checkpoint can be skipped, not after the weights load."""
    if not (isinstance(saved, dict) and {"trainer", "scheduler", "param_groups", "world_size"} <= saved.keys()):
        return "lacks the run's state"
    if not (_count(saved["world_size"]) and saved["world_size"] >= 1):
        return f"world_size is {saved['world_size']!r:.40}"
    t = saved["trainer"]
    if not isinstance(t, dict) or not _count(t.get("step")) or not _count(t.get("total_steps")):
        return "trainer lacks its step"
    if t["step"] > t["total_steps"] or not (t.get("phase") is None or _count(t.get("phase"))):
        return f"trainer's step {t['step']} of {t['total_steps']} or phase {t.get('phase')!r:.20} is absurd"
    if not (t.get("teacher_ppl") is None or _number(t["teacher_ppl"], positive=True)):
        return f"teacher_ppl is {t['teacher_ppl']!r:.40}"
    why = RunSettings.problem(t.get("settings"))
    if why is not None:
        return why
    groups, sched = saved["param_groups"], saved["scheduler"]
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, dict) and _number(g.get("lr"), 0) and isinstance(g.get("params"), list) for g in groups)):
        return "param_groups are not optimizer groups with a learning rate"
    if not (isinstance(sched, dict) and all(
            isinstance(sched.get(k, []), list) and all(_number(v, 0) for v in sched.get(k, []))
            for k in ("base_lrs", "_last_lr"))):
        return "scheduler is not a learning-rate schedule's state"
    return None


SAFE_TORCH = (2, 6)  # torch.load(weights_only=True), which DCP reads tensors with, can run code before 2.6


def require_safe_torch() -> None:
    """Refuse to read a checkpoint with a torch whose weights_only loads are not safe (CVE-2025-32434)."""
    if torch.torch_version.TorchVersion(torch.__version__) < SAFE_TORCH:
        raise UserError(f"torch {torch.__version__} cannot read checkpoints safely (its weights_only loads can run "
                        f"code, CVE-2025-32434); install torch>={'.'.join(map(str, SAFE_TORCH))}")


def resumable(folder: str | os.PathLike, env: Env) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint, and the newer damaged ones with the reason (checked on rank 0, agreed by all)."""
    require_safe_torch()
    found = None
    if env.is_main:
        damaged = []
        for path in reversed(list_checkpoints(folder)):
            why = verify(path)
            if why is None:
                found = (str(path), [(str(p), w) for p, w in damaged])
                break
            damaged.append((path, why))
        else:
            found = (None, [(str(p), w) for p, w in damaged])
    path, damaged = broadcast_object(found, env)
    return (Path(path) if path else None), [(Path(p), w) for p, w in damaged]


# Saving and loading ---------------------------------------------------------------------------------------------
def save(folder: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, trainer: dict[str, Any], env: Env, keep: int = 2) -> Path:
    """Write a checkpoint of every rank's state at `step` (all ranks call this); returns its folder.

    `trainer` is the run's position and settings (plain Python values). Keeps the newest `keep` checkpoints.
    """
    folder = Path(folder)
    name = checkpoint_name(step)
    final = folder / name
    tmp = None
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(folder, f"{PREFIX}*")  # the temporaries of saves killed with -9
        tmp = temp_sibling(final)
        tmp.mkdir()
    tmp = Path(broadcast_object(str(tmp) if tmp else None, env))
    optim = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optim": optim["state"]}  # tensors only
    with warnings.catch_warnings():  # DCP warns that one process means no process group: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not env.distributed)
    atomic_write_text(tmp / f"rng-{env.rank}.json", json.dumps(rng_state()))
    barrier(env)
    if env.is_main:
        saved = {"trainer": trainer, "scheduler": scheduler.state_dict(), "param_groups": optim["param_groups"],
                 "world_size": env.world_size}
        atomic_write_text(tmp / TRAINER, json.dumps(saved, indent=1) + "\n")
        summary = {"step": step, "world_size": env.world_size,
                   **{k: v for k, v in trainer.items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
        atomic_write_text(tmp / "meta.json", json.dumps(summary, indent=2) + "\n")
        publish(tmp, final)  # the same step saved again (a resumed run) replaces it
        atomic_write_text(folder / LATEST, name + "\n")
        for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            if old != final:
                remove(old)  # a checkpoint that is a symlink loses the link only
    barrier(env)
    return final


def read_trainer(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (step, phase, settings, ...) of a checkpoint, without loading any weights."""
    return _read(Path(path))["trainer"]


def _read(path: Path) -> dict[str, Any]:
    try:
        return _read_json(path / TRAINER)
    except CheckpointDamaged as e:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {e}; delete it to resume from the one before, "
                                f"or start without --resume") from None


def _reason(e: BaseException) -> str:
    """One line for a failed load: the first rank's own error rather than DCP's wrapper and its tracebacks."""
    failures = getattr(e, "failures", None)
    if isinstance(e, dcp.CheckpointException) and failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, CheckpointDamaged):
        return str(e)
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:100]}" if first else type(e).__name__


def _scaled(groups: list[dict[str, Any]], scale: float) -> list[dict[str, Any]]:
    return [{**g, **{k: g[k] * scale for k in ("lr", "initial_lr") if k in g}} for g in groups]


def held_states(template: dict[str, Any], path: Path) -> dict[str, Any]:
    """The parameters of an optimizer state dict (FQN -> its states) whose states the checkpoint at `path` holds.
    A parameter that had never had a gradient when it was saved (a skip depth the schedule had not drawn yet,
    a bypass a sequential phase does not reach) has none, and resumes with none, as in the run that went on."""
    keys = read_metadata(path).state_dict_metadata.keys()
    return {fqn: s for fqn, s in template.items() if any(f"optim.{fqn}.{k}" in keys for k in s)}


def load(path: str | os.PathLike, model: nn.Module, env: Env, optimizer: torch.optim.Optimizer | None = None,
         scheduler: Any = None, lr_scale: float = 1.0) -> dict[str, Any]:
    """Restore model weights (and optimizer, scheduler, RNG when given) from a checkpoint; returns `trainer`.

    Every rank calls this. RNG states are restored when the checkpoint has one for this rank. `lr_scale`
    multiplies the restored learning rates (a run resumed with a lower --lr).
    """
    require_safe_torch()
    path = Path(path)
    saved = broadcast_object(_read(path) if env.is_main else None, env)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    try:
        if optimizer is not None:
            state["optim"] = held_states(get_optimizer_state_dict(model, optimizer)["state"], path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=_SafeReader(path), planner=_TensorsOnly(), no_dist=not env.distributed)
        rng = _read_rng(path / f"rng-{env.rank}.json") if saved["world_size"] == env.world_size else None
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, {"state": state["optim"],
                                                        "param_groups": _scaled(saved["param_groups"], lr_scale)},
                                     options=StateDictOptions(strict=False))  # stateless parameters: held_states
            if scheduler is not None:
                sched = dict(saved["scheduler"])
                for k in ("base_lrs", "_last_lr"):
                    if k in sched:
                        sched[k] = [lr * lr_scale for lr in sched[k]]
                scheduler.load_state_dict(sched)
        if rng is not None:
            set_rng_state(rng)
    except (Exception, dcp.CheckpointException) as e:  # DCP gathers every rank's failure, raised on all of them
        # verify() found nothing wrong, so this is damage it cannot see (e.g. the optimizer's groups)
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({_reason(e)}); delete it to resume from the one "
                                f"before, or start without --resume") from None
    return saved["trainer"]


# The run's state and the checkpoint manager --------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """The settings a run's checkpoints hold it to: resuming with any other value would not continue the same
    run, except a lower `lr` (how a run that diverged continues from its last good checkpoint)."""

    model: str
    data: str
    layers: tuple[int, ...]
    schedule: str
    lr: float
    steps_per_phase: int
    global_batch: int
    max_seq_len: int
    grad_accum: int
    temperature: float
    kd_weight: float
    ce_weight: float
    train_scope: str
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    seed: int
    k_dist: str
    adapter_rank: int | None
    adapter_mlp: int | None
    lsq_tokens: int
    align_weight: float | None = None  # None: no alignment (so runs saved before it existed match)
    depth_rank: int | None = None  # None: no per-depth deltas (likewise)
    # The data's identity, not just its paths (None in checkpoints made before they were recorded: refused):
    data_files: tuple[str, ...] | None = None  # "REALPATH sha256:..." per --data folder, the fingerprint of its tokens
    data_weights: tuple[float, ...] | None = None  # a blend's --data-weights exactly as given (None: one folder)
    blend_pattern: str | None = None  # the blend's interleaving: the source of each sequence of a period

    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # as JSON holds it

    @classmethod
    def problem(cls, saved: Any) -> str | None:
        """Why a checkpoint's settings cannot be compared with a run's (a field missing or of another kind, a learning
        rate that is not positive), or None. Any other value only has to equal this run's (`mismatch`)."""
        if not isinstance(saved, dict):
            return "no settings"
        for f in fields(cls):
            kind = f.type.removesuffix(" | None")
            if f.name not in saved:
                if f.default is MISSING:
                    return f"settings lack {f.name}"
                continue
            v = saved[f.name]
            ok = {"str": lambda: isinstance(v, str), "int": lambda: _number(v) and isinstance(v, int),
                  "float": lambda: _number(v), "tuple[int, ...]": lambda: isinstance(v, list) and all(
                      _number(i) and isinstance(i, int) for i in v),
                  "tuple[float, ...]": lambda: isinstance(v, list) and all(_number(i) for i in v),
                  "tuple[str, ...]": lambda: isinstance(v, list) and all(isinstance(i, str) for i in v)}[kind]()
            if not (ok or v is None and kind != f.type):
                return f"settings field {f.name} is {v!r:.40}"
        if not _number(saved["lr"], positive=True):
            return f"settings field lr is {saved['lr']!r}"
        return None

    def mismatch(self, saved: Mapping[str, Any]) -> str | None:
        """The first field whose value in `saved` (a checkpoint's settings) is not this run's, or None."""
        mine = self.state_dict()
        for k in (f.name for f in fields(self)):
            if saved.get(k) != mine[k] and not (k == "lr" and mine[k] < saved[k]):
                return k
        return None

    def data_change(self, saved: Mapping[str, Any]) -> str | None:
        """How the checkpoint's data (`saved`, its settings) differs from this run's, as the end of a sentence that
        begins with the checkpoint, or None: the folders, then each folder's tokens, then the blend."""
        fix = "resume with the original data, or start a new run (another --ckpt-dir)"
        if saved.get("data_files") is None and self.data_files is not None:
            return ("records no fingerprint of its data (it was made before runs recorded one), so its tokens cannot "
                    "be checked; start a new run (another --ckpt-dir)")
        old = dict(f.rsplit(" ", 1) for f in saved.get("data_files") or [])
        new = dict(f.rsplit(" ", 1) for f in self.data_files or [])
        if list(old) != list(new):
            return f"was made on --data {' '.join(old)}, this run names {' '.join(new)}; {fix}"
        for path, fp in new.items():
            if old[path] != fp:
                return (f"was made on other tokens in --data {path} (fingerprint {old[path][7:19]}..., now "
                        f"{fp[7:19]}...: re-made by prepare.py?); {fix}")
        if saved.get("data_weights") != self.state_dict()["data_weights"]:
            shown = lambda w: " ".join(map(repr, w)) if w else "(none)"  # noqa: E731 - exact, as given
            return (f"was made with --data-weights {shown(saved.get('data_weights'))}, this run has "
                    f"{shown(self.data_weights)}; give the run's weights exactly, or start a new run (another "
                    f"--ckpt-dir)")
        if saved.get("blend_pattern") != self.blend_pattern:
            return f"interleaves its blend in another pattern (made by another version of phi3skip?); {fix}"
        return None


DATA_FIELDS = ("data", "data_files", "data_weights", "blend_pattern")  # a difference in them: `data_change` says which


class SettingsMismatch(UserError):
    pass


@dataclass
class TrainState:
    """The run's position and what it measured so far: the part of a checkpoint that is not tensors."""

    settings: RunSettings
    total_steps: int
    batches_per_epoch: int  # micro-batches of train.bin per epoch, for the readable data position
    step: int = 0  # optimizer steps done
    phase: int | None = None  # the phase whose optimizer is live (None: none yet)
    teacher_ppl: float | None = None

    def state_dict(self) -> dict[str, Any]:
        position = self.step * self.settings.grad_accum  # micro-batches read
        return dict(step=self.step, phase=self.phase, settings=self.settings.state_dict(),
                    teacher_ppl=self.teacher_ppl, data_position=position,
                    epoch=position // self.batches_per_epoch, total_steps=self.total_steps)

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Take a checkpoint's position; refuse one made with other settings (SettingsMismatch names the field)."""
        k = self.settings.mismatch(saved["settings"])
        if k in DATA_FIELDS and (why := self.settings.data_change(saved["settings"])):
            raise SettingsMismatch(why)
        if k is not None:
            raise SettingsMismatch(f"was made with {k}={saved['settings'].get(k)!r}, this run has "
                                   f"{self.settings.state_dict()[k]!r}; use the same settings (a lower --lr is "
                                   f"allowed) or another --ckpt-dir")
        self.step, self.phase, self.teacher_ppl = saved["step"], saved["phase"], saved.get("teacher_ppl")


class CheckpointManager:
    """Saves a run every `every` steps (and when asked), and resumes it: the newest intact checkpoint is chosen
    (newer damaged ones are reported and skipped), its TrainState read before any weights load, and the tensors
    and RNG restored once, before the loop. Every rank makes the same calls."""

    def __init__(self, folder: str | os.PathLike, env: Env, every: int = 0, keep: int = 2):
        self.folder, self.env, self.every, self.keep = Path(folder), env, every, keep
        self.resume_from: Path | None = None  # the checkpoint this run continues
        self.last: Path | None = None  # the newest checkpoint of this run: written, or resumed from
        self.lr_scale = 1.0  # this run's lr over the checkpoint's

    def resume(self, state: TrainState) -> None:
        """Choose the checkpoint to continue and load its position into `state` (no tensors yet)."""
        path, damaged = resumable(self.folder, self.env)
        for bad, why in damaged:
            log.warning(f"checkpoint {bad} is damaged ({why}); "
                        + (f"resuming from {path} instead" if path else "no older one is intact"))
        if path is None:
            raise UserError(f"--resume: no intact checkpoint in {self.folder}"
                            + (f" ({damaged[0][0].name}: {damaged[0][1]})" if damaged else "")
                            + "; start without --resume")
        saved = read_trainer(path)
        try:
            state.load_state_dict(saved)
        except SettingsMismatch as e:
            raise UserError(f"--resume: {path} {e}") from None
        self.resume_from = self.last = path
        self.lr_scale = state.settings.lr / saved["settings"]["lr"]
        log.info(f"resuming from {path} at step {state.step}" + (
            f" with --lr {state.settings.lr:g} (was {saved['settings']['lr']:g})" if self.lr_scale != 1 else ""))

    def refuse_earlier_run(self) -> None:
        """A fresh run must not mix its checkpoints with an earlier run's."""
        if latest(self.folder) is not None:
            raise UserError(f"{self.folder} holds checkpoints of an earlier run: pass --resume to continue it, or "
                            f"choose another --ckpt-dir (or delete that folder)")

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
        """The weights and RNG of the checkpoint resumed from, with the optimizer and scheduler when given (the
        checkpoint was made in the phase that continues; else they start afresh). A no-op for a fresh run."""
        if self.resume_from is not None:
            load(self.resume_from, model, self.env, optimizer, scheduler, lr_scale=self.lr_scale)

    def due(self, step: int, force: bool = False) -> bool:
        return force or bool(self.every and step % self.every == 0)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> Path:
        self.last = save(self.folder, state.step, model, optimizer, scheduler, state.state_dict(), self.env,
                         keep=self.keep)
        log.info(f"checkpoint {self.last}")
        return self.last
