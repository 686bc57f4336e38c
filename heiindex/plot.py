"""Recall-versus-N plot of a bench sweep (matplotlib, imported only when asked for)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_sweep"]


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """Write a PNG: R@1 and candidate recall of both directions against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("plots need matplotlib: pip install 'heiindex[plot]'") from exc
    path = Path(path)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
