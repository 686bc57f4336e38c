"""What a benchmark's JSON records about the code it measured: the commit of the ``heiindex``
package it imported and whether that package had uncommitted changes (a figure in RESULTS.md
can then be traced to its code)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout(package: Path | None = None) -> dict:
    """``{"commit", "uncommitted_changes"}`` of the ``heiindex`` package this process imports (its
    checkout's HEAD, and whether its ``heiindex/`` has uncommitted edits; a script here may run
    against another tree's package, e.g. through PYTHONPATH); None for both outside a git
    checkout, or without git."""
    if package is None:
        import heiindex

        package = Path(heiindex.__file__).resolve().parent
    git = ["git", "-C", str(package.parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", package.name], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}
