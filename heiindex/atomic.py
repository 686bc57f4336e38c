"""Putting a finished output in place in one step, and clearing what killed runs left behind.

Every command writes its output (a store split, a model, an index, coco-sim, a plot) into a
scratch folder or file beside the target, named ``.NAME.partial-HOST-PID-XXXX``. When it is
complete, ``swap_in`` puts it in place: a new target is one rename; an existing one is
exchanged with it by one ``renameat2(RENAME_EXCHANGE)`` (Linux), so that at no moment is there
no target, then the old one is removed. Where the exchange is not available (another OS, a
file system without it) the old target is first moved aside as ``.NAME.old-HOST-PID-XXXX``.

A run killed mid-way (SIGKILL, power loss) cannot remove its scratch. ``clear_leftovers``, called
before the next write of the same target, removes the leftovers of runs on this host whose
process is gone, and, where such a run was killed between moving the old target aside and
putting the new one in place, moves the old one back first. Leftovers of live processes, or of
other hosts (a shared file system), are left alone. ``leftovers`` lists them (``heiindex
verify`` reports them).

What this module must not do: decide whether a target may be replaced (``heiindex.store``'s
``check_replaceable``) or know what the files hold.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "clear_leftovers", "exchange", "leftovers", "leftovers_in", "scratch", "swap_in"]

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# .NAME.partial-HOST-PID-XXXX or .NAME.old-HOST-PID-XXXX (the suffix from tempfile)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<role>partial|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[^-]+$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def scratch(target: Path, folder: bool = True, role: str = "partial") -> Path:
    """A new, empty scratch folder (or file, ``folder=False``) beside ``target``, named so that
    ``clear_leftovers`` can tell whose it is."""
    target = Path(target)
    prefix = f".{target.name}.{role}-{_HOST}-{os.getpid()}-"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    return Path(name)


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one step; False where this system cannot
    (nothing moved then)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_in(new: Path, target: Path) -> None:
    """Put the finished ``new`` (a scratch beside ``target``) in place of ``target``, replacing
    what is there; ``new`` is gone afterwards. On any failure ``target`` is as it was."""
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    if exchange(new, target):  # `new` now holds the old target
        _remove(new)
        return
    old = scratch(target, folder=target.is_dir(), role="old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextmanager
def atomic_file(target: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a scratch file beside ``target`` to write; once the block ends without an exception
    it replaces ``target`` (a file's rename is one step everywhere), with permissions ``mode``.
    On an exception it is removed and ``target`` is as it was."""
    target = Path(target)
    clear_leftovers(target)
    tmp = scratch(target, folder=False)
    try:
        yield tmp
        tmp.chmod(mode)
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
        olds = [p for p in stale if _LEFTOVER.match(p.name)["role"] == "old"]
        if olds:  # killed during a swap without exchange: the previous output comes back
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.replace(newest, target)
            stale.remove(newest)
            done.append(newest)
    for p in stale:
        _remove(p)
        done.append(p)
    return done


def _dead(path: Path) -> bool:
    """Whether the run that named ``path`` was on this host and its process is gone."""
    m = _LEFTOVER.match(path.name)
    if m is None or m["host"] != _HOST:
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
