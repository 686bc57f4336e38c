"""Checks of settings: numeric ranges (training and model configs, search breadths), paths and names.

What this module is for: one message shape for a setting out of range, so that a NaN learning
rate, a batch of one or zero epochs is refused by name when a config is made (by the library
or by the CLI's flags) instead of training on garbage or failing deep inside torch.
What it must not do: know any particular config (``require_breadth`` knows FAISS's C int limit
on ``nprobe`` and ``ef_search``, which every index type and the CLI check alike).
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path

from .errors import HeiindexError

__all__ = [
    "SettingError",
    "is_whole",
    "require",
    "require_config",
    "require_flag",
    "require_name",
    "require_path",
    "settle",
    "settle_flag",
]


class SettingError(HeiindexError, ValueError):
    """A setting out of range; ``setting`` is its name, and ``also`` the names of other settings
    the message names; ``settings`` holds both (the CLI names the flags that set them: see
    ``heiindex.errors``). A ``HeiindexError`` as every refusal is, and a ``ValueError`` as it was
    before it was one."""

    def __init__(self, setting: str, message: str, also: tuple[str, ...] = ()) -> None:
        super().__init__(message, settings=(setting, *also))
        self.setting = setting
        self.also = tuple(also)

    def __reduce__(self):  # pickled as made (a Ray actor's refusal reaches the driver whole)
        return type(self), (self.setting, str(self), self.also)


def is_whole(value) -> bool:
    """A whole number: an int or a numpy integer, not a bool (True is not a count) and not 3.0."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def require(
    name: str,
    value,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    integer: bool = False,
):
    """A ``SettingError`` naming ``name`` unless ``value`` is a finite number (a whole number where
    ``integer``: a bool or 3.0 is refused, a numpy integer taken), at least ``at_least``, greater
    than ``above``, at most ``at_most`` and less than ``below`` where given. Returns ``value`` as a Python ``int`` (what
    FAISS and Python's slicing take) or ``float``."""
    ok = is_whole(value) if integer else isinstance(value, Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (at_least is None or value >= at_least) and (above is None or value > above)
    ok = ok and (at_most is None or value <= at_most) and (below is None or value < below)
    if not ok:
        want = ["a whole number" if integer else "a finite number"]
        if at_least is not None:
            want.append(f"at least {_num(at_least)}")
        if above is not None:
            want.append(f"greater than {_num(above)}")
        if at_most is not None:
            want.append(f"at most {_num(at_most)}")
        if below is not None:
            want.append(f"less than {_num(below)}")
        raise SettingError(name, f"{name} must be {', '.join(want)}, got {value!r}")
    return int(value) if integer else float(value)


def require_path(name: str, value) -> Path:
    """``value`` as a ``Path``; a ``SettingError`` naming ``name`` unless it is a non-empty str or
    path-like (None reached pathlib as a bare TypeError) that is valid UTF-8 (pyarrow and FAISS
    take UTF-8 paths: another ended in a bare codec error)."""
    if isinstance(value, (str, os.PathLike)) and str(value):
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            raise SettingError(name, f"{name} {str(value)!r} is not valid UTF-8, which heiindex's files need") from None
        return Path(value)
    raise SettingError(name, f"{name} must be a path (str or pathlib.Path), got {value!r}")


def require_name(name: str, value) -> str:
    """``value`` where it is a non-empty str that names one folder, written as such ("test") or
    another way ("./test", "test/"), else a ``SettingError`` naming ``name`` (a split's name:
    "../s/test" opened a split of another store root). Returned as the folder's name ("test"):
    callers compare names (ingest took "./train" for a split other than train)."""
    if not isinstance(value, str) or not value:
        raise SettingError(name, f"{name} must be a non-empty string, got {value!r}")
    from .manifests import entry_name  # here, not at the top: the CLI imports this module at start-up

    folder = os.path.normpath(value)
    if not entry_name(folder) or "\0" in folder:  # what a manifest may name, once normalised
        raise SettingError(name, f"{name} must name one folder of the store root, got {value!r}")
    return folder


def require_config(name: str, value, kind: type):
    """``value`` where it is a ``kind`` (a config class), else a ``HeiindexError`` naming ``name``
    (a dict given for a config failed on its first attribute, far from the call)."""
    if not isinstance(value, kind):
        raise HeiindexError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def require_flag(name: str, value) -> bool:
    """``value`` as a Python bool where it is true or false (a numpy bool too), else a
    ``SettingError`` naming ``name``: a string such as "no" is truthy, and was taken as true."""
    if isinstance(value, bool):
        return value
    import numpy as np  # only for what is not a bool: the CLI imports this module at start-up, numpy-free

    if not isinstance(value, np.bool_):
        raise SettingError(name, f"{name} must be true or false, got {value!r}")
    return bool(value)


def settle_flag(config, name: str) -> None:
    """``require_flag`` for field ``name`` of the frozen dataclass ``config``, storing a Python bool."""
    object.__setattr__(config, name, require_flag(name, getattr(config, name)))


def settle(config, name: str, **checks) -> None:
    """``require`` for field ``name`` of the frozen dataclass ``config``, storing what it returns: a
    numpy number becomes a Python int or float, so that the config can be written as JSON (and
    torch, which takes no numpy integer for a layer size, is given an int)."""
    object.__setattr__(config, name, require(name, getattr(config, name), **checks))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


MAX_BREADTH = 2**31 - 1  # FAISS keeps nprobe and efSearch in a C int


def require_breadth(nprobe: int | None, ef_search: int | None) -> tuple[int | None, int | None]:
    """How widely an approximate index is to search (``heiindex.hamming.set_search_breadth``):
    ``nprobe`` and ``ef_search`` each None or a whole number in [1, 2**31 - 1], else a
    ``SettingError`` naming it. Here, beside the other checks, so that a command can refuse a bad
    value before it reads an index (or imports FAISS)."""
    out = []
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None:
            value = require(name, value, at_least=1, integer=True)
            if value > MAX_BREADTH:
                raise SettingError(name, f"{name} must be at most {MAX_BREADTH:,}, got {value:,}")
        out.append(value)
    return out[0], out[1]
