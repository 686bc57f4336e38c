"""A text file's lines as people count them (caption files and query files)."""

from __future__ import annotations

import pytest

from heiindex.errors import DataError
from heiindex.textlines import text_lines


@pytest.mark.parametrize(
    "data, lines",
    [
        (b"", []),
        (b"\n", [""]),
        (b"a dog\ntwo cats", ["a dog", "two cats"]),
        (b"a dog\r\ntwo cats\r\n", ["a dog", "two cats"]),
        (b"a dog\n\r", ["a dog", ""]),  # a lone "\r" after the last line end is a line of its own
        (b"a dog\r\r\n", ["a dog\r"]),  # one "\r" is the line end's
        (b"a\fdog\von\xe2\x80\xa8grass\n", ["a\fdog\von\u2028grass"]),  # line ends are "\n" only
        (b"\xef\xbb\xbf", []),
        (b"\xef\xbb\xbfa dog\n", ["a dog"]),
        (b"a dog\n\xef\xbb\xbftwo cats\n", ["a dog", "\ufefftwo cats"]),  # a mark only counts first
    ],
)
def test_lines(data, lines):
    assert text_lines(data, "f.txt") == lines


@pytest.mark.parametrize("mark", [b"", b"\xef\xbb\xbf"])
def test_bad_bytes_are_named_by_line_with_or_without_a_byte_order_mark(mark):
    """Decoding as "utf-8-sig" counted the error's offset from after the mark, which could miss
    the line end before it (line 1 for line 2 here)."""
    with pytest.raises(DataError, match=r"f.txt: line 2: bytes are not valid UTF-8 \(invalid start byte\)"):
        text_lines(mark + b"a\n\xff\n", "f.txt")


def test_a_utf16_file_is_named_as_such():
    """It read "line 1: bytes are not valid UTF-8 (invalid start byte)"."""
    import codecs

    for bom in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        with pytest.raises(DataError, match=r"^f\.txt: is UTF-16 \(its byte-order mark says so\); save it as UTF-8$"):
            text_lines(bom + "a dog\n".encode("utf-16-le" if bom == codecs.BOM_UTF16_LE else "utf-16-be"), "f.txt")


def test_a_query_file_is_its_lines_without_the_blank_ones_at_the_end():
    """heiindex.search.query_file_lines, the lines ``query --file`` searches (the CLI's tests
    give its refusals through the command)."""
    from heiindex.errors import HeiindexError
    from heiindex.search import query_file_lines

    assert query_file_lines(b"\xef\xbb\xbfa dog\r\n\ntwo cats\n \n\n", "q.txt") == ["a dog", "", "two cats"]
    for data, message in (
        (b"a dog\rtwo cats\r\n", r"^q\.txt line 1: holds a carriage return \(\\r\) inside the line"),
        (b" \n\n", r"^q\.txt holds no queries: give one query per line$"),
        (b"a dog\n\xff\n", r"^q\.txt line 2: bytes are not valid UTF-8 \(invalid start byte\)$"),
    ):
        with pytest.raises(HeiindexError, match=message):
            query_file_lines(data, "q.txt")
