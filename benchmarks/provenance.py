"""What a benchmark's JSON records about the code it measured: the commit of this checkout and
whether it had uncommitted changes (a figure in RESULTS.md can then be traced to its code)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout(repo: Path = REPO) -> dict:
    """``{"commit": sha or None, "uncommitted_changes": bool or None}`` (None outside a git
    checkout, or without git)."""
    git = ["git", "-C", str(repo)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}
