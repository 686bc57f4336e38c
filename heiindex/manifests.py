"""The JSON files heiindex writes beside its outputs, and the checksums they record.

Every output folder (a store split, an index, a sharded build) holds a ``manifest.json``; model
and hash module folders a ``config.json``. This module reads them (naming the file and the field
where one is malformed), writes them, and records and checks the ``{"bytes", "sha256"}`` of each
file a manifest describes (what ``heiindex verify`` compares).
What this module must not do: know what a manifest of any one kind must hold beyond recognising
it (``heiindex.store``, ``heiindex.index_manifest`` check their own).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .atomic import interrupted_hint
from .errors import DataError, one_line

__all__ = [
    "MANIFEST_FILE",
    "check_fields",
    "check_file_record",
    "config_section",
    "data_folder_hint",
    "entry_name",
    "file_record",
    "file_sha256",
    "manifest_digest",
    "manifest_folders",
    "manifest_object",
    "read_json_object",
    "read_unswapped",
    "recorded_file",
    "recorded_files",
    "store_split_manifest",
    "write_json",
]

MANIFEST_FILE = "manifest.json"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def manifest_folders(root: Path) -> list[Path]:
    """The folders of ``root`` that hold a manifest (store splits, indexes kept beside them), by
    name; hidden ones (the leftovers of atomic swaps) are not listed."""
    return sorted(p for p in Path(root).iterdir() if not p.name.startswith(".") and (p / MANIFEST_FILE).is_file())


def file_record(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of a file, as manifests record the files they describe
    (``heiindex verify`` checks them)."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def recorded_files(manifest_path: Path, manifest: dict, required: tuple[str, ...] = (), why: str = "") -> dict | None:
    """``manifest``'s ``"files"`` (name -> ``file_record``), or None where it records none (written
    by an older heiindex); ``DataError`` naming ``manifest_path`` where it is not an object, or
    where it records files but not each of ``required`` (``why``: who records them all; a file
    left out went unchecked, and verify listed the others "ok" over a damaged one)."""
    files = manifest.get("files")
    if files is not None and not isinstance(files, dict):
        raise DataError(manifest_path, f'field "files" must be an object, got {type(files).__name__}')
    for name in files or ():  # nothing outside the folder (a query read on, where verify refused it)
        if not entry_name(name):
            raise DataError(manifest_path, f'field "files" must name files in this folder, got {name!r}')
    missing = [name for name in required if files is not None and name not in files]
    if missing:
        raise DataError(manifest_path, f'field "files" records no {", ".join(missing)} ({why})')
    return files


def recorded_file(manifest_path: Path, manifest: dict, name: str) -> dict | None:
    """``manifest``'s record ``{"bytes", "sha256"}`` of the file ``name`` (``file_record``), or
    None where the manifest records no files at all. ``DataError`` naming ``manifest_path`` where
    "files" is not an object or this record is missing or malformed."""
    files = recorded_files(manifest_path, manifest)
    return None if files is None else check_file_record(manifest_path, name, files.get(name))


def check_file_record(manifest_path: Path, name: str, record) -> dict:
    """``record`` where it is a ``file_record``; else ``DataError`` naming the manifest's field."""
    if not (
        isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str)
    ):
        raise DataError(manifest_path, f'field "files.{name}" must hold "bytes" and "sha256", got {record!r}')
    return record


def data_folder_hint(path: Path) -> str:
    """Where ``path`` lies where the default models and data are looked for (``models/``,
    ``coco-sim/`` and ``coco-captions/`` of the folder ``HEIINDEX_DATA`` names), that the variable
    names that folder (and where it is not one, that too): a default model looked for in an empty
    data folder was named with no word of why there."""
    env = os.environ.get("HEIINDEX_DATA")
    if not env:
        return ""
    parents, root = Path(path).resolve().parents, Path(env).resolve()
    if not any(root / part in parents for part in ("models", "coco-sim", "coco-captions")):
        return ""
    where = "" if root.is_dir() else (", but it is a file" if root.exists() else ", which does not exist")
    return f" (HEIINDEX_DATA={env} names the folder where the default models and data are looked for{where})"


def read_json_object(path: Path, missing: str) -> dict:
    """The JSON object in ``path``; ``DataError`` naming it where it is missing (``missing`` says
    what to do), not valid JSON, or not an object."""
    if not path.exists():
        folder = path.parent  # a folder a killed run was writing, or replacing: name what it left
        left = "" if folder.exists() else interrupted_hint(folder)
        raise DataError(path, missing + left + data_folder_hint(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4,300 digits
        raise DataError(path, f"not valid JSON ({one_line(exc)})") from None
    except RecursionError:  # arrays nested 100,000 deep: a traceback
        raise DataError(path, "not valid JSON (nested too deeply to read)") from None
    except OSError as exc:
        raise DataError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, f"must hold a JSON object, got {type(data).__name__}")
    return data


def check_fields(path: Path, data: dict, spec: dict[str, type | tuple[type, ...]]) -> None:
    """``DataError`` naming ``path`` and the first field of ``spec`` (dotted paths into nested
    objects, e.g. ``"images.count"``) that ``data`` lacks or holds with another type (a bool is
    not an int)."""
    for name, kind in spec.items():
        value = data
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise DataError(path, f'field "{name}" is missing or not of type {names} (got {value!r})')


def config_section(path: Path, data: dict, name: str, fields: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    """The object ``data[name]`` of the config file ``path`` (``name`` dotted into nested objects,
    as ``check_fields`` takes it: "model.attention"), its keys among ``fields`` and holding each of
    ``required``; else ``DataError`` naming the file and the field (where the dataclass built from
    it raised a message about its own ``__init__``)."""
    *outer, last = name.split(".")
    parent = data
    for part in outer:
        parent = parent.get(part) if isinstance(parent, dict) else None
    section = parent.get(last) if isinstance(parent, dict) else None
    if not isinstance(section, dict):
        got = "missing" if not isinstance(parent, dict) or last not in parent else f"not an object (got {section!r})"
        raise DataError(path, f'field "{name}" is {got}')
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise DataError(path, f'field "{name}" holds unknown fields {unknown}; known: {", ".join(fields)}')
    for key in required:
        if section.get(key) is None:
            raise DataError(path, f'field "{name}.{key}" is missing')
    return section


def entry_name(name) -> bool:
    """Whether ``name`` names one entry directly inside a folder (not "", "." or "..", no path
    separator, not absolute): what a manifest may name, so that nothing outside is read."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def manifest_digest(folder: Path) -> str | None:
    """The SHA-256 of ``folder``'s manifest (which build is there: a rebuild changes it), None
    where it cannot be read."""
    try:
        return file_sha256(Path(folder) / MANIFEST_FILE)
    except OSError:
        return None


def manifest_object(folder: Path, name: str = MANIFEST_FILE) -> dict | None:
    """The manifest in ``folder`` (or its JSON file ``name``, a model's ``config.json``) where it
    is a JSON object, else None."""
    try:
        found = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def store_split_manifest(folder: Path) -> dict | None:
    """The manifest of the store split in ``folder``; None where there is none, it is not a JSON
    object, or it names no split or records no vocabulary (an index's manifest names a split too,
    but no vocabulary)."""
    found = manifest_object(folder)
    return found if found is not None and "vocab" in found and isinstance(found.get("split"), str) else None


T = TypeVar("T")


def read_unswapped(folder: Path, read: Callable[[], T], tries: int = 3) -> T:
    """``read()`` of a build's ``folder`` (an index, a sharded build) as one build wrote it. A
    rebuild swaps the folder whole, and may do so while it is read: the manifest of one build
    and a code file of the next were refused as "changed since the index was built", and, where
    the swap fell between the checked files and the rest, old codes were opened beside the new
    build's features without a word (a sharded build: shards of two builds). So the manifest's
    digest is compared before and after: where it changed, the read is done again, up to
    ``tries`` times in all, whether it failed (``DataError``) or not."""
    for attempt in range(tries):
        before = manifest_digest(folder)
        try:
            result = read()
        except DataError:
            if before is None or manifest_digest(folder) == before or attempt == tries - 1:  # not a swap
                raise
            continue
        if manifest_digest(folder) == before:  # None both times: unreadable, as the read reported it
            return result
    raise DataError(
        Path(folder) / MANIFEST_FILE,
        f"changed while it was read, {tries} times: another command is rebuilding it; try again when it is done",
    )
