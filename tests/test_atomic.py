"""Outputs put in place in one step, and what killed runs left behind (heiindex.atomic)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest

import heiindex.atomic as atomic
from heiindex.atomic import atomic_file, clear_leftovers, exchange, leftovers, scratch, swap_in
from heiindex.errors import LeftoverWarning
from heiindex.outputs import atomic_dir


def _folder(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _left(
    target: Path, role: str, pid: int | str, host: str = atomic._HOST, ns: str = atomic._NS, **files: str
) -> Path:
    """A folder named as ``scratch`` names them, of ``pid`` on ``host`` in PID namespace ``ns``."""
    return _folder(target.with_name(f".{target.name}.{role}-{host}-{ns}-{pid}-x1y2"), **files)


def _killed(target: Path, body: str) -> None:
    """Run ``body`` in a new Python process (``import os, signal, sys`` done, the target as
    ``sys.argv[1]``, ``atomic_dir`` imported) and check that it ended by SIGKILL."""
    code = "import os, signal, sys\nfrom heiindex.outputs import atomic_dir\n" + body
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr


def test_swap_in_replaces_an_existing_folder_by_one_exchange(tmp_path, monkeypatch):
    """Where the file system exchanges two paths in one step, the old target is never moved
    aside (no os.replace at all): there is no moment without a target."""
    _take_path(tmp_path, monkeypatch, exchanged=True)
    target = _folder(tmp_path / "out", old="1", gone="x")
    new = scratch(target)
    (new / "new").write_text("2")
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail(f"moved aside: {a}"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything it replaced removed: nothing to warn of
        swap_in(new, target)
    assert _contents(target) == {"new": "2"}
    assert not new.exists() and leftovers(target) == []


def test_swap_in_without_exchange_moves_the_old_aside_and_puts_it_back_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target = _folder(tmp_path / "out", old="1")
    new = scratch(target)
    (new / "new").write_text("2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old output moved aside and removed: nothing to warn of
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
    assert calls[0][0] == "out" and calls[0][1].startswith(
        f".out.old-{atomic._HOST}-{atomic._NS}-{atomic._process_id(os.getpid())}-"
    )


def _keep_stuck(monkeypatch):
    """Make atomic.remove delete all but files named "stuck" (and a folder only once empty);
    returns the real one."""
    real = atomic.remove

    def keeps_stuck(path: Path) -> None:
        if path.is_dir():
            for p in path.iterdir():
                if p.name != "stuck":
                    real(p)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.name != "stuck":
            real(path)

    monkeypatch.setattr(atomic, "remove", keeps_stuck)
    return real


def _take_path(tmp_path: Path, monkeypatch, exchanged: bool) -> None:
    """Make swap_in exchange the two paths in one step (skipped where the file system cannot) or
    take the fallback that moves the old output aside."""
    if exchanged and not exchange(_folder(tmp_path / "a"), _folder(tmp_path / "b")):
        pytest.skip("this file system cannot exchange two paths in one step")
    if not exchanged:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)


@pytest.mark.parametrize(
    "exchanged, fails, left_as",
    [(True, None, "partial"), (False, None, "partial"), (False, "rename", "old"), (False, "scratch", "old")],
)
def test_swap_in_warns_where_the_replaced_output_cannot_all_be_removed(
    tmp_path, monkeypatch, exchanged, fails, left_as
):
    """A file the system will not delete (immutable, say) stays in the replaced output: the new
    output is in place, swap_in does not raise, and a LeftoverWarning names the one folder left.
    On both paths it is left under a scratch name ("partial"), never put back as the output (a
    set-aside "old" one would be, were the output missing); only where renaming it, or making
    the name, fails does it keep the set-aside name."""
    _take_path(tmp_path, monkeypatch, exchanged)
    _keep_stuck(monkeypatch)
    real_replace, real_scratch = os.replace, atomic.scratch

    def replace(src, dst):
        if exchanged:  # the exchange path moves nothing aside: the fallback would pass the same checks
            pytest.fail(f"moved aside: {src}")
        if fails == "rename" and Path(src).name.startswith(".out.old-"):
            raise OSError("rename refused")
        real_replace(src, dst)

    def refused_scratch(t, folder=True, role="partial"):
        if fails == "scratch" and role == "partial":
            raise OSError("disk full")
        return real_scratch(t, folder, role)

    target = _folder(tmp_path / "out", stuck="1", other="2")
    new = scratch(target)
    (new / "new").write_text("3")
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic, "scratch", refused_scratch)
    with pytest.warns(LeftoverWarning) as caught:
        swap_in(new, target)
    assert _contents(target) == {"new": "3"}
    (left,) = leftovers(target)
    assert _contents(left) == {"stuck": "1"} and left.name.startswith(f".out.{left_as}-")
    assert (
        str(caught[0].message)
        == f"{target} was written, but what it replaced could not all be deleted: the rest is in {left}"
    )


def test_clear_leftovers_removes_dead_runs_scratch_and_puts_a_set_aside_target_back(tmp_path):
    """Of a dead run on this host: scratch removed; an old target set aside while the target is
    missing (killed mid-swap) put back. A live process's, another host's, another PID
    namespace's (a container sharing the host name: its pid means nothing here) and another
    target's are kept."""
    target = tmp_path / "out"
    dead = pf.dead_pid()
    partial = _left(target, "partial", dead, new="half")
    old = _left(target, "old", dead, good="1")
    live = _left(target, "partial", os.getpid(), mine="x")
    elsewhere = _left(target, "partial", dead, host="otherhost", theirs="y")
    container = _left(target, "partial", dead, ns="1", theirs="z")
    other = _left(tmp_path / "other", "partial", dead, z="z")
    assert leftovers(target) == sorted([partial, old, live, elsewhere, container])
    assert sorted(clear_leftovers(target)) == sorted([partial, old])
    assert _contents(target) == {"good": "1"}
    assert not partial.exists() and not old.exists()
    assert live.exists() and elsewhere.exists() and container.exists() and other.exists()
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


def test_exchange_reports_a_refusal_as_false_and_moves_nothing(tmp_path):
    """renameat2 refused for any reason (here a missing path; a seccomp sandbox answers EPERM) is
    no exchange, not an error: swap_in then falls back to two renames (tested on their own)."""
    a = _folder(tmp_path / "a")
    assert exchange(a, tmp_path / "missing") is False
    assert a.exists() and not (tmp_path / "missing").exists()


def test_swap_in_refuses_a_link_and_cleans_up_a_failed_first_rename(tmp_path, monkeypatch):
    real = _folder(tmp_path / "real", a="1")
    link = tmp_path / "link"
    link.symlink_to(real)
    new = scratch(link)
    with pytest.raises(ValueError, match="not the link"):
        swap_in(new, link)
    assert link.is_symlink() and _contents(real) == {"a": "1"}
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError("no")))
    with pytest.raises(PermissionError):
        swap_in(scratch(real), real)
    assert [p for p in leftovers(real) if ".old-" in p.name] == []  # the set-aside name is not left


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "before" and leftovers(target) == []
    target.chmod(0o640)  # an existing file keeps its permissions
    with atomic_file(target) as tmp:
        tmp.write_text("after")
    assert target.read_text() == "after" and leftovers(target) == []
    assert target.stat().st_mode & 0o777 == 0o640
    old_mask = os.umask(0o027)  # a new file gets the umask's, not tempfile's owner-only 0600
    try:
        with atomic_file(tmp_path / "new.png") as tmp:
            tmp.write_text("new")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o640
    old_mask = os.umask(0o027)  # so does an output folder (tempfile's scratch folders are 0700)
    try:
        with atomic_dir(tmp_path / "folder", "a test output", ()) as tmp:
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750
    link = tmp_path / "link.png"  # a link is followed: what it points to is replaced, the link kept
    link.symlink_to(target)
    with atomic_file(link) as tmp:
        tmp.write_text("through the link")
    assert link.is_symlink() and target.read_text() == "through the link"


def test_a_scratch_left_inside_an_output_does_not_block_its_replacement(tmp_path):
    """A bench killed while writing its plot into an index folder leaves the plot's scratch there;
    the next build of that folder replaces it, scratch and all, instead of refusing it as a
    file of the user's."""
    target = _folder(tmp_path / "index", **{"manifest.json": "{}"})
    _left(target / "bench_sweep.png", "partial", pf.dead_pid(), half="png")
    with atomic_dir(target, "an index", ("manifest.json",)) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert _contents(target) == {"manifest.json": "{}"}


def test_the_newest_set_aside_target_comes_back(tmp_path):
    """Of two old targets a dead run set aside, the one set aside last is put back."""
    target = tmp_path / "out"
    for name, mtime in (("newer", 2_000_000), ("older", 1_000_000)):  # made first: not last by name
        old = _left(target, "old", pf.dead_pid(), which=name)
        os.utime(old, (mtime, mtime))
    clear_leftovers(target)
    assert _contents(target) == {"which": "newer"} and leftovers(target) == []


def test_a_run_of_another_user_is_alive(tmp_path, monkeypatch):
    """os.kill(pid, 0) refused with PermissionError: the process exists (another user's)."""

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "kill", refuse)
    assert atomic._dead(_left(tmp_path / "out", "partial", 999999)) is False
    monkeypatch.setattr(atomic.os, "kill", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError()))
    assert atomic._dead(_left(tmp_path / "out", "partial", 999998)) is True  # the same name, gone: dead


def _needs_start_times():
    if atomic._own_start(os.getpid()) is None:
        pytest.skip("no boot id or /proc/PID/stat of this PID namespace here: scratch names carry no start time")


@pytest.fixture
def live_child():
    """A live process of this host (a sleeping one) and when it started, in clock ticks since boot."""
    _needs_start_times()
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child.pid, atomic._start_ticks(child.pid)
    finally:
        child.kill()
        child.wait()


def test_scratch_names_carry_the_writers_pid_start_and_boot(tmp_path):
    _needs_start_times()
    path = scratch(tmp_path / "out")
    assert f"-{os.getpid()}_{atomic._start_ticks(os.getpid())}_{atomic._BOOT}-" in path.name
    assert atomic._local_pid(path) == (os.getpid(), atomic._start_ticks(os.getpid()))
    assert atomic.writer_pid(path) == os.getpid() and not atomic._dead(path)


def test_a_pid_taken_by_a_later_process_is_not_the_writer(tmp_path, live_child):
    """A killed run's PID given to a process started at another time: its scratch is a dead run's,
    cleared by the next write, not a live build's (which it was, for as long as the PID stayed taken)."""
    pid, start = live_child
    mine = _left(tmp_path / "out", "partial", f"{pid}_{start}_{atomic._BOOT}")
    assert atomic.writer_pid(mine) == pid and not atomic._dead(mine)
    mine.rename(mine.with_name(mine.name.replace(f"_{start}_", f"_{start - 1}_")))
    reused = leftovers(tmp_path / "out")[0]
    assert atomic.writer_pid(reused) is None and atomic._dead(reused)
    assert "interrupted" in atomic.interrupted_hint(tmp_path / "out")
    assert clear_leftovers(tmp_path / "out") == [reused] and leftovers(tmp_path / "out") == []


def test_names_without_a_start_or_of_another_boot_are_judged_by_the_pid_alone(tmp_path, live_child):
    """Scratch named before names carried a start time, and scratch of another boot (a machine of
    the same host name writing to a shared folder, whose start times mean nothing here): a live PID
    is taken for the writer, as before."""
    pid, start = live_child
    other_boot = "0" * 8 if atomic._BOOT != "0" * 8 else "1" * 8
    assert atomic.writer_pid(_left(tmp_path / "a", "partial", pid)) == pid
    assert atomic.writer_pid(_left(tmp_path / "b", "partial", f"{pid}_{start - 1}_{other_boot}")) == pid


def test_a_pid_namespace_that_proc_does_not_show_compares_no_start(tmp_path, monkeypatch, live_child):
    """``unshare -p`` without remounting /proc: /proc/PID is another namespace's process."""
    pid, start = live_child
    monkeypatch.setattr(atomic, "_proc_is_ours", lambda: False)
    assert atomic.writer_pid(_left(tmp_path / "out", "partial", f"{pid}_{start - 1}_{atomic._BOOT}")) == pid


def test_this_processs_own_scratch_stays_live_where_proc_cannot_be_read_again(tmp_path, monkeypatch):
    """Its own start was read again on each check, and a failed read (out of file handles) made
    its live scratch dead, for another of its threads to clear."""
    _needs_start_times()
    path = scratch(tmp_path / "out")
    monkeypatch.setattr(atomic, "_start_ticks", lambda pid: None)
    assert atomic.writer_pid(path) == os.getpid() and not atomic._dead(path)


def test_another_users_process_started_at_another_time_is_not_the_writer(tmp_path, monkeypatch):
    """os.kill refused (another user's process), /proc still readable: the start time decides."""
    _needs_start_times()
    monkeypatch.setattr(atomic.os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError(1, "no")))
    monkeypatch.setattr(atomic, "_start_ticks", lambda pid: 500)
    boot = atomic._BOOT
    assert atomic._dead(_left(tmp_path / "a", "partial", f"999999_500_{boot}")) is False
    assert atomic._dead(_left(tmp_path / "b", "partial", f"999999_400_{boot}")) is True
    monkeypatch.setattr(atomic, "_start_ticks", lambda pid: None)  # /proc hidden: alive, as before
    assert atomic._dead(_left(tmp_path / "c", "partial", f"999999_400_{boot}")) is False


def test_removing_a_symlinked_leftover_removes_the_link_only(tmp_path):
    real = _folder(tmp_path / "real", keep="1")
    link = tmp_path / f".out.partial-{atomic._HOST}-{atomic._NS}-{pf.dead_pid()}-x1y2"
    link.symlink_to(real)
    assert clear_leftovers(tmp_path / "out") == [link]
    assert not link.is_symlink() and _contents(real) == {"keep": "1"}


def test_a_replaced_folder_keeps_its_permissions(tmp_path):
    """A read-only index rebuilt in place came back writable: the new folder took the umask's."""
    target, new = tmp_path / "index", tmp_path / "built"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    target.chmod(0o555)
    new.mkdir()
    (new / "manifest.json").write_text("new")
    swap_in(new, target)
    assert (target / "manifest.json").read_text() == "new" and not new.exists()
    assert target.stat().st_mode & 0o7777 == 0o555
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the replaced folder is gone too


def test_a_read_only_tree_is_made_removable_by_its_owner(tmp_path):
    """What a replaced read-only folder needs before it can be deleted by a user who is not root
    (this test may run as root, whom permissions do not stop, so the modes are checked)."""
    from heiindex.atomic import _make_removable

    top = tmp_path / "old"
    (top / "shard-0").mkdir(parents=True)
    (top / "shard-0" / "images.faiss").write_text("x")
    (top / "link").symlink_to(tmp_path)  # not followed
    for folder in (top / "shard-0", top):
        folder.chmod(0o500)
    before = tmp_path.stat().st_mode
    _make_removable(top)
    assert all(f.stat().st_mode & 0o700 == 0o700 for f in (top, top / "shard-0"))
    assert tmp_path.stat().st_mode == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_nothing_is_put_in_place_after_an_interrupt_whose_exception_was_swallowed(tmp_path, monkeypatch, signum):
    """A review's SIGTERM landed in pyarrow's lazy pandas import, which swallowed the SystemExit:
    the build went on, replaced the index and exited 0. The handler now notes the signal first,
    and no swap or file replacement follows it."""
    monkeypatch.setattr(atomic, "_interrupted", None)
    target = tmp_path / "index"
    target.mkdir()
    (target / "old").write_text("old")
    new = atomic.scratch(target)
    (new / "new").write_text("new")
    atomic.note_interrupt(signum)  # the handler's first step; its exception then lost
    want = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(want) as info:
        atomic.swap_in(new, target)
    if want is SystemExit:
        assert info.value.code == 128 + signum
    assert sorted(p.name for p in target.iterdir()) == ["old"]
    with pytest.raises(want), atomic.atomic_file(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"png")
    assert not (tmp_path / "plot.png").exists() and not tmp.exists()


def test_a_file_system_without_locks_writes_unlocked(tmp_path, monkeypatch):
    """flock on some network file systems fails with ENOLCK: the write goes on, as before locks."""
    import errno
    import fcntl

    from heiindex.atomic import exclusive

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with exclusive(tmp_path / ".x.lock"):
        (tmp_path / "x").write_text("written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_lock_file_removed_by_its_finishing_holder_is_taken_again(tmp_path, monkeypatch):
    """A writer that finished removed the lock file between this one's open and lock: the lock
    taken was on a file no longer there, and the write was refused as held by another command."""
    import heiindex.atomic as atomic

    real, gone = atomic.os.stat, []

    def removed_once(path, *args, **kwargs):
        if str(path).endswith(".x.lock") and not gone:
            gone.append(1)
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "stat", removed_once)
    with atomic.exclusive(tmp_path / ".x.lock"):
        assert (tmp_path / ".x.lock").exists()
    assert gone == [1] and not (tmp_path / ".x.lock").exists()


def test_a_lock_whose_folder_its_finishing_holder_removed_is_refused_as_held(tmp_path, monkeypatch):
    """A failed holder removes its lock file and then the folder it made: the second open of the
    lock raised a raw FileNotFoundError instead of naming the other writer."""
    import shutil

    import heiindex.atomic as atomic

    folder = tmp_path / "made"
    folder.mkdir()
    real, gone = atomic.os.stat, []

    def removed_with_its_folder(path, *args, **kwargs):
        if str(path).endswith(".x.lock") and not gone:
            gone.append(1)
            shutil.rmtree(folder)
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "stat", removed_with_its_folder)
    with pytest.raises(atomic.LockHeld), atomic.exclusive(folder / ".x.lock"):
        pass
