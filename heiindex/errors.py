"""Errors heiindex raises for bad input; the CLI prints their message and exits non-zero."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataError", "HeiindexError", "ModelMismatchError"]


class HeiindexError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class DataError(HeiindexError):
    """A file does not hold what heiindex expects.

    The message names the file, the field (or line) and what was expected.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ModelMismatchError(HeiindexError):
    """An index, store or checkpoint was made with another model or data than the one given."""
