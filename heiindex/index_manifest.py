"""Reading the ``manifest.json`` of a built index folder, sharded or not, without torch or FAISS.

What this module is for: the commands that open an index (``query``, ``bench``) first tell a
missing index, a sharded build and a malformed top-level manifest apart. Reading that one JSON
file takes milliseconds; importing the matcher's and FAISS's modules takes seconds, and a user
who named the wrong folder should not wait for them to be told so.
What it must not do: check an unsharded index's own fields or files (``heiindex.index`` does,
on open) or open shards (``heiindex.shards``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .store import check_fields, check_shard_entries, read_json_object

__all__ = ["SHARDED_FORMAT_VERSION", "read_index_manifest", "read_sharded_manifest", "sharded_manifest"]

SHARDED_FORMAT_VERSION = 1


def read_index_manifest(path: str | Path) -> dict:
    """The parsed ``manifest.json`` of the index (sharded or not) at ``path``; ``DataError``,
    naming it, where there is none or it is not a JSON object."""
    return read_json_object(Path(path) / "manifest.json", "no index here; run `heiindex build` first")


def sharded_manifest(path: str | Path) -> dict | None:
    """The manifest of the sharded build at ``path``; ``None`` where ``path`` holds an unsharded
    index. ``DataError``, naming the manifest, where there is none, it is not a JSON object, or it
    is of another format_version."""
    manifest = read_index_manifest(path)
    if manifest.get("kind") != "sharded":
        return None
    mpath = Path(path) / "manifest.json"
    if manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise DataError(
            mpath,
            f"sharded build of format_version {manifest.get('format_version')!r}, expected {SHARDED_FORMAT_VERSION}",
        )
    check_fields(mpath, manifest, {"split": str, "matcher.path": str, "hash.path": str, "shards": list})
    check_shard_entries(mpath, manifest["shards"], counts=True)
    return manifest


def read_sharded_manifest(path: str | Path) -> dict:
    """``sharded_manifest``, where ``path`` must hold a sharded build."""
    manifest = sharded_manifest(path)
    if manifest is None:
        raise DataError(
            Path(path) / "manifest.json",
            "the index here is not a sharded build (heiindex build --shards S writes one; the Ray engine serves those)",
        )
    return manifest
