"""Output paths: checked before a command starts work, written through temporary siblings, stale ones cleaned.

Every write goes through `atomic_output` (or, for a writer that spans calls, its two halves `temp_sibling` and
`publish`): `.NAME.tmp-PID-HOST-XXXXXXXX` beside NAME, renamed into place when complete (an existing folder waits
as `.NAME.old-...` until the new one is in place). A process killed with -9 leaves its temporary
behind; the next writer of the same NAME removes those left by processes of this host (and PID namespace) that are
gone.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping

from .cli import UserError

# .NAME.KIND-PID[-HOST-RANDOM]; the short form (no host) is what earlier versions wrote.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-(?P<host>.+)-[0-9a-f]{8})?$")


def _host() -> str:
    """Where a PID means this process's neighbours: the host name and the PID namespace (containers that share a
    host name and a filesystem but not their PIDs are told apart). Assumed: no two machines writing one shared
    filesystem have the same host name, in the same (initial) namespace."""
    name = socket.gethostname().replace("/", "_") or "localhost"
    try:
        return f"{name}.{''.join(filter(str.isdigit, os.readlink('/proc/self/ns/pid')))}"  # "pid:[4026531836]"
    except OSError:  # no /proc (not Linux): the host name alone
        return name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a PID no process can have
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(folder: str | os.PathLike, names: str = "*") -> list[Path]:
    """Remove the temporaries in `folder` (for targets matching the glob `names`) whose process is gone.

    Only this host's temporaries are judged (a PID means nothing on another node of a shared filesystem, or in
    another container's PID namespace: `_host`), and an `.old` copy only once its target is back in place: until
    then it may be the only copy.
    """
    folder = Path(folder)
    removed = []
    for p in folder.glob(f".{names}.*-*") if folder.is_dir() else ():
        m = _TEMP.match(p.name)
        if not m or (m["host"] or _host()) != _host() or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (folder / m["name"]).exists():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def temp_sibling(path: str | os.PathLike, kind: Literal["tmp", "old"] = "tmp") -> Path:
    """A fresh name beside `path` to write it atomically; stale temporaries of `path` are removed first."""
    path = Path(path)
    clean_stale(path.parent, glob.escape(path.name))
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{_host()}-{secrets.token_hex(4)}")


# The one atomic write ----------------------------------------------------------------------------------------
def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_file_permissions(tmp: Path) -> None:
    """A file, or each file of a folder, gets the permissions of any new file (copies from a read-only source
    would keep its mode)."""
    for f in (tmp.iterdir() if tmp.is_dir() else [tmp]):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask())


def remove(path: Path) -> None:
    """A file or a folder tree, whichever `path` is (a symlink is unlinked, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished temporary `tmp` to `path`. An existing folder there is moved aside first and removed
    only once `tmp` is in place, so a crash between the renames leaves one complete copy."""
    _new_file_permissions(tmp)
    if not tmp.is_dir() or not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    old = temp_sibling(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    remove(old)


@contextmanager
def atomic_output(path: str | os.PathLike, kind: Literal["file", "folder"] = "file") -> Iterator[Path]:
    """The one atomic write: yields a temporary sibling of `path` to fill (made, empty, for a folder); when the
    block ends it is renamed into place (`publish`), and when the block raises it is removed. Readers never
    see half a file or folder, and a writer killed with -9 leaves a temporary that the next one cleans."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    if kind == "folder":
        tmp.mkdir()
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """A whole text file, written through `atomic_output` (and synced before the rename)."""
    with atomic_output(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


# Checking outputs before the work ------------------------------------------------------------------------------
def _probe(folder: Path) -> OSError | None:
    """Can this process create a file in `folder`? (tried for real: permission bits lie to root and on
    read-only mounts)."""
    probe = folder / f".phi3skip-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        return e
    return None


def writable(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and _probe(folder) is None


def check_output(path: str | os.PathLike, flag: str, kind: Literal["folder", "dir", "file"],
                 overwrite: bool | None = None) -> Path:
    """Check before any work that `path` can be written; returns it. One-line `UserError` otherwise.

    kind: "folder", an output folder replaced as a whole, "file", a file (an existing one needs `overwrite`, when
    the command has that flag: pass its value); "dir", a folder written into (logs, checkpoints, results).
    """
    path = Path(path).expanduser()
    what = f"{flag} {path}" if flag else str(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise UserError(f"{what}: is a folder; give a file name")
        if kind != "file" and not path.is_dir():
            raise UserError(f"{what}: exists and is not a folder; choose another {flag or 'path'}")
        if kind != "dir" and overwrite is False:
            raise UserError(f"{what}: already exists; pass --overwrite to replace it, or choose another "
                            f"{flag or 'path'}")
    # The folder that must accept new entries: the path itself for "dir", else its parent (the rename).
    target = path if kind == "dir" else path.parent
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a folder; choose another {flag or 'path'}")
    err = _probe(existing)
    if err is not None:
        reason = os.strerror(err.errno) if err.errno else type(err).__name__
        if err.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied"
        raise UserError(f"{what}: cannot write in {existing} ({reason}); choose another {flag or 'path'}")
    return path


Paths = Mapping[str, str | os.PathLike | None] | Iterable[tuple[str, str | os.PathLike | None]]


def local(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """`path` when it names something on this machine, else None (a Hub id, which no output can touch)."""
    return path if path is not None and Path(path).expanduser().exists() else None


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _pairs(paths: Paths) -> list[tuple[str, Path]]:
    items = paths.items() if isinstance(paths, Mapping) else paths
    return [(name, Path(p)) for name, p in items if p is not None]


def check_apart(outputs: Paths, reads: Paths, keeps: Paths = ()) -> None:
    """The one rule for where a command writes, checked before any work, with or without --overwrite: no output
    may be, hold, or lie inside anything the command reads (`reads`: its model, teacher, data, sources; writing
    there would replace or change them), nor be or hold a folder it keeps (`keeps`: its other outputs, a folder it
    records into; an output may lie inside those). Paths are compared after symlinks are resolved; None entries
    are ignored. One-line `UserError` naming both flags otherwise."""
    others = [(name, p, True) for name, p in _pairs(reads)] + [(name, p, False) for name, p in _pairs(keeps)]
    for flag, out in _pairs(outputs):
        o = _real(out)
        for name, other, inside_too in others:
            p = _real(other)
            how = "is" if o == p else "holds" if o in p.parents else "is inside" if inside_too and p in o.parents else None
            if how:
                raise UserError(f"{flag} {out} {how} {name} {other}: writing it would replace or change that; "
                                f"choose another {flag}")

def read_json_object(path: str | os.PathLike, fix: str = "", error: type[Exception] = UserError) -> dict:
    """A JSON file that holds an object (meta.json, skip.json, results.json): one line naming the file when it is
    unreadable, not JSON or not an object, `fix` appended (e.g. "; re-create it with prepare.py"). A missing file
    raises FileNotFoundError, which each caller words for itself."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({e}){fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object{fix}")
    return obj

