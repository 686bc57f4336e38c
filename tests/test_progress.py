from __future__ import annotations

import io
import sys

from heiindex.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_only_where_asked_and_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar(10, "encode images", True, unit="img")
    bar.update(4)
    bar.close()
    drawn = sys.stderr.getvalue()
    assert drawn.startswith("\rencode images:   0%|") and "0/10" in drawn and "img/s" in drawn
    assert drawn.endswith(" \r")  # cleared when done (leave=False), not left as a line
    monkeypatch.setattr(sys, "stderr", _Terminal())
    progress_bar(10, "encode images", False).close()  # not asked for
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # asked for, but a pipe or a log: nothing
    bar = progress_bar(10, "encode images", True)
    bar.update(10)
    bar.close()
    assert sys.stderr.getvalue() == ""


def test_a_bar_over_an_iterable_yields_it_whole(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert list(progress_bar(3, "search", True, unit="query", iterable=iter("abc"))) == ["a", "b", "c"]
    assert "search:" in sys.stderr.getvalue() and "query" in sys.stderr.getvalue()
