"""Output paths: checked before a command works (every command), temporaries of dead processes cleaned up."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from phi3skip.cli import UserError
from phi3skip.paths import check_apart, check_output, clean_stale, temp_sibling

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


def test_check_apart(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    for out, how in ((model, "is"), (tmp_path, "holds"), (model / "x", "is inside")):
        with pytest.raises(UserError, match=f"--out {out} {how} --model"):
            check_apart(out, "--out", {"--model": model}, inside_too=True)
    check_apart(data / "x", "--out", {"--data": data})  # beside or inside what is only read: fine
    with pytest.raises(UserError, match="holds --data"):
        check_apart(tmp_path, "--out", {"--data": data, "--none": None})


def test_only_dead_processes_temporaries_are_removed(tmp_path, dead_pid):
    host = socket.gethostname()
    target = tmp_path / "out"
    dead = [tmp_path / f".out.tmp-{dead_pid}-{host}-0123abcd", tmp_path / f".out.tmp-{dead_pid}"]
    alive = [tmp_path / f".out.tmp-{os.getpid()}-{host}-0123abcd", tmp_path / f".out.tmp-{dead_pid}-elsewhere-0123abcd",
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
