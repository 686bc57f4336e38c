"""Recall-versus-N plot of a bench sweep (matplotlib, imported only when asked for)."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_file
from .errors import DataError, HeiindexError
from .outputs import check_not_inside_output, check_writable, output_kind
from .settings import require_path

SWEEP_PLOT = "bench_sweep.png"  # the default plot, in the index folder (a rebuild there replaces it)

__all__ = ["check_plot_path", "plot_sweep", "require_matplotlib"]


def check_plot_path(path: str | Path, label: str = "plot") -> Path:
    """``path`` if a PNG can be written there: it ends in .png, its folder exists, and it is new
    or a PNG already (an earlier plot, replaced; any other file is refused). Checked before a
    bench runs, not after it; matplotlib would add ".png" to a path without a suffix and refuse
    other suffixes. ``label`` names the path in errors (the setting, the CLI's option, or the
    default's), and is the setting the errors name (a command line names it by its flag)."""
    path = require_path(label, path)

    def refuse(why: str) -> HeiindexError:
        return HeiindexError(f"{label} {path}: {why}", settings=(label,))

    if path.suffix.lower() != ".png":
        raise refuse("the plot is a PNG; give a path ending in .png")
    if path.parent.exists() and not path.parent.is_dir():
        raise refuse(f"{path.parent} is not a folder; give a path in a folder")
    if not path.parent.is_dir():
        raise refuse(f"no folder {path.parent} to write it in")
    if path.is_dir():
        raise refuse("is a folder; give a file path ending in .png")
    if path.exists() and not path.is_file():  # a FIFO's read for the PNG signature waited for ever
        raise refuse("is not a regular file; give a file path ending in .png")
    if path.exists() and not _is_png(path):  # an earlier plot is replaced; anything else is the user's
        raise refuse("exists and is not a PNG; the plot would replace it (choose another path)")
    own = path.name == SWEEP_PLOT and output_kind(path.parent) in ("an index", "a sharded build")
    try:
        check_writable(path)  # a folder that refuses new files (read-only, /proc, ...)
        if not own:  # a rebuild replaces an index's own plot; any other file blocks it
            check_not_inside_output(path, "the plot")
    except DataError as exc:
        raise HeiindexError(f"{label} {exc}", settings=(label,)) from None
    return path


def require_matplotlib():
    """``matplotlib.pyplot`` (drawing to files only), or a ``HeiindexError`` saying how to install
    it: checked before a bench with a sweep runs, not after it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HeiindexError(
            f"the sweep plot needs matplotlib, which cannot be imported ({exc}): pip install 'heiindex[plot]'"
        ) from None
    return plt


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """Write a PNG: R@1 and candidate recall of both directions against N (``path`` as
    ``check_plot_path`` allows)."""
    plt = require_matplotlib()
    path = check_plot_path(path)
    ns = [r["candidates"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for direction, style in (("t2i", "-"), ("i2t", "--")):
        ax.plot(ns, [r[direction]["r1"] for r in rows], style + "o", label=f"{direction} R@1 (HEI)")
        ax.plot(
            ns,
            [100 * r[direction]["candidate_recall"] for r in rows],
            style + "s",
            label=f"{direction} candidate recall",
        )
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("N (Hamming candidates re-ranked)")
    ax.set_ylabel("%")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:  # a kill while writing leaves the earlier plot, not half a PNG
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"
