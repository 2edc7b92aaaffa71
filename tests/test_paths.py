"""Output paths: checked before a command works (every command), temporaries of dead processes cleaned up."""
from __future__ import annotations

import os
import socket

import pytest

from phi3skip.cli import UserError
from phi3skip.paths import check_apart, check_output, clean_stale, temp_sibling


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
