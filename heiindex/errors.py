"""Errors heiindex raises for bad input; the CLI prints their message and exits non-zero."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DataError",
    "HeiindexError",
    "HeiindexWarning",
    "LastBuiltWarning",
    "LeftoverWarning",
    "ModelMismatchError",
    "SparseListsWarning",
    "UnusedSettingWarning",
    "VocabularyWarning",
    "name_some",
]


def name_some(items: Sequence[str], sep: str = ", ", limit: int = 5) -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, then how many more there are: how an
    error names a long list of bad entries ("a, b, c, d, e and 7 more")."""
    more = f"{'; and' if sep == '; ' else ' and'} {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one, pointing at
    the first frame outside the heiindex package: the user's own line, however many of
    heiindex's functions lie between (``open_index`` -> ``Index.open`` -> ...; a fixed level
    pointed inside the package from all but one of them)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 2  # the caller of the function that warns: stacklevel 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 caption", "35 captions"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def sized(n_bytes: int) -> str:
    """A size as a message gives it: "2.5 GB", "3.1 MB", or exact bytes below 100 kB (a 1 MB need
    read "0.0 GB")."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:,.1f} GB"
    return f"{n_bytes / 1e6:,.1f} MB" if n_bytes >= 100_000 else f"{n_bytes:,} bytes"


def shown(text: str, limit: int = 40) -> str:
    """``text`` as a message shows a piece of user input: with its invisible characters escaped
    (a zero-width space made "a\u200bdog" read as "adog") and cut at ``limit`` characters."""
    out = text if text.isprintable() else repr(text)[1:-1]
    return out if len(out) <= limit else f"{out[: limit - 3]}... ({len(text):,} characters)"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message (pyarrow's, an OS error's) on one line, as a message quotes it: the
    raw bytes a damaged file puts in it escaped as ``shown`` escapes user input (``\\x0f``,
    ``\\u200b``), cut at ``limit`` characters (pyarrow's run to about 150)."""
    return shown(" ".join(str(exc).split()), limit=limit)


# How a message names a setting (a parameter of the library's functions and configs), so that
# the command line can name its flag for it instead: the message carries the names it uses in
# ``settings``, and writes each in backquotes (`nlist` 12, `index_type` flat; never nlist=12),
# except that a setting may stand bare as the message's first word (``require``'s "epochs must be
# ..."). The CLI (``cli.main._flagged``) replaces exactly those forms, where the command has a
# flag for the name; other words, `vocab.json` or "the 12 candidates", stay as they are.


class HeiindexError(Exception):
    """Base class: a problem the user can fix, with a message that says how. ``settings``: the
    names of the settings the message names (as the comment above says), for the CLI."""

    def __init__(self, *args, settings: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.settings = tuple(settings)


class DataError(HeiindexError):
    """A file does not hold what heiindex expects.

    The message names the file, the field (or line) and what was expected.
    """

    def __init__(self, path: str | Path, problem: str, settings: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", settings=settings)

    def __reduce__(self):  # pickled as made (a Ray actor's refusal reaches the driver whole)
        return type(self), (self.path, self.problem, self.settings)


class ModelMismatchError(HeiindexError):
    """An index, store or checkpoint was made with another model or data than the one given."""


class HeiindexWarning(UserWarning):
    """Something the user should know that does not stop the command (the command line prints
    each as one "Warning: ..." line on standard error, even where warnings are made errors).
    ``settings``: the settings the message names, as ``HeiindexError``'s."""

    def __init__(self, message: str, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = tuple(settings)


class SparseListsWarning(HeiindexWarning):
    """An IVF index was trained with fewer codes per list than FAISS advises for its centroids
    (``heiindex.hamming.make_binary_index``); the message says which index and what to pass."""


class UnusedSettingWarning(HeiindexWarning):
    """A setting given that the command had no use for (``nlist`` where ``index_type`` auto built
    flat indexes); the message says which and why, naming settings as the library calls them, and
    ``settings`` lists those names (the CLI names its flags for them instead)."""


class VocabularyWarning(HeiindexWarning):
    """A store split tokenised with a vocabulary that may not suit it: built from a split other
    than train, or leaving many of its words unknown (``heiindex.ingest``)."""


class LastBuiltWarning(HeiindexWarning):
    """A build on the default data wrote its index but could not record it as the last one built
    (``heiindex.default_data.mark_last_built``)."""


class LeftoverWarning(HeiindexWarning):
    """An output was written in full, but what it replaced could not all be removed (a file the
    system refuses to delete, such as one marked immutable). The message names the folder left,
    a scratch name beside the output. It is issued once the new output is in place: where
    warnings are turned into errors, the exception comes after the output was replaced (the
    command line always prints it as a "Warning:" line)."""
