"""Putting a finished output in place in one step, and clearing what killed runs left behind.

Every command writes its output (a store split, a model, an index, coco-sim, a plot) into a
scratch folder or file beside the target, named ``.NAME.partial-HOST-NS-PID_START_BOOT-XXXX`` (NS:
the process's PID namespace, so that containers sharing a host name and a volume are told apart;
START: when the process started, in clock ticks since boot, and BOOT: the first 8 digits of
Linux's boot id, so that a later process given the same PID is not taken for it; ``PID`` alone
where /proc cannot tell these, as on macOS and Windows). START is compared only where BOOT is
this boot's (not, say, a machine of the same host name writing to a shared folder, nor a run
before a reboot) and /proc shows this process's own PID namespace (``unshare -p`` without
remounting /proc shows another's); elsewhere the PID alone decides, as it did before. START is
as the writer's time namespace shows it: a process of another time namespace, in the same PID
namespace (rare outside checkpoint-restore tools), would judge a live writer gone.
When it is complete, ``swap_in`` puts it in place: a new target is one rename; on Linux an
existing one is exchanged with it by one ``renameat2(RENAME_EXCHANGE)``, so that at no moment
is there no target, then the old one is removed. Where the exchange is refused (another OS, a
file system or sandbox without it) the old target is first moved aside as
``.NAME.old-HOST-NS-PID_START_BOOT-XXXX``: between the two renames there is no target.

A run killed mid-way (SIGKILL, power loss) cannot remove its scratch. ``clear_leftovers``, called
before the next write of the same target, removes the leftovers of runs whose process is gone
(same host, same PID namespace, no such process, or one that started at another time), and,
where such a run was killed between
moving the old target aside and putting the new one in place, moves the old one back first.
Leftovers of live processes, of other hosts or namespaces, and every leftover on Windows (where
a process cannot be probed safely) are left alone. ``leftovers`` lists them (``heiindex verify``
reports them).

What this module must not do: decide whether a target may be replaced (``heiindex.outputs``'s
``check_replaceable``) or know what the files hold.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LeftoverWarning

__all__ = [
    "LockHeld",
    "atomic_file",
    "clear_leftovers",
    "exchange",
    "exclusive",
    "interrupted_hint",
    "is_scratch",
    "leftovers",
    "leftovers_in",
    "lock_file",
    "note_interrupt",
    "remove",
    "scratch",
    "scratch_target",
    "is_set_aside",
    "set_aside",
    "swap_in",
]


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS, Windows): one namespace
        return "0"


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_NS = _pid_namespace()
# .NAME.partial-HOST-NS-PID_START_BOOT-XXXX or .NAME.old-HOST-NS-PID_START_BOOT-XXXX (XXXX from
# tempfile: no "-"); names with PID alone, as heiindex wrote them before, are read too
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<role>partial|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<ns>\d+)"
    r"-(?P<pid>\d+)(?:_(?P<start>\d+)_(?P<boot>[0-9a-f]{8}))?-[^-]+$"
)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class LockHeld(Exception):
    """``exclusive``'s lock file is held by another process (its ``args[0]``: the file)."""


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold the file ``lock`` (made where missing) with an exclusive ``flock`` for the ``with``
    body, then remove it (still locked: a process waiting on it then sees another file).
    ``LockHeld`` where another process holds it. The system releases a lock when its process dies,
    so a file a SIGKILL left is taken by the next run. Where ``fcntl`` is missing (Windows) or the
    file system takes no locks, nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = Path(lock)
    for attempt in range(5):
        try:
            handle = open(lock, "a")  # noqa: SIM115 (closed below, or by the with at the end)
        except FileNotFoundError:  # a holder's cleanup removed the folder too, after the file: as held
            if attempt:
                raise LockHeld(lock) from None
            raise
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LockHeld(lock) from None
        except OSError:  # a file system without locks (ENOLCK, EOPNOTSUPP): written unlocked, as before
            handle.close()
            lock.unlink(missing_ok=True)
            handle = None
        if handle is None:  # outside the except: an error of the body is not chained to ENOLCK
            yield
            return
        try:  # a holder that finished meanwhile removed the file this one locked: lock the new one
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    else:
        raise LockHeld(lock)
    with handle:
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def lock_file(target: Path) -> Path:
    """The lock file a write of ``target`` holds beside it (``exclusive``): ``.NAME.lock``."""
    return Path(target).parent / f".{Path(target).name}.lock"


def is_scratch(name: str) -> bool:
    """Whether ``name`` is that of a scratch or set-aside path (``scratch``), whoever made it."""
    return _LEFTOVER.match(name) is not None


def scratch_target(name: str) -> str | None:
    """The name of the target a scratch or set-aside path named ``name`` is for, else ``None``."""
    m = _LEFTOVER.match(name)
    return m["name"] if m else None


def scratch(target: Path, folder: bool = True, role: str = "partial") -> Path:
    """A new, empty scratch folder (or file, ``folder=False``) beside ``target``, named so that
    ``clear_leftovers`` can tell whose it is; readable as any new file or folder (the umask's
    permissions, where ``tempfile`` makes them owner-only)."""
    target = Path(target)
    prefix = f".{target.name}.{role}-{_HOST}-{_NS}-{_process_id(os.getpid())}-"
    if folder:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        path.chmod(0o777 & ~_umask())
        return path
    fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    """The process's umask: read from /proc where there is one (setting it to read it back
    would change it for other threads meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one step (Linux's ``renameat2``); False,
    nothing moved, where this system refuses it for any reason (no such call, a file system or
    a seccomp sandbox without it): the caller falls back to two renames, which report a real
    problem (a missing path, no permission) themselves."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@functools.cache
def _renameat2():
    """The C library's ``renameat2``, looked up once; None off Linux or where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library without it
        return None
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    return renameat2


# The signal a handler saw (``note_interrupt``): the exception it raised can be swallowed on the
# way (pyarrow's lazy pandas import swallows KeyboardInterrupt and SystemExit), and a command
# interrupted there went on to put its output in place and exit 0.
_interrupted: int | None = None


def note_interrupt(signum: int) -> None:
    """Record that the process was asked to stop (SIGINT, SIGTERM): no ``swap_in`` after it puts
    anything in place. For signal handlers (the CLI's), before they raise."""
    global _interrupted
    _interrupted = signum


def _refuse_if_interrupted() -> None:
    if _interrupted is None:
        return
    if _interrupted == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + _interrupted)


def swap_in(new: Path, target: Path) -> None:
    """Put the finished ``new`` (a scratch beside ``target``) in place of ``target``, replacing
    what is there; ``new`` is gone afterwards. A replaced folder's permissions are kept, as
    ``atomic_file`` keeps a file's (a rebuilt read-only index came back writable). On any failure
    ``target`` is as it was. After ``note_interrupt``, the interrupt again, and nothing moved."""
    _refuse_if_interrupted()
    new, target = Path(new), Path(target)
    if target.is_symlink():  # replacing the link would leave what it points to as it was
        raise ValueError(f"swap_in takes the path a link points to, not the link {target}")
    if not target.exists():
        os.replace(new, target)
        return
    if new.is_dir() and target.is_dir():
        new.chmod(target.stat().st_mode & 0o7777)
    if exchange(new, target):  # `new` now holds the old target
        _remove_replaced(new, target)
        return
    old = scratch(target, folder=target.is_dir(), role="old")
    try:
        os.replace(target, old)
    except BaseException:
        remove(old)
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove_replaced(old, target)


def _remove_replaced(old: Path, target: Path) -> None:
    """Remove the ``old`` content that ``target`` replaced, warning where some of it stays. What
    stays is renamed from a set-aside name ("old") to a scratch one ("partial"), as
    ``clear_leftovers`` would put a set-aside one back as the output were ``target`` missing
    later; only where that rename fails too does it keep the set-aside name (the warning names
    it). Never raises: the new output is in place."""
    remove(old)
    if not (old.exists() or old.is_symlink()):
        return
    left = old
    if (m := _LEFTOVER.match(old.name)) is not None and m["role"] == "old":
        named = None
        try:
            named = scratch(target, folder=old.is_dir())
            os.replace(old, named)  # onto the empty scratch made for the name
            left = named
        except OSError:
            if named is not None:
                remove(named)
    warnings.warn(
        LeftoverWarning(f"{target} was written, but what it replaced could not all be deleted: the rest is in {left}"),
        stacklevel=3,
    )


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a scratch file beside ``target`` to write; once the block ends without an exception
    it replaces ``target`` (a file's rename is one step everywhere), keeping an existing file's
    permissions (else the umask's). A symlinked ``target`` is written where it points. On an
    exception the scratch is removed and ``target`` is as it was."""
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    clear_leftovers(target)
    tmp = scratch(target, folder=False)
    try:
        yield tmp
        _refuse_if_interrupted()
        if target.exists():
            tmp.chmod(target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def leftovers(target: Path) -> list[Path]:
    """The scratch and set-aside paths of ``target`` beside it, whoever left them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = []
    for p in target.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == target.name:
            found.append(p)
    return sorted(found)


def set_aside(target: Path) -> list[Path]:
    """The leftovers of ``target`` that are an old ``target`` moved aside by a killed swap."""
    return [p for p in leftovers(target) if is_set_aside(p)]


def is_set_aside(path: Path) -> bool:
    """Whether ``path`` is named as an old target moved aside by a swap (``.NAME.old-...``)."""
    m = _LEFTOVER.match(Path(path).name)
    return m is not None and m["role"] == "old"


def interrupted_hint(target: Path) -> str:
    """For a message about a missing ``target``: what a killed run left beside it, or ``""``. An
    old ``target`` set aside by a swap killed between its two renames is named as the way back."""
    target = Path(target)
    left = leftovers(target)
    if not left:
        return ""
    live = [(p, pid) for p in left if (pid := writer_pid(p)) is not None]
    if live:  # a build under way is no interrupted one (its scratch was called so, and deleted)
        return f" (process {live[0][1]} on this machine is writing it now, into {live[0][0].name}: try again when it is done)"
    old = set_aside(target)
    if old:
        newest = max(old, key=lambda p: p.stat().st_mtime)
        return (
            f" (a run replacing it was interrupted between two renames: the previous {target.name} is "
            f"{newest.name}, beside it; rename it back to {target.name})"
        )
    return f" (a run writing it was interrupted: {left[0].name} is left beside it)"


def leftovers_in(folder: Path) -> list[Path]:
    """Every scratch or set-aside path directly inside ``folder`` (any target's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _LEFTOVER.match(p.name))


def clear_leftovers(target: Path) -> list[Path]:
    """Remove the leftovers of ``target`` from dead runs on this host (first putting a set-aside
    old target back where ``target`` is missing); returns what was removed or put back."""
    target = Path(target)
    done = []
    stale = [p for p in leftovers(target) if _dead(p)]
    if not target.exists() and not target.is_symlink():
        olds = [p for p in set_aside(target) if p in stale]
        if olds:  # killed during a swap without exchange: the previous output comes back
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.replace(newest, target)
            stale.remove(newest)
            done.append(newest)
    for p in stale:
        remove(p)
        done.append(p)
    return done


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of Linux's
    /proc/PID/stat), or None where that cannot be read (no such process, no /proc)."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
        # the fields after the command name, which is in parentheses and may hold spaces
        return int(line[line.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    """The first 8 hex digits of this boot's id (Linux), or None."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return None
    return boot if re.fullmatch(r"[0-9a-f]{8}", boot) else None


def _proc_is_ours() -> bool:
    """Whether /proc shows this process's PID namespace (``/proc/self`` names its PID)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


_BOOT = _boot_id()


@functools.cache
def _own_start(pid: int) -> int | None:
    """This process's start (``pid``: its PID, the cache's key, new in a forked child), read once;
    None where /proc cannot tell it."""
    return _start_ticks(pid) if _BOOT is not None and _proc_is_ours() else None


def _process_id(pid: int) -> str:
    """``PID_START_BOOT`` for the scratch names of this process (``pid``: its PID), ``PID`` where
    /proc cannot tell its start."""
    start = _own_start(pid)
    return str(pid) if start is None else f"{pid}_{start}_{_BOOT}"


def _local_pid(path: Path, roles: tuple[str, ...] = ("partial", "old")) -> tuple[int, int | None] | None:
    """``(PID, START)`` from the scratch name ``path`` (of one of ``roles``) where it was made on
    this host, in this PID namespace; else None. START is None where the name holds none, or
    one of another boot than this (another machine of this host name, or before a reboot), or
    where /proc does not show this PID namespace: the PID alone then decides. Never on Windows,
    where ``os.kill(pid, 0)`` would end the process that ``_alive`` asks about."""
    m = _LEFTOVER.match(Path(path).name)
    if m is None or m["role"] not in roles or m["host"] != _HOST or m["ns"] != _NS or os.name == "nt":
        return None
    comparable = m["start"] is not None and m["boot"] == _BOOT and _proc_is_ours()
    return int(m["pid"]), int(m["start"]) if comparable else None


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` exists and, where ``start`` is given and its start can be read, started
    then (a process started at another time holds the PID of one that is gone)."""
    if pid == os.getpid():  # its start as read when it named its first scratch
        own = _own_start(pid)
        return start is None or own is None or start == own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    if start is None:
        return True
    now = _start_ticks(pid)
    return now is None or now == start


def writer_pid(path: Path) -> int | None:
    """The PID of the process writing the scratch ``path`` where it runs on this host, in this PID
    namespace, and is still alive (the write is under way, not interrupted); else None."""
    found = _local_pid(path, ("partial",))
    return found[0] if found is not None and _alive(*found) else None


def _dead(path: Path) -> bool:
    """Whether the run that named ``path`` was on this host, in this PID namespace, and its
    process is gone (no process has its PID, or one that started at another time has it)."""
    found = _local_pid(path)
    return found is not None and not _alive(*found)


def cleared_by_next_write(path: Path) -> bool:
    """Whether the next write of its target on this machine clears the leftover ``path``
    (``clear_leftovers``: a set-aside old target put back first): its run was here and is gone."""
    return _dead(Path(path))


def remove(path: Path) -> None:
    """Remove ``path``, ours to remove; where a folder's permissions refuse it (a read-only
    index replaced: its folder now stands aside), each folder in it is made writable by its
    owner and the removal tried again."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            _make_removable(path)
            shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_removable(path: Path) -> None:
    """Grant the owner every permission on ``path`` and each folder in it (not through links),
    each before its entries are listed."""
    if not _grant_owner(path):
        return
    for folder, dirs, _ in os.walk(path):
        for name in dirs:
            sub = Path(folder, name)
            if not sub.is_symlink():
                _grant_owner(sub)


def _grant_owner(path: Path) -> bool:
    """Give ``path``'s owner every permission on it; False where that fails."""
    try:
        path.chmod(path.stat().st_mode | stat.S_IRWXU)
    except OSError:
        return False
    return True
