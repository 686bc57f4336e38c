"""Reading the ``manifest.json`` of a built index folder, sharded or not, without torch or FAISS.

What this module is for: the commands that open an index (``query``, ``bench``) first tell a
missing index, a sharded build and a malformed top-level manifest apart. Reading that one JSON
file takes milliseconds; importing the matcher's and FAISS's modules takes seconds, and a user
who named the wrong folder should not wait for them to be told so.
``heiindex.verify`` checks manifests with the same functions the loaders use.
What it must not do: read an index's other files (``heiindex.index_files`` does, on open) or open
shards (``heiindex.shards``).
"""

from __future__ import annotations

from pathlib import Path

from .atomic import interrupted_hint
from .errors import DataError
from .manifests import (
    MANIFEST_FILE,
    check_fields,
    data_folder_hint,
    entry_name,
    manifest_object,
    read_json_object,
    recorded_files,
)
from .settings import require_path

__all__ = [
    "INDEX_FILES",
    "INDEX_FORMAT_VERSION",
    "SHARDED_FORMAT_VERSION",
    "attention_changes",
    "check_index_manifest",
    "check_prototypes_entry",
    "check_shard_entries",
    "check_sharded_manifest",
    "read_index_manifest",
    "read_sharded_manifest",
    "searched_type",
    "sharded_manifest",
]

INDEX_FORMAT_VERSION = 1
# The files of an unsharded index, each recorded in its manifest's "files" (heiindex verify).
INDEX_FILES = ("image_features.parquet", "caption_features.parquet", "images.faiss", "captions.faiss")
SHARDED_FORMAT_VERSION = 1

# The fields Index.open reads from an unsharded index's manifest, and what each holds.
_INDEX_FIELDS = {
    "split": str,
    "index": dict,
    "regions": int,
    "embed_size": int,
    "n_images": int,
    "n_captions": int,
    "matcher.path": str,
    "matcher.sha256": str,
    "hash.path": str,
    "hash.sha256": str,
}


def read_index_manifest(path: str | Path) -> dict:
    """The parsed ``manifest.json`` of the index (sharded or not) at ``path``; ``DataError``,
    naming it, where there is none or it is not a JSON object."""
    path = require_path("path", path)
    if path.is_file():
        raise DataError(path, "is a file; give the index folder that holds it")
    if not path.exists():
        why = interrupted_hint(path) + data_folder_hint(path)
        raise DataError(path, f"no such folder{why}; give a folder `heiindex build` wrote, or build it")
    return read_json_object(path / "manifest.json", "no index here; run `heiindex build` first")


def check_index_manifest(manifest: dict, mpath: Path) -> None:
    """``DataError`` naming the manifest and the field unless it is an unsharded index's (a store
    split's manifest.json, an easy folder to give by mistake, is named as such)."""
    if "images" in manifest and "captions" in manifest and "matcher" not in manifest:
        raise DataError(mpath, "is a store split's manifest, not an index's: give the folder `heiindex build` wrote")
    if "shards" in manifest and "index" not in manifest:  # read as one index, it named "index" missing
        raise DataError(
            mpath,
            f'field "kind" is {manifest.get("kind")!r}, where a sharded build\'s manifest (it lists "shards") says "sharded"',
        )
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise DataError(mpath, f"format_version {manifest.get('format_version')!r}, expected {INDEX_FORMAT_VERSION}")
    check_fields(mpath, manifest, _INDEX_FIELDS)
    # a shard may hold images without captions (their captions are another shard's images')
    limits = (("regions", 1, 1 << 16), ("embed_size", 1, 1 << 16), ("n_images", 1, None), ("n_captions", 0, None))
    for field, least, most in limits:
        value = manifest[field]  # -36 reached numpy ("negative dimensions"), 10**15 its "array is too big"
        if value < least or (most is not None and value > most):
            within = f"between {least} and {most:,}" if most is not None else f"at least {least}"
            raise DataError(mpath, f'field "{field}" must be {within}, got {value}')
    _check_index_spec(manifest["index"], mpath)
    check_prototypes_entry(manifest, mpath)
    check_matcher_attention(manifest, mpath)
    check_codes_entry(manifest, mpath)
    recorded_files(mpath, manifest, INDEX_FILES, "a build records all four")  # or none, as older builds


def check_codes_entry(manifest: dict, mpath: Path) -> None:
    """``DataError`` naming the field unless the manifest's ``codes`` (where the build put its
    codes; none: the FAISS files) says "faiss", or "milvus" with the server's URI, index type and
    collections. A hand-edited store was refused as if the user had given `--codes`, with None
    as its value, and verify passed it."""
    if "codes" not in manifest:
        return
    built = manifest["codes"]
    check_fields(mpath, {"codes": built}, {"codes.store": str})
    if built["store"] not in ("faiss", "milvus"):
        raise DataError(mpath, f'field "codes.store" must be "faiss" or "milvus", got {built["store"]!r}')
    if built["store"] == "milvus":
        check_fields(
            mpath,
            manifest,
            {f"codes.{f}": str for f in ("uri", "index_type", "collections.images", "collections.captions")},
        )


def attention_changes(recorded: dict | None, held: dict) -> str:
    """How the matcher attention settings ``held`` (``AttentionConfig.to_dict``) differ from those
    a build ``recorded`` ("agg lse -> mean, lambda_lse 6.0 -> 1.5"), over the settings the build
    recorded (one added to heiindex later is no change); "" where they agree, or where the build
    recorded none (written before builds did) or no object (its manifest check says so)."""
    if not isinstance(recorded, dict):
        return ""
    return ", ".join(f"{k} {recorded[k]} -> {held.get(k)}" for k in sorted(recorded) if recorded[k] != held.get(k))


def check_matcher_attention(manifest: dict, mpath: Path) -> None:
    """``DataError`` naming the field where the manifest's ``matcher.attention`` is there but not
    an object."""
    matcher = manifest.get("matcher")
    if isinstance(matcher, dict) and not isinstance(matcher.get("attention", {}), dict):
        raise DataError(mpath, f'field "matcher.attention" must be an object, got {matcher["attention"]!r}')


# What a build records of its FAISS indexes (hamming.INDEX_TYPES and "auto"; spelled out here, which
# reads no FAISS: a test keeps the two equal)
INDEX_SPEC_TYPES = ("auto", "flat", "ivf", "hnsw")


def _check_index_spec(spec: dict, mpath: Path) -> None:
    """``DataError`` naming the field where the manifest's ``"index"`` (and each modality's) records
    a type that is none of the builds', or lists (``nlist``, ``nprobe``) that are not null or whole
    numbers >= 1: shown by query and bench, and accepted as "bogus" or -3."""
    for where, part in (
        ("index", spec),
        ("index.images", spec.get("images")),
        ("index.captions", spec.get("captions")),
    ):
        if part is None and where != "index":
            continue
        if not isinstance(part, dict) or part.get("type") not in INDEX_SPEC_TYPES:
            got = part.get("type") if isinstance(part, dict) else part
            raise DataError(mpath, f'field "{where}.type" must be one of {", ".join(INDEX_SPEC_TYPES)}, got {got!r}')
        for key in ("nlist", "nprobe"):
            value = part.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DataError(mpath, f'field "{where}.{key}" must be null or a whole number >= 1, got {value!r}')


# An index's record of its prototype image codes (heiindex.prototypes), where it has one.
_PROTOTYPE_FIELDS = {
    "prototypes.split": str,
    "prototypes.k": int,
    "prototypes.preselect": int,
    "prototypes.weight": (int, float),
    "prototypes.captions": int,
    "prototypes.store_checksum": str,
}


def check_prototypes_entry(manifest: dict, mpath: Path) -> None:
    """``DataError`` naming the manifest and the field where a ``"prototypes"`` entry is there
    but not what a build writes (absent: each image has its own code)."""
    if "prototypes" in manifest:
        check_fields(mpath, manifest, _PROTOTYPE_FIELDS)


def sharded_manifest(path: str | Path) -> dict | None:
    """The manifest of the sharded build at ``path``; ``None`` where ``path`` holds an unsharded
    index. ``DataError``, naming the manifest, where there is none, it is not a JSON object, or it
    is of another format_version."""
    manifest = read_index_manifest(path)
    if manifest.get("kind") != "sharded":
        return None
    check_sharded_manifest(manifest, Path(path) / "manifest.json")
    return manifest


def shard_missing(build: Path, shard: str) -> bool:
    """Whether the shard folder ``shard`` that the sharded build at ``build`` records holds no manifest."""
    return not (Path(build) / shard / MANIFEST_FILE).is_file()


def refuse_shard_folder(out: Path) -> None:
    """``DataError`` where ``out`` is a shard folder of a sharded build: an unsharded index written
    there was served as that shard (``check_shard_entry`` now refuses it when the build opens)."""
    build = Path(out).absolute().parent
    manifest = manifest_object(build)
    shards = manifest.get("shards") if manifest and manifest.get("kind") == "sharded" else None
    if isinstance(shards, list) and any(isinstance(e, dict) and e.get("path") == Path(out).name for e in shards):
        raise DataError(
            out,
            f"is shard {Path(out).name} of the sharded build {build}: build that again "
            f"(heiindex build --shards S --out {build}), or write the index to another folder",
        )


def check_shard_entry(build: Path, entry: dict, shard_manifest: dict, build_manifest: dict) -> None:
    """``DataError`` naming the shard's manifest unless it is the shard the build's ``entry``
    records: the same store rows and counts (a plain build written over a shard folder was served
    as that shard, its images twice, and verify passed it), and, against the build's own manifest,
    the store data, matcher and hash module it records (a split ingested again during a sharded
    build gave shards of two contents, which verify passed)."""
    held = {"store_rows": shard_manifest.get("store_rows")}
    held.update({k: shard_manifest.get(k) for k in ("n_images", "n_captions")})
    want = {k: entry.get(k) for k in held if k in entry}
    if {k: held[k] for k in want} != want:
        shown = lambda d: ", ".join(f"{k} {d[k]}" for k in want)  # noqa: E731
        raise DataError(
            Path(build) / entry["path"] / MANIFEST_FILE,
            f"is not the shard {build / MANIFEST_FILE} records ({shown(want)}; it holds {shown(held)}): "
            "was another index written here? build the sharded index again (heiindex build --shards S)",
        )
    recorded = (
        ("store", "checksum", "from store data"),
        ("matcher", "sha256", "with matcher"),
        ("hash", "sha256", "with hash"),
    )
    for part, key, built in recorded:
        want, held = (
            m[part].get(key) if isinstance(m.get(part), dict) else None for m in (build_manifest, shard_manifest)
        )
        if want is not None and held != want:
            why = (  # every shard reads the split again: an ingest in between gave shards of two contents
                "was the store split ingested again while the build ran?"
                if part == "store"
                else "was another index written here?"
            )
            raise DataError(
                Path(build) / entry["path"] / MANIFEST_FILE,
                f"was built {built} {str(held)[:12]}, not the build's {str(want)[:12]} "
                f"({Path(build) / MANIFEST_FILE}): {why} build the sharded index again (heiindex build --shards S)",
            )


def check_shards(build: Path, manifest: dict) -> None:
    """Every shard the sharded build at ``build`` records (``manifest``, its top-level one), from
    the shards' manifests alone, before any is opened: ``DataError`` naming a missing one, one
    that is not the shard recorded (``check_shard_entry``), or one built with another matcher or
    hash module than the build records (an index copied into a shard folder). Both engines check
    this: the Ray actors open their shards with each shard's own models, and served a foreign one."""
    build = Path(build)
    for entry in manifest["shards"]:
        if shard_missing(build, entry["path"]):
            raise DataError(
                build / MANIFEST_FILE,
                f"records shard {entry['path']}, which is missing (no {build / entry['path'] / MANIFEST_FILE}): "
                "build the sharded index again (heiindex build --shards S)",
            )
        shard = manifest_object(build / entry["path"])
        if shard is None:  # not a JSON object: opening the shard says so, naming the file and why
            continue
        check_shard_entry(build, entry, shard, manifest)


def check_sharded_manifest(manifest: dict, mpath: Path) -> None:
    """``DataError`` naming the manifest and the field unless it is a sharded build's top-level
    manifest of this format (its shard entries included)."""
    if manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise DataError(
            mpath,
            f"sharded build of format_version {manifest.get('format_version')!r}, expected {SHARDED_FORMAT_VERSION}",
        )
    check_fields(
        mpath,
        manifest,
        {"split": str, "matcher.path": str, "hash.path": str, "shards": list, "n_images": int, "n_captions": int},
    )
    check_prototypes_entry(manifest, mpath)
    check_matcher_attention(manifest, mpath)
    check_shard_entries(mpath, manifest["shards"], counts=True)
    _check_shards_cover(mpath, manifest)


def _check_shards_cover(mpath: Path, manifest: dict) -> None:
    """``DataError`` unless the shard entries' store rows follow each other from row 0 to the
    build's ``n_images``, each as many as its ``n_images``, and their captions add up to
    ``n_captions``: a shard entry deleted from the manifest was served as a build of the rest."""
    shards, start = manifest["shards"], 0
    for i, entry in enumerate(shards):
        rows = entry.get("store_rows")
        whole = isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows)
        if not whole or rows[0] != start or rows[1] - rows[0] != entry["n_images"]:
            raise DataError(
                mpath,
                f'field "shards[{i}].store_rows" is {rows!r}, where [{start}, {start + entry["n_images"]}] '
                f"belongs (the rows after the shards before it, as many as its n_images {entry['n_images']}): "
                "build the sharded index again (heiindex build --shards S)",
            )
        start = rows[1]
    captions = sum(entry["n_captions"] for entry in shards)
    for field, total in (("n_images", start), ("n_captions", captions)):
        if manifest[field] != total:
            raise DataError(
                mpath,
                f'field "{field}" is {manifest[field]}, where its {len(shards)} shards hold {total}: '
                "is a shard entry missing? build the sharded index again (heiindex build --shards S)",
            )


def read_sharded_manifest(path: str | Path) -> dict:
    """``sharded_manifest``, where ``path`` must hold a sharded build."""
    manifest = sharded_manifest(path)
    if manifest is None:
        raise DataError(
            Path(path) / "manifest.json",
            "the index here is not a sharded build (heiindex build --shards S writes one; the Ray engine serves those)",
        )
    return manifest


def searched_type(spec: dict) -> str:
    """The FAISS index type a build's queries search, from its manifest's ``"index"``: what
    ``auto`` chose ("flat"), or each modality's where they differ ("ivf (images), flat (captions)")."""
    images, captions = (spec.get(m, {}).get("type", spec["type"]) for m in ("images", "captions"))
    return images if images == captions else f"{images} (images), {captions} (captions)"


def check_shard_entries(mpath: Path, entries: list, counts: bool = False) -> None:
    """A sharded manifest's ``shards``: at least one ``{"path": NAME}``, each NAME a distinct folder
    directly inside the build (what ``heiindex.shards.write_shards`` writes); with ``counts``, each
    also with whole-number ``n_images`` and ``n_captions``."""
    if not entries:
        raise DataError(mpath, 'field "shards" lists no shard')
    seen = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(mpath, f'field "shards[{i}]" must be an object {{"path": ...}}, got {entry!r}')
        name = entry.get("path")
        if not entry_name(name):
            raise DataError(mpath, f'field "shards[{i}].path" must name a folder inside the build, got {name!r}')
        if name in seen:
            raise DataError(mpath, f'field "shards[{i}].path" names shard {name!r} a second time')
        seen.add(name)
        for field in ("n_images", "n_captions") if counts else ():
            value = entry.get(field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(mpath, f'field "shards[{i}].{field}" is missing or not of type int (got {value!r})')
