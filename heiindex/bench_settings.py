"""The settings of a bench that do not depend on the index it runs on.

``check_bench_settings`` is called by the command line before it opens an index (a bad setting
used to fail after the whole bench, or after seconds of reading) and by ``heiindex.bench.run_bench``
before any pass. It imports neither torch nor FAISS, so that the command line can say so first.
"""

from __future__ import annotations

from pathlib import Path

from .evaluation import check_protocols
from .plot import check_plot_path, require_matplotlib
from .settings import SettingError, require

__all__ = ["check_bench_settings", "refuse_for_sharded", "sweep_values"]


def sweep_values(sweep) -> list[int]:
    """The N values of ``sweep`` (None: none) as Python ints; ``SettingError`` naming "sweep"
    where it is not a collection of whole numbers."""
    if sweep is None:
        return []
    if isinstance(sweep, (str, bytes)) or not hasattr(sweep, "__iter__"):
        raise SettingError("sweep", f"sweep must be a list of whole numbers (the N values), got {sweep!r}")
    return [require("sweep", n, integer=True) for n in sweep]


def check_bench_settings(
    sweep=None, plot: str | Path | None = None, repeats: int = 1, protocols: str = "auto"
) -> tuple[list[int], Path | None, int]:
    """The bench settings that do not depend on the index, checked before one is opened (the
    command line) or any pass runs (``run_bench``): a bad one used to fail after the whole bench.
    Returns the ``sweep`` values sorted and distinct, the ``plot`` path checked (it draws the sweep,
    so it needs one, and matplotlib) and ``repeats``."""
    repeats = require("repeats", repeats, at_least=1, integer=True)
    check_protocols(protocols)
    sweep = sorted(set(sweep_values(sweep)))
    if plot is not None:
        if not sweep:
            raise SettingError("plot", "plot draws the `sweep` table; give `sweep` too", also=("sweep",))
        plot = check_plot_path(plot, "plot")
        require_matplotlib()
    return sweep, plot, repeats


def refuse_for_sharded(sweep: list[int], repeats: int, protocols: str) -> None:
    """Settings, as ``check_bench_settings`` returns them, that a sharded build's bench
    (``run_sharded_bench``) cannot honour: it has no sweep, no exhaustive pass to repeat, and no
    1K folds. The command line calls it once it knows the build is sharded, before shards are read."""
    if sweep:
        raise SettingError("sweep", "sweep runs on an unsharded build, in this process")
    if repeats != 1:
        raise SettingError(
            "repeats", "repeats runs on an unsharded build (a sharded one has no exhaustive pass to compare)"
        )
    if protocols == "1k":
        raise SettingError(
            "protocols", "protocols 1k runs on an unsharded build; a sharded one is benched over the whole split"
        )
