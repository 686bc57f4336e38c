"""Progress bars: one kind for every long pass (tqdm), shown only where the caller asks for them
and only on a terminal."""

from __future__ import annotations

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, shown: bool, unit: str = "it", iterable=None) -> tqdm:
    """A tqdm bar over ``total`` items (``unit``), labelled ``desc``, that is cleared when done;
    over ``iterable`` where given (iterate the bar), else advanced by ``update``. ``shown``: the
    caller's ``progress`` flag; even then tqdm draws it only where standard error is a terminal
    (``disable=None``), so logs and pipes get no bar."""
    return tqdm(iterable, total=total, unit=unit, desc=desc, disable=None if shown else True, leave=False)
