"""Splitting a UTF-8 text file into its lines, as people count them: one caption file of a
precomp folder, or one file of queries for ``heiindex query --file``.

What it must not do: strip, skip or judge a line's content; each caller decides what an empty
or blank line means for it.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import DataError

__all__ = ["text_lines"]


def text_lines(data: bytes, name: str | Path) -> list[str]:
    """The lines of ``data``, a text file's bytes, so that line N of a message is the file's
    line N: UTF-8, a leading byte-order mark dropped, split at "\\n" only (not at "\\f", "\\v"
    or U+2028, which may stand inside a line), one "\\r" before each line end dropped, and no
    empty line after the file's final line end. ``DataError`` naming ``name`` and the line where
    the bytes are not UTF-8, or naming ``name`` where a byte-order mark says it is UTF-16."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # else "line 1: ... invalid start byte"
        raise DataError(name, "is UTF-16 (its byte-order mark says so); save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # here, not by decoding "utf-8-sig": error offsets count from it
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(name, f"line {line}: bytes are not valid UTF-8 ({exc.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # after the final line end (a lone "\r" there is a line)
    return [line.removesuffix("\r") for line in lines]
