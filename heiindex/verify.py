"""Check the files of a store or an index against the sizes and SHA-256s their manifests record,
and those of a model or hash module folder against the checksums its config.json records.

What this module is for: telling whether multi-GB features copied between machines, or kept on
a disk for months, are still the bytes that were ingested or built; a changed byte in a
features file would otherwise only show as wrong scores. It reads every recorded file once.
What it must not do: repair, rewrite or open anything as a store or an index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import cleared_by_next_write, is_set_aside, leftovers, leftovers_in, lock_file, scratch_target, writer_pid
from .attention_config import AttentionConfig  # torch-free, as all verify reads of stores and indexes
from .errors import DataError, sized
from .index_manifest import (
    attention_changes,
    check_index_manifest,
    check_shard_entries,
    check_shard_entry,
    check_sharded_manifest,
    shard_missing,
)
from .manifests import (
    MANIFEST_FILE,
    check_file_record,
    file_sha256,
    manifest_folders,
    manifest_object,
    read_json_object,
    read_unswapped,
    recorded_files,
)
from .settings import require_flag, require_path
from .store import check_store_manifest, footer_shape_disagreements, store_splits

__all__ = ["FAILED", "FileCheck", "failures", "verify"]


# The statuses that mean the data is not what its manifests record ("unrecorded", "leftover" and
# "moved" do not).
FAILED = ("changed", "missing", "invalid")


@dataclass(frozen=True)
class FileCheck:
    """One recorded file: ``status`` is "ok", "changed", "missing" or "unrecorded" (a manifest
    from a heiindex that recorded no checksums, ``path`` then the manifest; or a model's or hash
    module's file whose config.json records no checksum of it); "invalid", a
    manifest the commands reading it would refuse (``detail`` says why, as they would); or
    "leftover", a scratch folder or file an interrupted run left (``heiindex.atomic``), not part
    of the data; or "moved", a matcher or hash module folder an index records that is not there
    (the commands need it given: ``detail`` says how)."""

    path: Path
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        """Whether this file is one of the ``FAILED`` statuses."""
        return self.status in FAILED

    def to_dict(self) -> dict:
        return {"path": str(self.path), "status": self.status, "detail": self.detail}


def failures(checks: list[FileCheck]) -> str | None:
    """What ``verify``'s ``checks`` found wrong, in one line ("1 changed, 2 missing of 9 listed:
    ..."), or None where no file failed (``FileCheck.failed``)."""
    bad = [c.status for c in checks if c.failed]
    if not bad:
        return None
    counts = ", ".join(f"{bad.count(s)} {s}" for s in FAILED if s in bad)
    return (
        f"{counts} of {len(checks)} listed: files that differ from what their manifests record or are not "
        "there, or manifests heiindex cannot read"
    )


def verify(path: str | Path, models: bool = True) -> list[FileCheck]:
    """Every recorded file under ``path``: a store root (each split), a store split, an index, a
    sharded index (each shard), a matcher or hash module folder (its weights and vocabulary
    against the checksums its config.json records), or a ``train`` run (its ``best/`` and
    ``last/`` models). ``DataError`` where ``path`` is none of these. What interrupted
    runs left beside ``path`` or in it (a store root's splits are written there) is listed last,
    as "leftover". An index's matcher and hash module folders (as its manifest records them) are
    listed "changed" where they hold other weights than it was built with; ``models`` False:
    not looked at."""
    path, models = require_path("path", path), require_flag("models", models)
    if path.is_file():
        raise DataError(path, "is a file; give the folder that holds it (a store root or split, an index)")
    if not path.exists() and not path.is_symlink() and (found := leftovers(path)):
        # an output a killed run never finished: its scratch folder is all there is to list
        return _missing_beside(path, found, "no such folder", "writing it", "leftovers below")
    if not path.exists():
        raise DataError(path, "no such folder; give a store root or split, an index, or a model or hash module folder")
    if (found := _only_leftovers(path)) is not None:
        # a new store root whose first ingest was killed: its scratch split is all it holds
        return _missing_beside(path, found, "no split or index here", "writing into it", "below")
    # a rebuild that swapped the folder while it was checked read as damage ("changed"): checked again
    read = lambda: _checks(path, models)  # noqa: E731
    checks = read_unswapped(path, read) if (path / MANIFEST_FILE).is_file() else read()
    found = sorted(set(leftovers(path)) | set(leftovers_in(path)))
    return checks + _leftover_checks(found)


def _missing_beside(path: Path, found: list[Path], missing: str, writing: str, below: str) -> list[FileCheck]:
    """``path`` "missing", and the scratch ``found`` that is all there is of it, "leftover": of a
    run still writing it (named), or of one interrupted."""
    live = [pid for p in found if (pid := writer_pid(p)) is not None]
    if live:
        detail = f"{missing} yet: process {live[0]} on this machine is {writing} (below)"
    elif any(is_set_aside(p) for p in found):
        detail = f"{missing}: a run replacing it was interrupted between two renames (its previous copy is below)"
    else:
        detail = f"{missing}: a run {writing} was interrupted ({below})"
    return [FileCheck(path, "missing", detail)] + _leftover_checks(found)


def _leftover_checks(found: list[Path]) -> list[FileCheck]:
    """One "leftover" line per scratch folder ``found``."""
    return [FileCheck(p, "leftover", _leftover_detail(p)) for p in found]


def _only_leftovers(folder: Path) -> list[Path] | None:
    """The leftovers in ``folder`` where it holds nothing else of heiindex's (no manifest, no
    split or index folder; at most a store root's ``vocab.json``), else None."""
    if not folder.is_dir() or (folder / MANIFEST_FILE).exists() or manifest_folders(folder):
        return None
    found = leftovers_in(folder)
    locks = {lock_file(folder / target).name for p in found if (target := scratch_target(p.name))}  # their writers'
    others = {p.name for p in folder.iterdir()} - {p.name for p in found} - locks - {"vocab.json"}
    return found if found and not others else None


def _leftover_detail(path: Path) -> str:
    if (pid := writer_pid(path)) is not None:  # deleting it, as the line below advises, killed a live build
        return (
            f"being written by process {pid} on this machine, which is still running: not part of the data; "
            "leave it (that run puts it in place, or removes it, when it ends)"
        )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    target = path.parent / (scratch_target(path.name) or "")
    if is_set_aside(path) and not target.exists() and not target.is_symlink():
        # deleting it, as the line below advises, deleted the only copy of the output
        back = (
            f" (the next write of {target.name} on this machine puts it back first)"
            if cleared_by_next_write(path)
            else ""
        )
        return (
            f"the previous {target.name} ({sized(size)}), set aside by a run replacing it that was interrupted "
            f"between two renames: rename it back to {target.name}{back}"
        )
    return (
        f"left by an interrupted run or a replaced output that could not all be deleted ({sized(size)}), "
        "not part of the data; delete it (the next write of the same output also tries)"
    )


def _checks(path: Path, models: bool = True) -> list[FileCheck]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists() and (path / "config.json").is_file():  # a model or hash module folder
        return _weights_folder_checks(path)
    runs = [path / name for name in ("best", "last") if (path / name / "config.json").is_file()]
    if not manifest_path.exists() and runs:  # a `train` run: its best and last models
        return [check for folder in runs for check in _weights_folder_checks(folder)]
    if not manifest_path.exists() and path.is_dir() and _store_root(path):
        splits = manifest_folders(path)
        if not splits:
            raise DataError(path, "a store root without splits: nothing to verify")
        checks, manifests = [], {}
        for folder in splits:  # one split's unreadable manifest is reported, and the others checked
            manifest, unread = _readable_manifest(folder / MANIFEST_FILE)
            checks += unread if manifest is None else _folder_checks(folder, manifest)
            if manifest is not None:
                manifests[folder] = manifest
        tokenised = {folder.name: m for folder, m in manifests.items() if "vocab" in m}  # not an index beside them
        return checks + ([_vocab_check(path, tokenised)] if tokenised else [])
    manifest, unread = _readable_manifest(manifest_path)
    if manifest is None:
        return unread
    checks = _folder_checks(path, manifest, models)
    if "vocab" in manifest:  # a store split: its ids are read through the root's vocab.json
        checks.append(_vocab_check(path.parent, {path.name: manifest}))
    return checks


def _folder_checks(folder: Path, manifest: dict, models: bool = True) -> list[FileCheck]:
    """The files ``manifest`` (of ``folder``) records, or each shard's for a sharded build; with
    ``models``, an index's matcher and hash module folders where they hold other weights now
    (``_bound_models``: a sharded build's once, not again for each shard)."""
    manifest_path = folder / MANIFEST_FILE
    if manifest.get("kind") == "sharded":
        shards = manifest.get("shards")
        if not isinstance(shards, list):
            raise DataError(manifest_path, 'field "shards" is not a list of {"path": ...} entries')
        check_shard_entries(manifest_path, shards)  # folders inside the build: nothing else is read
        invalid = _invalid(lambda: check_sharded_manifest(manifest, manifest_path), manifest_path)
        shard_checks = [check for shard in shards for check in _shard_checks(folder, shard, manifest)]
        return invalid + shard_checks + ([] if invalid or not models else _bound_models(folder, manifest))
    invalid = _invalid(lambda: _check_manifest(manifest, manifest_path), manifest_path)
    if invalid and "files" not in manifest:
        return invalid
    files = _recorded_files(folder, manifest)  # files may still be the bytes recorded
    if invalid or any(check.status != "ok" for check in files):
        return invalid + files
    bound = _bound_models(folder, manifest) if models and "matcher" in manifest else []
    return _disagreements(folder, manifest) + files + bound


def _weights(recorded: dict) -> str | None:
    """ "weights 1a2b3c4d5e6f" for a matcher or hash entry of a manifest; None where it records no
    checksum (the details said "built with None")."""
    sha = recorded.get("sha256")
    return f"weights {sha[:12]}" if isinstance(sha, str) else None


def _bound_models(folder: Path, manifest: dict) -> list[FileCheck]:
    """The matcher and hash module folders an index's manifest records, where they still hold
    other weights than it was built with (a hash module trained again into its folder after the
    build): query and bench then refuse the index, which verify passed. A folder that is gone is
    no failure (the commands take ``--model`` / ``--hash`` for a moved one), but it is listed as
    "moved": verify said all was well of an index copied to another machine, which query then
    refused until given the folders."""
    found = []
    commands = "query, bench, serve" if "shards" in manifest else "query, bench"  # serve takes sharded builds
    for part, what, option in (("matcher", "a matcher", "--model"), ("hash", "a hash module", "--hash")):
        recorded = manifest.get(part)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
            continue
        if not Path(recorded["path"]).exists():
            found.append(
                FileCheck(
                    Path(recorded["path"]),
                    "moved",
                    f"{what} folder {folder} records is not there: searching it ({commands}) needs {option} "
                    f"naming the folder it was built with" + (f" ({w})" if (w := _weights(recorded)) else ""),
                )
            )
            continue
        config = manifest_object(Path(recorded["path"]), "config.json")
        info = config.get("info") if config is not None else None
        held = info.get("weights_sha256") if isinstance(info, dict) else None
        changed = _attention_changed(recorded, config) if part == "matcher" else ""
        if changed and held == recorded.get("sha256"):
            found.append(
                FileCheck(
                    Path(recorded["path"]) / "config.json",
                    "changed",
                    f"gives other attention settings than {folder} was built with ({changed}): rebuild the "
                    "index, or restore the settings",
                )
            )
        if isinstance(held, str) and held != recorded.get("sha256"):
            built = _weights(recorded) or "weights it records no checksum of"
            found.append(
                FileCheck(
                    Path(recorded["path"]) / "config.json",
                    "changed",
                    f"holds {what} of weights {held[:12]} now, where {folder} was built with {built}: rebuild the "
                    f"index, or give {option} the folder it was built with",
                )
            )
    return found


def _attention_changed(recorded: dict, config: dict | None) -> str:
    """``attention_changes`` between the attention settings an index recorded of its matcher and
    those the matcher's ``config`` (its parsed config.json) gives, defaults filled in as the
    loaders fill them; "" where the config cannot be read as a matcher's (the loaders name why)."""
    model = config.get("model") if isinstance(config, dict) else None
    settings = model.get("attention", {}) if isinstance(model, dict) else None
    try:
        held = AttentionConfig(**settings).to_dict()
    except (TypeError, ValueError):
        return ""
    return attention_changes(recorded.get("attention"), held)


# What a manifest says of its Parquet files that the commands compare with the files' footers
# when they read them: (file, the manifest field giving its rows, {list column: the fields whose
# product is its size}, {footer metadata key: the field it must equal}). The manifest itself has
# no checksum: an edited count or shape passed here.
_REGIONS, _FEATURES = ("images", "regions"), ("images", "feature_dim")
_FOOTERS = {
    "store": (
        (
            "images.parquet",
            ("images", "count"),
            {"features": (_REGIONS, _FEATURES)},
            {"regions": _REGIONS, "feature_dim": _FEATURES},
        ),
        ("captions.parquet", ("captions", "count"), {}, {}),
    ),
    "index": (
        (
            "image_features.parquet",
            ("n_images",),
            {"features": (("regions",), ("embed_size",)), "gram": (("regions",), ("regions",))},
            {"regions": ("regions",), "feature_dim": ("embed_size",)},
        ),
        ("caption_features.parquet", ("n_captions",), {}, {}),
    ),
}


def _disagreements(folder: Path, manifest: dict) -> list[FileCheck]:
    """The manifest "invalid" where its counts or feature shapes are not those of the files it
    records (whose bytes are as recorded): each command reading them would refuse it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def field(path: tuple[str, ...]):
        value = manifest
        for key in path:
            value = value[key]
        return value

    def named(path: tuple[str, ...]) -> str:
        return f"{'.'.join(path)} {field(path):,}"

    problems = []
    for name, rows, lists, meta in _FOOTERS["index" if "matcher" in manifest else "store"]:
        if not (folder / name).is_file():
            continue
        try:
            footer = pq.read_metadata(folder / name)
            schema = footer.schema.to_arrow_schema()
        except (OSError, pa.ArrowException):  # as recorded, yet unreadable: the commands say so
            continue
        if footer.num_rows != field(rows):
            problems.append(f"{named(rows)}, but {name} holds {footer.num_rows:,} rows")
        for column, factors in lists.items():
            size = getattr(schema.field(column).type, "list_size", None) if column in schema.names else None
            want = int(np.prod([field(f) for f in factors]))
            if size is not None and size != want:
                problems.append(
                    f"{' x '.join(named(f) for f in factors)} make {want:,} numbers an image in {column}, but "
                    f"{name} holds {size:,}"
                )
        wanted = {key: field(path) for key, path in meta.items()}
        for key, written, _ in footer_shape_disagreements(schema.metadata, wanted):
            problems.append(f"{named(meta[key])}, but {name} records {key} {written}")
    if not problems:
        return []
    return [FileCheck(folder / MANIFEST_FILE, "invalid", "; ".join(problems) + " (the commands refuse it)")]


def _shard_checks(build: Path, entry: dict, build_manifest: dict) -> list[FileCheck]:
    """A shard's files, or "missing" for a shard the build records whose manifest is not there
    (the other shards are still checked); its manifest "invalid" where it is not the shard the
    build records, or was built with other models than the build's (``check_shard_entry``)."""
    shard = entry["path"]
    if shard_missing(build, shard):
        return [
            FileCheck(build / shard / MANIFEST_FILE, "missing", f"shard {shard}, recorded in {build / MANIFEST_FILE}")
        ]
    mpath = build / shard / MANIFEST_FILE
    shard_manifest = manifest_object(build / shard)
    if shard_manifest is None or _invalid(lambda: _check_manifest(shard_manifest, mpath), mpath):
        return verify(build / shard, models=False)  # unreadable or invalid: the shard's own check says why, once
    checked = _invalid(lambda: check_shard_entry(build, entry, shard_manifest, build_manifest), mpath)
    return checked + verify(build / shard, models=False)


def _weights_folder_checks(folder: Path) -> list[FileCheck]:
    """A matcher's or a hash module's folder: its ``config.json``, its weights and (a matcher's)
    ``vocab.json``, each as loading the folder would find it, the weights and vocabulary against
    the checksums ``config.json`` records ("unrecorded" where it records none)."""
    from .checkpoint import VOCAB_FILE, WEIGHTS_FILE, model_checksum, read_model_config, read_vocab, read_weights
    from .hash_folder import HASH_WEIGHTS, hash_checksum, hash_config, read_hash_weights

    cfg_path = folder / "config.json"
    raw, unread = _readable_manifest(cfg_path)
    if raw is None:
        return unread
    info = raw.get("info", {})
    try:
        if raw.get("kind") == "hei-hash":
            what, config = "a hash module's config", hash_config(raw, cfg_path)
            weights, read, checksum = folder / HASH_WEIGHTS, read_hash_weights, hash_checksum
        else:  # a matcher's, or refused as neither
            what, config = "a matcher's config", read_model_config(folder)[0]
            weights, read, checksum = folder / WEIGHTS_FILE, read_weights, model_checksum
        if not isinstance(info, dict):
            raise DataError(cfg_path, f'field "info" must be an object, got {type(info).__name__}')
    except DataError as exc:
        return [FileCheck(cfg_path, "invalid", exc.problem)]
    checks = [FileCheck(cfg_path, "ok", what)]

    def recorded(path: Path, key: str, have: str) -> FileCheck:
        want = info.get(key)
        if want is None:
            return FileCheck(path, "unrecorded", f"config.json records no checksum of it ({key})")
        if want != have:
            return FileCheck(path, "changed", f"checksum {have[:12]}..., config.json records {str(want)[:12]}...")
        return FileCheck(path, "ok", "checksum as config.json records")

    if not weights.is_file():
        checks.append(FileCheck(weights, "missing", "the weights config.json describes"))
    else:
        try:
            checks.append(recorded(weights, "weights_sha256", checksum(read(weights, config))))
        except DataError as exc:
            checks.append(FileCheck(weights, "invalid", exc.problem))
    if raw.get("kind") == "hei-hash":
        return checks
    vocab = folder / VOCAB_FILE
    if not vocab.is_file():
        return checks + [FileCheck(vocab, "missing", "the matcher's vocabulary")]
    try:
        words = read_vocab(vocab, config)
    except DataError as exc:
        return checks + [FileCheck(vocab, "invalid", exc.problem)]
    return checks + [recorded(vocab, "vocab_sha256", words.checksum)]


def _store_root(path: Path) -> bool:
    """A store root: known by its vocabulary, or (vocab.json may be the file lost) by a split's
    manifest, which records the vocabulary (an index's does not)."""
    return (path / "vocab.json").is_file() or bool(store_splits(path))


def _invalid(check, manifest_path: Path) -> list[FileCheck]:
    """``[]`` where ``check()`` passes, else the manifest reported "invalid" with its reason."""
    try:
        check()
    except DataError as exc:
        return [FileCheck(manifest_path, "invalid", exc.problem)]
    return []


def _check_manifest(manifest: dict, manifest_path: Path) -> None:
    """The checks of the loaders that read ``manifest``: an index's (it names its matcher) or a
    store split's."""
    if "matcher" in manifest:
        check_index_manifest(manifest, manifest_path)
    elif "images" in manifest or "captions" in manifest:
        check_store_manifest(manifest, manifest_path)
    else:
        raise DataError(manifest_path, 'neither an index\'s nor a store split\'s: no "matcher", "images" or "captions"')


def _readable_manifest(path: Path) -> tuple[dict | None, list[FileCheck]]:
    """``(the manifest at path, [])``, or ``(None, [its "invalid" row])`` where it is there but not
    a JSON object; ``DataError`` where there is none (then the folder is not one verify checks)."""
    try:
        return read_json_object(
            path, "no manifest.json here: not a store, a store split, an index, a model or a hash module"
        ), []
    except DataError as exc:
        if not path.exists():
            raise
        return None, [FileCheck(path, "invalid", exc.problem)]


def _recorded_files(folder: Path, manifest: dict) -> list[FileCheck]:
    """The files ``manifest`` (of ``folder``) records, each checked."""
    manifest_path = folder / MANIFEST_FILE
    files = recorded_files(manifest_path, manifest)
    if files is None:
        return [FileCheck(manifest_path, "unrecorded", "no file checksums recorded (written by an older heiindex)")]
    return [_check(folder, name, record, manifest_path) for name, record in sorted(files.items())]


def _vocab_check(root: Path, manifests: dict[str, dict]) -> FileCheck:
    """The store root's ``vocab.json`` against the vocabulary each split's manifest (by split
    name) records it was tokenised with: a changed word list re-maps every id (the splits' own
    files still check "ok")."""
    from .vocab import Vocab  # here: verify reads no torch or FAISS, nor this unless a store is checked

    path = root / "vocab.json"
    if not path.is_file():
        return FileCheck(path, "missing", "the vocabulary the splits were tokenised with")
    try:
        vocab = Vocab.load(path)
    except DataError as exc:  # as every command reading the store would refuse it
        return FileCheck(path, "invalid", exc.problem)
    have = vocab.checksum
    for name, manifest in manifests.items():
        record = manifest.get("vocab")
        if not isinstance(record, dict):  # as the loaders refuse it, not a traceback from .get
            return FileCheck(
                root / name / MANIFEST_FILE,
                "invalid",
                f'field "vocab" is {record!r}, where an object with the vocabulary\'s "sha256" and "size" belongs',
            )
        want = record.get("sha256")
        if want != have:
            return FileCheck(path, "changed", f"vocabulary {have[:12]}..., split {name} records {str(want)[:12]}...")
        size = record.get("size")
        if size != len(vocab):  # the captions' token ids were then refused as outside it, blaming their file
            return FileCheck(
                root / name / MANIFEST_FILE,
                "invalid",
                f'field "vocab.size" is {size}, where {path} holds {len(vocab):,} words',
            )
    # By name: nothing records which splits a root had, so a deleted split shows only by its absence here.
    names = sorted(manifests)
    splits = (
        f"split {names[0]} records" if len(names) == 1 else f"splits {', '.join(names[:-1])} and {names[-1]} record"
    )
    return FileCheck(path, "ok", f"the vocabulary {splits}")


def _check(folder: Path, name: str, record, manifest_path: Path) -> FileCheck:
    path = folder / name  # recorded_files refused any name outside the folder
    check_file_record(manifest_path, path.name, record)
    if not path.is_file():
        return FileCheck(path, "missing", "recorded in the manifest, not on disk")
    size = path.stat().st_size
    if size != record["bytes"]:
        return FileCheck(path, "changed", f"{size:,} bytes, {record['bytes']:,} recorded")
    digest = file_sha256(path)
    if digest != record["sha256"]:
        return FileCheck(path, "changed", f"SHA-256 {digest[:12]}..., {record['sha256'][:12]}... recorded")
    return FileCheck(path, "ok", f"{size:,} bytes, SHA-256 as recorded")
