"""Outputs put in place in one step, and what killed runs left behind (heiindex.atomic)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import heiindex.atomic as atomic
from heiindex.atomic import atomic_file, clear_leftovers, exchange, leftovers, scratch, swap_in
from heiindex.store import atomic_dir


def _folder(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _left(target: Path, role: str, pid: int, host: str = atomic._HOST, **files: str) -> Path:
    """A folder named as ``scratch`` names them, of ``pid`` on ``host``."""
    return _folder(target.with_name(f".{target.name}.{role}-{host}-{pid}-x1y2"), **files)


def _killed(target: Path, body: str) -> None:
    """Run ``body`` in a new Python process (``import os, signal, sys`` done, the target as
    ``sys.argv[1]``, ``atomic_dir`` imported) and check that it ended by SIGKILL."""
    code = "import os, signal, sys\nfrom heiindex.store import atomic_dir\n" + body
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr


def test_swap_in_replaces_an_existing_folder_by_one_exchange(tmp_path, monkeypatch):
    """Where the file system exchanges two paths in one step, the old target is never moved
    aside (no os.replace at all): there is no moment without a target."""
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b")
    if not exchange(a, b):
        pytest.skip("this file system cannot exchange two paths in one step")
    target = _folder(tmp_path / "out", old="1", gone="x")
    new = scratch(target)
    (new / "new").write_text("2")
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail(f"moved aside: {a}"))
    swap_in(new, target)
    assert _contents(target) == {"new": "2"}
    assert not new.exists() and leftovers(target) == []


def test_swap_in_without_exchange_moves_the_old_aside_and_puts_it_back_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target = _folder(tmp_path / "out", old="1")
    new = scratch(target)
    (new / "new").write_text("2")
    swap_in(new, target)
    assert _contents(target) == {"new": "2"} and leftovers(target) == []

    new = scratch(target)
    (new / "newer").write_text("3")
    real, calls = os.replace, []

    def fail_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new one into place
            raise OSError("disk went away")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk went away"):
        swap_in(new, target)
    assert _contents(target) == {"new": "2"}  # the old one is back
    assert calls[0][0] == "out" and calls[0][1].startswith(f".out.old-{atomic._HOST}-{os.getpid()}-")


def test_clear_leftovers_removes_dead_runs_scratch_and_puts_a_set_aside_target_back(tmp_path):
    """Of a dead run on this host: scratch removed; an old target set aside while the target is
    missing (killed mid-swap) put back. A live process's, another host's and another target's
    are kept."""
    target = tmp_path / "out"
    dead = _dead_pid()
    partial = _left(target, "partial", dead, new="half")
    old = _left(target, "old", dead, good="1")
    live = _left(target, "partial", os.getpid(), mine="x")
    elsewhere = _left(target, "partial", dead, host="otherhost", theirs="y")
    other = _left(tmp_path / "other", "partial", dead, z="z")
    assert leftovers(target) == sorted([partial, old, live, elsewhere])
    assert sorted(clear_leftovers(target)) == sorted([partial, old])
    assert _contents(target) == {"good": "1"}
    assert not partial.exists() and not old.exists()
    assert live.exists() and elsewhere.exists() and other.exists()
    old_again = _left(target, "old", dead, stale="1")
    assert clear_leftovers(target) == [old_again]  # the target exists: a set-aside one is only removed
    assert _contents(target) == {"good": "1"} and not old_again.exists()


def test_atomic_dir_clears_what_a_killed_run_left(tmp_path):
    """A real SIGKILL inside atomic_dir leaves its scratch folder and the old target as it was;
    the next write of the same target removes the scratch."""
    target = _folder(tmp_path / "out", **{"a.txt": "old"})
    _killed(
        target,
        "with atomic_dir(sys.argv[1], 'a test output', ('*.txt',)) as tmp:\n"
        "    (tmp / 'a.txt').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    assert _contents(target) == {"a.txt": "old"}
    (left,) = leftovers(target)
    assert _contents(left) == {"a.txt": "half"}
    with atomic_dir(target, "a test output", ("*.txt",)) as tmp:
        (tmp / "a.txt").write_text("new")
    assert _contents(target) == {"a.txt": "new"} and leftovers(target) == []


def test_a_kill_between_the_two_renames_loses_nothing(tmp_path):
    """Without the exchange, a real SIGKILL after the old target was moved aside and before the
    new one was put in place leaves no target; the next write puts the old one back first."""
    target = _folder(tmp_path / "out", **{"a.txt": "old"})
    _killed(
        target,
        "import heiindex.atomic as atomic\n"
        "atomic.exchange = lambda a, b: False\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if '.old-' in str(dst):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        "with atomic_dir(sys.argv[1], 'a test output', ('*.txt',)) as tmp:\n"
        "    (tmp / 'a.txt').write_text('new')\n",
    )
    assert not target.exists() and len(leftovers(target)) == 2
    with pytest.raises(RuntimeError, match="stop"), atomic_dir(target, "a test output", ("*.txt",)):
        raise RuntimeError("stop")  # cleared first, then the work fails: the old one stays
    assert _contents(target) == {"a.txt": "old"} and leftovers(target) == []


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "before" and leftovers(target) == []
    with atomic_file(target) as tmp:
        tmp.write_text("after")
    assert target.read_text() == "after" and leftovers(target) == []
    assert target.stat().st_mode & 0o777 == 0o644
