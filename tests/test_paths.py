"""Output paths: checked before a command works (every command), temporaries of dead processes cleaned up."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from commands import entry
from phi3skip.core.cli import UserError
from phi3skip.core import paths
from phi3skip.core.paths import check_apart, check_output, clean_stale, temp_sibling

ROOT = Path(__file__).resolve().parents[1]


def test_check_output(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for kind in ("folder", "dir", "file"):
        with pytest.raises(UserError, match=r"--x .*blocker/a/b: .*blocker is a file, not a folder; choose another --x"):
            check_output(blocker / "a" / "b", "--x", kind)
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_output(blocker, "--x", "dir")
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output(tmp_path, "--x", "file")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="out: already exists; pass --overwrite"):
        check_output(tmp_path / "out", "--out", "folder", overwrite=False)
    assert check_output(tmp_path / "out", "--out", "folder", overwrite=True) == tmp_path / "out"
    assert check_output(tmp_path / "new" / "deeper", "--out", "dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "out"]  # and leaves no probe behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_check_output_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write in .*ro \\(permission denied\\)"):
            check_output(ro / "out", "--out", "folder")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("out,reads,keeps,how", [
    ("model", {"--model": "model"}, {}, "is --model"),
    (".", {"--model": "model"}, {}, "holds --model"),
    ("model/x", {"--model": "model"}, {}, "is inside --model"),
    ("link", {"--model": "model"}, {}, "is --model"),  # a symlink to it is it
    ("data/x", {}, {"--data": "data"}, None),  # inside a folder only kept: fine
    ("data", {}, {"--data": "data"}, "is --data"),
    (".", {"--data": None}, {"--none": None}, None),
    ("other", [("--text", "model/a.txt"), ("--text", "data")], {}, None),
    ("data", [("--text", "model/a.txt"), ("--text", "data/b.txt")], {}, "holds --text"),
])
def test_check_apart(tmp_path, monkeypatch, out, reads, keeps, how):
    monkeypatch.chdir(tmp_path)
    for d in ("model", "data", "other"):
        (tmp_path / d).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    if how is None:
        check_apart({"--out": out}, reads, keeps)
    else:
        with pytest.raises(UserError, match=f"^--out {out} {how} "):
            check_apart({"--out": out}, reads, keeps)


def test_only_dead_processes_temporaries_are_removed(tmp_path, dead_pid):
    host = paths._host()
    assert host.startswith(socket.gethostname())
    target = tmp_path / "out"
    dead = [tmp_path / f".out.tmp-{dead_pid}-{host}-0123abcd", tmp_path / f".out.tmp-{dead_pid}",
            tmp_path / f".out.tmp-{10**30}-{host}-0123abcd"]  # a PID no process can have
    alive = [tmp_path / f".out.tmp-{os.getpid()}-{host}-0123abcd", tmp_path / f".out.tmp-{dead_pid}-elsewhere-0123abcd",
             tmp_path / f".out.tmp-{dead_pid}-{socket.gethostname()}.1-0123abcd",  # same name, another PID namespace
             tmp_path / f".other.tmp-{dead_pid}-{host}-0123abcd"]  # another target's: not this writer's business
    old = tmp_path / f".out.old-{dead_pid}-{host}-0123abcd"  # the previous folder, moved aside
    for p in dead + alive + [old]:
        p.mkdir()
    (tmp_path / f".out.tmp-{dead_pid}-{host}-4567cdef").write_text("a file too")
    dead.append(tmp_path / f".out.tmp-{dead_pid}-{host}-4567cdef")
    tmp = temp_sibling(target)
    assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{os.getpid()}-") and not tmp.exists()
    assert not any(p.exists() for p in dead) and all(p.exists() for p in alive)
    assert old.exists()  # killed between its two renames: it may be the only copy while `out` is missing
    target.mkdir()
    assert clean_stale(tmp_path, "out") == [old]


# Every command: an output path that cannot be written is one line, exit 2, before any work ---------------------------
def _commands(tiny_run, blocked: Path) -> dict[str, list[str]]:
    root, _ = tiny_run
    model, data = str(root / "model"), str(root / "data")
    return {
        "prepare": ["prepare.py", "--dataset", str(root / "notes.txt"), "--model", model, "--out", str(blocked)],
        "train --out": ["train.py", "--model", model, "--data", data, "--out", str(blocked)],
        "train --ckpt-dir": ["train.py", "--model", model, "--data", data, "--out", str(blocked.parent.parent / "o"),
                             "--ckpt-dir", str(blocked)],
        "train --log-dir": ["train.py", "--model", model, "--data", data, "--out", str(blocked.parent.parent / "o"),
                            "--log-dir", str(blocked)],
        "evaluate": ["scripts/evaluate.py", "--model", model, "--data", data, "--out", str(blocked)],
        "convert_gguf": ["scripts/convert_gguf.py", str(blocked.parent.parent / "model.gguf"), str(blocked)],
        "random_model": ["scripts/random_model.py", model, str(blocked)],
        "rank_layers": ["scripts/rank_layers.py", "--model", model, "--data", data, "--json", str(blocked)],
    }


@pytest.mark.integration
def test_every_command_checks_its_outputs_first(tiny_run, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    blocked = tmp_path / "blocker" / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("STDOUT", None)
    for name, argv in _commands(tiny_run, blocked).items():
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "blocker is a file, not a folder" in lines[0], (name, r.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"], name  # no work started


# Every command: no output may be, hold, or lie inside what it reads, with or without --overwrite -------------------
def _workspace(tiny_run, w: Path) -> None:
    """The tiny model and data, a source file, a text file and a (fake) GGUF, each in its own folder."""
    import shutil

    root, _ = tiny_run
    shutil.copytree(root / "model", w / "model")
    shutil.copytree(root / "data", w / "data")
    for name, src in (("src/notes.txt", root / "notes.txt"), ("text/prose.txt", root / "notes.txt")):
        (w / name).parent.mkdir(parents=True)
        shutil.copy(src, w / name)
    (w / "gguf").mkdir()
    (w / "gguf" / "m.gguf").write_bytes(b"GGUF not really")


# command -> (how to run it, its outputs {flag: kind}, its default argv as {flag: value}, what it reads {name: path
# relative to the workspace}, with "whole": False for what is only kept, which an output may lie inside)
_M, _D = "model", "data"
COMMANDS = {
    "prepare": ("prepare", {"--out": "folder"}, {"--dataset": "src/notes.txt", "--model": _M, "--out": "o/p"},
                {"--model": _M, "--dataset src/notes.txt": "src/notes.txt", "--dataset src": "src",
                 "--dataset src/**/*.txt": "src", "--dataset src/*.txt": ("src", False)}),
    "train": ("train", {"--out": "folder", "--ckpt-dir": "dir", "--log-dir": "dir"},
              {"--model": _M, "--data": _D, "--out": "o/s", "--ckpt-dir": "o/c", "--log-dir": "o/l", "--device": "cpu"},
              {"--model": _M, "--data": _D}),
    "evaluate": ("evaluate", {"--out": "dir"}, {"--model": _M, "--teacher": _M + "2", "--data": _D,
                                                "--text": "text/prose.txt", "--out": "o/e", "--no-plot": None},
                 {"--teacher": _M + "2", "--data": _D, "--text": "text/prose.txt", "--model": (_M, False)}),
    "export": ("export", {"--out": "folder", "--gguf": "file"}, {"--model": _M, "--num-skip": "1", "--out": "o/x",
                                                                 "--gguf": "o/x.gguf"}, {"--model": _M}),
    "convert_gguf": ("convert_gguf", {"OUT_DIR": "folder"}, {"GGUF": "gguf/m.gguf", "OUT_DIR": "o/g"},
                     {"GGUF": "gguf/m.gguf"}),
    "random_model": ("random_model", {"out": "folder"}, {"like": _M, "out": "o/r"}, {"like": _M}),
    "rank_layers": ("rank_layers", {"--json": "file"}, {"--model": _M, "--data": _D, "--json": "o/r.json"},
                    {"--model": _M, "--data": _D}),
    # generate writes nothing but stdout and stderr: it has no output to check
}
OVERWRITE = {"prepare", "train", "export", "convert_gguf", "random_model"}


def _path_cases():
    for command, (_, outputs, _, reads, *_) in COMMANDS.items():
        for flag, kind in outputs.items():
            for name, spec in reads.items():
                path, whole = spec if isinstance(spec, tuple) else (spec, True)
                for how in ("is", "holds", "is inside") if whole else ("is", "holds"):
                    if how == "is inside" and "." in Path(path).name:
                        continue  # nothing lies inside a file
                    for overwrite in (False, True) if command in OVERWRITE else (False,):
                        yield command, flag, kind, name, path, how, overwrite


def _argv(command: str, values: dict) -> list[str]:
    positional = {"convert_gguf": ("GGUF", "OUT_DIR"), "random_model": ("like", "out")}.get(command, ())
    argv = [str(values[k]) for k in positional]
    for flag, value in values.items():
        if flag not in positional:
            argv += [flag] if value is None else [flag, str(value)]
    return argv


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command,flag,kind,name,path,how,overwrite", list(_path_cases()))
def test_no_output_is_holds_or_lies_inside_an_input(tiny_run, tmp_path, monkeypatch, command, flag, kind, name, path,
                                                    how, overwrite):
    w = tmp_path / "w"
    _workspace(tiny_run, w)
    import shutil

    shutil.copytree(w / _M, w / (_M + "2"))  # evaluate's teacher
    monkeypatch.chdir(w)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module, outputs, defaults, _ = COMMANDS[command]
    values = dict(defaults)
    if name.startswith("--dataset "):
        values["--dataset"] = name.split(" ", 1)[1]
    target = Path(path)
    # a file output inside a folder takes the name of a file already there: the most it could destroy
    values[flag] = str({"is": target, "holds": target.parent,
                        "is inside": target / ("meta.json" if kind == "file" else "new")}[how])
    argv = _argv(command, values) + (["--overwrite"] if overwrite else [])
    before = _snapshot(w)
    with pytest.raises(UserError) as e:
        entry(module)(argv)
    assert "\n" not in str(e.value)
    assert _snapshot(w) == before, f"{command} {' '.join(argv)} changed the workspace"
