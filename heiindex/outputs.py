"""Where a command may write its output folder, and writing it whole.

Every writing command (``ingest``, ``train``, ``train-hash``, ``build``, a sweep plot) checks its
``--out`` before any work: it must be writable, must not be the current folder, a folder holding
it or a mount point, must not lie inside another of heiindex's outputs, and, where it exists,
must hold nothing but what that command writes (so that a mistyped ``--out`` naming an input is
refused, not deleted). ``atomic_dir`` then writes into a scratch folder beside the target and
swaps it into place only once complete (``heiindex.atomic``).
What this module must not do: know what any one output holds beyond recognising its kind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from fnmatch import fnmatch
from pathlib import Path

from .atomic import (
    LockHeld,
    clear_leftovers,
    exclusive,
    is_scratch,
    lock_file,
    remove,
    scratch,
    scratch_target,
    swap_in,
)
from .errors import DataError, name_some, one_line
from .manifests import manifest_object, store_split_manifest

__all__ = [
    "atomic_dir",
    "check_not_inside_output",
    "check_output",
    "check_replaceable",
    "check_writable",
    "output_kind",
]


@contextmanager
def atomic_dir(target: Path, kind: str = "this output", replaces: Collection[str] = ()) -> Iterator[Path]:
    """Yield a fresh scratch folder beside ``target``; on success it replaces ``target`` in one
    step (``heiindex.atomic.swap_in``).

    On any exception the scratch folder is removed and ``target`` is left as it was; what a
    killed earlier run left beside ``target`` is cleared first (``heiindex.atomic.clear_leftovers``).
    An existing ``target`` is replaced only if ``check_replaceable`` allows it (a folder holding
    nothing but what ``kind`` writes, the ``replaces`` patterns), checked before the work and
    again before the swap: an ``--out`` that names an input, a file or an unrelated folder is
    refused, not deleted.
    """
    target = Path(target)
    if target.is_symlink():  # write where it points: swapping the link itself would leave it dangling beside
        target = _resolved(target)
    clear_leftovers(target)
    check_output(target, kind, replaces)
    made = [p for p in target.parents if not p.exists()]  # deepest first: removed again on failure
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ExitStack() as held:
            try:  # one writer of a target at a time: two builds of one --out both said they wrote it
                held.enter_context(exclusive(lock_file(target)))
            except LockHeld:
                raise DataError(
                    target,
                    f"another heiindex command is writing it now (it holds {lock_file(target).name} beside it): "
                    "wait for it to finish, or write to another folder",
                ) from None
            yield from _written(target, kind, replaces)
    except BaseException:
        for folder in made:  # after the lock file beside the target is gone
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        raise


def _written(target: Path, kind: str, replaces: Collection[str]) -> Iterator[Path]:
    """``atomic_dir``'s scratch folder, swapped in where the body succeeds (its lock held)."""
    tmp = scratch(target)
    try:
        yield tmp
        check_replaceable(target, kind, replaces)
        swap_in(tmp, target)
    except BaseException as exc:
        remove(tmp)  # made read-only by swap_in where the folder it replaces is
        # pyarrow's message names no file; one that names a file elsewhere (a full TMPDIR while a
        # command works inside atomic_dir, as train-hash trains) is not this output's disk
        if isinstance(exc, OSError) and _out_of_space(exc) and _written_here(exc, tmp):
            raise DataError(
                target, f"could not be written: no space left on its disk ({one_line(exc)}); nothing was replaced"
            ) from exc
        if isinstance(exc, DataError) and exc.path.is_relative_to(tmp):  # a nested write's (a shard's):
            raise DataError(_in_place(exc.path, tmp, target), exc.problem, exc.settings) from exc  # named in place
        raise


def _in_place(path: Path, tmp: Path, target: Path) -> Path:
    """Where ``path``, inside the scratch folder ``tmp`` of ``target`` (and perhaps inside nested
    scratch folders), would have been once put in place: the scratch it names is gone."""
    parts = [scratch_target(part) or part for part in path.relative_to(tmp).parts]
    return target.joinpath(*parts)


def _written_here(exc: OSError, tmp: Path) -> bool:
    """Whether ``exc`` names no file path (None, or a descriptor), or one inside the scratch
    folder ``tmp``."""
    name = exc.filename
    if not isinstance(name, str | bytes | os.PathLike):
        return True
    return Path(os.path.abspath(os.fsdecode(name))).is_relative_to(os.path.abspath(tmp))


def _out_of_space(exc: OSError) -> bool:
    """A full disk or quota, as Python raises it (errno) or pyarrow does (errno in the text)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or any(
        f"[errno {code}]" in str(exc).lower() for code in (errno.ENOSPC, errno.EDQUOT)
    )


def check_output(target: Path, kind: str, replaces: Collection[str], whole: bool = True) -> None:
    """Where a command will write ``kind`` as a folder: ``DataError`` naming ``target`` unless it
    can be written (``check_writable``) and replaced (``check_replaceable``). Commands that
    work for long before writing call it first, so that a bad ``--out`` fails at once.
    ``whole``: the folder is swapped in whole (``atomic_dir``), so it may be neither the current
    folder (``--out .``: its scratch folder would be made inside it), nor one holding it, nor a
    mount point (the rename fails, after the work, with "Device or resource busy"); paths are
    compared as resolved. A training run, which writes inside its folder, may be any of them."""
    check_writable(target)
    if whole:
        _check_swappable(target, kind)
    check_not_inside_output(target, kind)
    check_replaceable(target, kind, replaces)


def check_not_inside_output(target: Path, kind: str) -> None:
    """``DataError`` naming ``target`` where it lies inside one of heiindex's outputs (an index, a
    sharded build, a store split, a model or a hash module folder): written there, it would make
    that folder hold what its command does not write, and so refuse to be written again (an
    index built inside the store split it read, say). A store root holds its splits, and may."""
    for folder in _resolved(target).parents:
        what = output_kind(folder)
        if what is not None:
            raise DataError(
                target,
                f"lies inside {folder}, {what}: {kind} there would leave that folder holding what it does not "
                "write, and unable to be written again; choose a folder outside it",
            )


def output_kind(folder: Path) -> str | None:
    """Which of heiindex's outputs ``folder`` holds, by its manifest.json or config.json ("an
    index", "a sharded build", "a store split", "a model", "a hash module"), else None (a JSON
    file of another tool by either name is not one)."""
    manifest = manifest_object(folder)
    if manifest is not None:
        if manifest.get("kind") == "sharded":
            return "a sharded build"
        if "matcher" in manifest:
            return "an index"
        if store_split_manifest(folder) is not None:
            return "a store split"
    config = manifest_object(folder, "config.json")
    kind = config.get("kind") if config is not None else None
    return {"scan": "a model", "hei-hash": "a hash module"}.get(kind)


def check_writable(target: Path) -> None:
    """``DataError`` naming ``target`` unless a folder can be made there: its nearest existing
    ancestor is a folder that accepts new entries (probed with a temporary folder, removed at
    once; nothing is left behind)."""
    parent = Path(target).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(target, f"cannot be written: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".heiindex-probe-", dir=parent))
    except OSError as exc:
        raise DataError(target, f"cannot be written in {parent} ({exc.strerror or exc})") from None


def check_replaceable(target: Path, kind: str, replaces: Collection[str]) -> None:
    """A ``DataError`` unless ``target`` is absent, or a folder whose entries all match one of the
    ``replaces`` patterns (``fnmatch``: the files ``kind`` itself writes there)."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise DataError(target, f"exists and is not a folder; {kind} is written as a folder (choose another path)")
    other = sorted(
        p.name
        for p in target.iterdir()
        if not is_scratch(p.name)  # what a killed write inside it left (a plot): replaced with it
        and not any(fnmatch(p.name, pat) for pat in replaces)
    )
    if other:
        raise DataError(
            target,
            f"exists and holds what {kind} does not write ({name_some(other)}); remove them or choose another folder",
        )


def _resolved(target: Path) -> Path:
    """``target`` with its symlinks resolved; a ``DataError`` naming it for a symlink loop (Python
    raises RuntimeError or OSError there, by version)."""
    try:
        return Path(target).resolve()
    except (RuntimeError, OSError) as exc:
        raise DataError(target, f"cannot be resolved ({exc}): a symlink loop? Give another path") from None


def _check_swappable(target: Path, kind: str) -> None:
    """``check_output``'s refusal of the current folder, a folder holding it and a mount point."""
    where, cwd = _resolved(target), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        what = "the current folder" if where == cwd else f"a folder holding the current folder ({cwd})"
        raise DataError(target, f"is {what}; {kind} replaces its folder whole: give a new folder inside it")
    if os.path.ismount(where):
        raise DataError(
            target, f"is a mount point, which cannot be replaced as {kind} replaces its folder: give a folder inside it"
        )
