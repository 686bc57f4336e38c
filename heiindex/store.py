"""Parquet stores of one split: region features of images, tokenised captions, a manifest.

Layout of a store root (``heiindex ingest --out ROOT``)::

    ROOT/vocab.json               the vocabulary every split of this root is encoded with
    ROOT/{split}/images.parquet   image_id int64, features fixed_size_list<float32>[R*D]
    ROOT/{split}/captions.parquet caption_id int64, image_id int64, text string, tokens list<int32>
    ROOT/{split}/manifest.json    sources, shapes, dtypes, counts, checksums, format version

Files are written by streaming, one row group per block of images, into a scratch folder
beside the target that is swapped into place only once complete (``heiindex.atomic``); a
failure leaves no partial output and an older store of that split untouched. Readers go row group by row group.
What this module must not do: parse precomp files or tokenise text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DataError, name_some, one_line
from .manifests import (
    MANIFEST_FILE,
    check_fields,
    manifest_folders,
    read_json_object,
    recorded_file,
    recorded_files,
    store_split_manifest,
)
from .outputs import check_not_inside_output
from .precomp import SPLITS as PRECOMP_SPLITS
from .settings import require, require_name, require_path

if TYPE_CHECKING:
    from .vocab import Vocab

__all__ = [
    "CAPTIONS_FILE",
    "FORMAT_VERSION",
    "IMAGES_FILE",
    "CaptionTable",
    "ImageWriter",
    "SplitStore",
    "check_caption_image_ids",
    "check_caption_columns",
    "check_column_finite",
    "check_row_count",
    "check_id_column",
    "fixed_list_values",
    "check_distinct",
    "check_store_manifest",
    "check_store_root",
    "open_parquet",
    "read_guarded",
    "reading",
    "rows_of",
    "sorted_ids",
    "store_vocab",
    "write_captions",
]

FORMAT_VERSION = 1
IMAGES_FILE = "images.parquet"
CAPTIONS_FILE = "captions.parquet"
_COMPRESSION = "zstd"


def check_row_count(path: Path, pf: pq.ParquetFile, count: int, what: str, recorded_as: str) -> None:
    """``DataError`` naming ``path`` where its footer (``pf``, opened) counts other than ``count``
    rows, which ``recorded_as`` records: said before any row is read, since a reader of a file
    with more rows would leave the rest out without a word."""
    rows = pf.metadata.num_rows
    if rows != count:
        raise DataError(path, f"holds {rows} {what}; {recorded_as} says {count}")


def open_parquet(path: Path, columns=(), pre_buffer: bool = True, record: dict | None = None) -> pq.ParquetFile:
    """``path`` opened as Parquet (its footer read, nothing else). A ``DataError`` names ``path``
    where it is not Parquet or is cut short (pyarrow's own message names no file), and the first
    of ``columns`` its schema lacks. ``record``: the manifest's ``file_record`` of it, whose size
    it must have (another split's file, or one written again, passed every other check and was
    read without a word; the whole checksum is ``heiindex verify``'s). Pages written with
    checksums (heiindex writes them) are checked as they are read: bytes flipped inside a
    compressed page could decode to other numbers without an error."""
    if record is not None:
        size = path.stat().st_size if path.is_file() else None
        if size is not None and size != record["bytes"]:
            raise DataError(
                path,
                f"is {size:,} bytes, where its manifest records {record['bytes']:,}: it is not the file that was "
                "written here (`heiindex verify` compares every file with its checksum)",
            )
    try:
        pf = pq.ParquetFile(path, pre_buffer=pre_buffer, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:  # a damaged footer is an OSError ("Couldn't deserialize thrift")
        if isinstance(exc, FileNotFoundError):
            raise DataError(path, "missing") from exc
        raise DataError(path, f"not a readable Parquet file ({one_line(exc)})") from exc
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(path, f'no column "{missing[0]}" (columns: {", ".join(names)})')
    return pf


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn what pyarrow raises while decoding ``path`` (a damaged page, a short read: its own
    message names no file) into a ``DataError`` naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            path, f"cannot be read ({one_line(exc)}); `heiindex verify` compares it with its checksum"
        ) from exc


def read_guarded(items: Iterable, path: Path) -> Iterator:
    """The items of ``items`` (pyarrow row groups or batches of ``path``, decoded lazily), each
    read under ``reading(path)``."""
    with reading(path):
        it = iter(items)
    while True:
        with reading(path):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def fixed_list_values(path: Path, column: str, array: pa.Array, width: int) -> np.ndarray:
    """The values of ``array`` (one chunk or batch of ``column`` of ``path``), flat: a column of
    fixed-size lists of ``width`` numbers each. ``DataError`` naming the file and the column where
    it holds another list type or width, or null rows (which ``flatten`` skips: the values would
    be too few for the rows)."""
    t = array.type
    # the type first: a column of another kind (bytes, as other tools save arrays) has no flatten
    if not (pa.types.is_fixed_size_list(t) and t.list_size == width and pa.types.is_floating(t.value_type)):
        raise DataError(path, f'column "{column}" does not hold {width} floats for each of its rows ({t})')
    values = array.flatten().to_numpy(zero_copy_only=False)  # flatten: this slice's own values
    if values.size != len(array) * width:
        raise DataError(path, f'column "{column}" does not hold {width} floats for each of its rows ({t})')
    return values


def check_column_finite(path: Path, column: str, values: np.ndarray, ids: np.ndarray | None = None) -> None:
    """``DataError`` naming ``path`` and ``column`` where ``values`` (one block of the column) holds
    NaN or inf: a damaged page can decode to them without an error, and they would pass into
    every score. ``ids``: the block's row ids (first dimension of ``values``), to name one."""
    if np.isfinite(values).all():
        return
    where = ""
    if ids is not None:
        bad = ~np.isfinite(values.reshape(len(ids), -1)).all(axis=1)
        where = f" (image_id {name_some([str(int(i)) for i in ids[bad]])})"
    raise DataError(
        path, f'column "{column}" holds NaN or infinite values{where}; `heiindex verify` tells whether it is damaged'
    )


def sorted_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids ascending, the row of each)``: what ``rows_of`` searches (16 bytes an id)."""
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def rows_of(ids: tuple[np.ndarray, np.ndarray], wanted) -> np.ndarray:
    """The row of each of ``wanted`` among distinct ids (``sorted_ids`` of them), -1 where absent:
    a sorted search, for any int64 ids (negative ones too) and without a Python loop."""
    ascending, order = ids
    wanted = np.asarray(wanted, dtype=np.int64)
    if not len(ascending):
        return np.full(len(wanted), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(ascending, wanted), len(ascending) - 1)
    return np.where(ascending[at] == wanted, order[at], -1).astype(np.int64)


def check_distinct(path: Path, ids: np.ndarray, column: str) -> None:
    """``DataError`` naming ``path`` and ``column`` where one id stands on two rows: each image
    (caption) needs its own id, or captions are graded against, and results name, the wrong one."""
    values, counts = np.unique(ids, return_counts=True)
    repeated = values[counts > 1]
    if len(repeated):
        raise DataError(
            path,
            f'column "{column}" repeats {len(repeated)} ids ({name_some([str(int(v)) for v in repeated])}); '
            "each row needs its own id",
        )


def check_caption_image_ids(path: Path, caption_image_ids: np.ndarray, image_ids: np.ndarray, images: str) -> None:
    """``DataError`` naming the captions file ``path`` unless every caption's image id is one of
    ``image_ids`` (those of the file named ``images``)."""
    orphan = np.flatnonzero(~np.isin(caption_image_ids, image_ids))
    if len(orphan):
        raise DataError(
            path,
            f"caption row {int(orphan[0])} (and {len(orphan) - 1} more) names image_id "
            f"{int(caption_image_ids[orphan[0]])}, which {images} does not hold",
        )


# What a store root is, where a command was given another folder
_INGESTED = "give the store root that ingest wrote; a SCAN precomp folder is ingested into one"


_ROOT_EXPECTED = "a store root (the output folder of heiindex ingest) was expected"


def _check_root_folder(root: Path) -> None:
    """``DataError`` naming ``root`` where it does not exist or is not a folder (a store root read)."""
    if not root.exists():
        raise DataError(root, f"no such folder; {_ROOT_EXPECTED}")
    if not root.is_dir():
        raise DataError(root, f"is not a folder; {_ROOT_EXPECTED}")


def store_vocab(root: str | Path) -> Vocab:
    """The vocabulary of the store root ``root`` (its ``vocab.json``); ``DataError`` naming the
    root where it is no folder, and ``vocab.json`` where it is missing (then ``root`` is not a
    store root) or malformed."""
    from .vocab import Vocab  # here: the tokenizer it brings (nltk) is not every store reader's

    root = Path(root)
    _check_root_folder(root)
    if not (root / "vocab.json").is_file():
        there = "missing" if not (root / "vocab.json").exists() else "not a file"
        raise DataError(
            root / "vocab.json", f"{there}: not a store root (the output folder of heiindex ingest, holding vocab.json)"
        )
    return Vocab.load(root / "vocab.json")


def check_store_root(root: Path, split: str) -> None:
    """Where ``split`` is ingested into ``root``: a ``DataError`` naming it unless it is absent or
    a store root, a folder holding nothing but ``vocab.json``, folders with a manifest (its splits,
    indexes kept beside them), hidden entries, ``lost+found`` (a file system's top folder) and the
    split's own folder (``atomic_dir`` decides whether that may be replaced). An index, a split, a
    model folder, the precomp folder or a folder of the user's own is refused, not written into."""
    root = Path(root)
    if root.is_symlink() and not root.exists():
        raise DataError(root, f"is a link to {os.readlink(root)}, which does not exist; a store root is a folder")
    exists = root.exists()
    if exists and not root.is_dir():
        raise DataError(root, "exists and is not a folder; a store root is a folder (choose another path)")
    if exists and (root / MANIFEST_FILE).exists():
        raise DataError(
            root,
            f"holds a {MANIFEST_FILE}, so it is a store split or an index, not a store root; `out_root` names the "
            "folder that holds a store's splits (or a new one)",
            settings=("out_root",),
        )
    check_not_inside_output(root / split, "a store split")  # before the vocabulary is built
    if not exists:
        return
    allowed = {"vocab.json", "lost+found", split}
    other = sorted(
        p.name
        for p in root.iterdir()
        if not (p.name in allowed or p.name.startswith(".") or (p.is_dir() and (p / MANIFEST_FILE).is_file()))
    )
    if other:
        raise DataError(
            root,
            f"holds what a store root does not ({name_some(other)}); a store root holds vocab.json and its "
            "splits' folders: choose a new folder or a store root",
        )


class ImageWriter:
    """Streams ``(ids, features (b, R, D))`` blocks into ``images.parquet``, one row group each.

    Keeps running SHA-256s of the ids and of the float32 feature bytes, in order, combined at
    ``close`` (the content checksum of the manifest, independent of Parquet's encoding and of
    the block size).
    """

    def __init__(self, path: Path, regions: int, feature_dim: int, extra: dict[str, pa.DataType] | None = None):
        self.path = path
        self.regions = regions
        self.feature_dim = feature_dim
        fields = [
            pa.field("image_id", pa.int64()),
            pa.field("features", pa.list_(pa.float32(), regions * feature_dim)),
        ]
        fields += [pa.field(k, t) for k, t in (extra or {}).items()]
        self.schema = pa.schema(fields, metadata={"regions": str(regions), "feature_dim": str(feature_dim)})
        self._writer = pq.ParquetWriter(path, self.schema, compression=_COMPRESSION, write_page_checksum=True)
        self._sha_ids = hashlib.sha256()
        self._sha_features = hashlib.sha256()

    def write(self, ids: np.ndarray, features: np.ndarray, **extra: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape[1:] != (self.regions, self.feature_dim):
            raise ValueError(f"block shape {features.shape[1:]} != {(self.regions, self.feature_dim)}")
        ids = np.asarray(ids, dtype=np.int64)
        flat = pa.array(features.reshape(-1), type=pa.float32())
        cols = [pa.array(ids), pa.FixedSizeListArray.from_arrays(flat, self.regions * self.feature_dim)]
        for name in self.schema.names[2:]:
            value = np.ascontiguousarray(extra[name])
            typ = self.schema.field(name).type
            if pa.types.is_fixed_size_list(typ):
                cols.append(pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), typ.list_size))
            else:
                cols.append(pa.array(value, type=typ))
        self._writer.write_table(pa.Table.from_arrays(cols, schema=self.schema))
        self._sha_ids.update(ids.tobytes())
        self._sha_features.update(features)  # contiguous: hashed in place, not copied by tobytes()

    def close(self) -> str:
        """Finish the file; return the content checksum."""
        self._writer.close()
        return hashlib.sha256((self._sha_ids.hexdigest() + self._sha_features.hexdigest()).encode()).hexdigest()


def write_captions(path: Path, caption_ids, image_ids, texts: list[str], tokens: list[list[int]]) -> str:
    """Write ``captions.parquet``; return the content checksum (ids, texts, token ids)."""
    table = pa.table(
        {
            "caption_id": pa.array(np.asarray(caption_ids, dtype=np.int64)),
            "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
            "text": pa.array(texts, type=pa.string()),
            "tokens": pa.array(tokens, type=pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, path, compression=_COMPRESSION, row_group_size=65536, write_page_checksum=True)
    return _captions_sha(table)


def _captions_sha(table: pa.Table) -> str:
    h = hashlib.sha256()
    h.update(table.column("caption_id").to_numpy().astype(np.int64).tobytes())
    h.update(table.column("image_id").to_numpy().astype(np.int64).tobytes())
    h.update("\n".join(table.column("text").to_pylist()).encode())
    tok = table.column("tokens").combine_chunks()
    h.update(tok.offsets.to_numpy().astype(np.int64).tobytes())
    h.update(tok.values.to_numpy().astype(np.int32).tobytes())
    return h.hexdigest()


@dataclass
class CaptionTable:
    """All captions of a split in memory: their texts, and ``tokens`` (n, L) int32, as the store
    holds them, padded with 0 (``<pad>``) to the longest caption (COCO train's 566K captions, at
    most 52 tokens: about 118 MB of tokens). Consumers widen a block at a time where they need
    int64."""

    caption_ids: np.ndarray
    image_ids: np.ndarray
    texts: list[str]
    tokens: np.ndarray
    lengths: np.ndarray
    source: str | None = None  # the store's captions sha256 where these are all its captions

    def __len__(self) -> int:
        return len(self.caption_ids)

    def count_of(self, image_ids: np.ndarray) -> int:
        """How many of these captions describe one of ``image_ids``."""
        return int(np.isin(self.image_ids, image_ids).sum())

    def subset(self, keep: np.ndarray) -> CaptionTable:
        """The captions where the boolean mask ``keep`` is true, in order."""
        keep = np.asarray(keep, dtype=bool)
        return CaptionTable(
            self.caption_ids[keep],
            self.image_ids[keep],
            [t for t, k in zip(self.texts, keep, strict=True) if k],
            self.tokens[keep],
            self.lengths[keep],
        )


# The manifest fields SplitStore reads, and what each holds.
_STORE_FIELDS = {
    "split": str,
    "images.count": int,
    "images.regions": int,
    "images.feature_dim": int,
    "images.sha256": str,
    "captions.count": int,
    "captions.sha256": str,
    "vocab.sha256": str,
    "vocab.size": int,
}
_CAPTION_COLUMNS = ("caption_id", "image_id", "text", "tokens")


def check_store_manifest(manifest: dict, manifest_path: Path) -> None:
    """``DataError`` naming the manifest and the field unless it is a store split's, of this format
    (an index's manifest.json, an easy folder to give by mistake, is named as such)."""
    if "matcher" in manifest or manifest.get("kind") == "sharded":
        raise DataError(manifest_path, "is an index's manifest, not a store split's: give the store root and split")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(manifest_path, f"field format_version is {version!r}; this heiindex reads {FORMAT_VERSION}")
    check_fields(manifest_path, manifest, _STORE_FIELDS)
    for field in ("images.count", "images.regions", "images.feature_dim", "captions.count", "vocab.size"):
        part, key = field.split(".")
        if manifest[part][key] < 1:  # a negative count reached torch ("negative dimension -5")
            raise DataError(manifest_path, f'field "{field}" must be at least 1, got {manifest[part][key]}')
    recorded_files(manifest_path, manifest, (IMAGES_FILE, CAPTIONS_FILE), "an ingest records both")  # or none


def store_splits(root: Path) -> list[tuple[Path, dict]]:
    """``(folder, manifest)`` of each store split of the store root ``root``, by name (indexes
    kept beside them and hidden leftovers are not splits)."""
    return [(f, m) for f in manifest_folders(root) if (m := store_split_manifest(f)) is not None]


class SplitStore:
    """Read access to one ingested split (``ROOT/{split}``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        self.manifest = read_json_object(
            manifest_path, "no store manifest here; run `heiindex ingest` for this split first"
        )
        check_store_manifest(self.manifest, manifest_path)
        self.images_path = self.path / IMAGES_FILE
        self.captions_path = self.path / CAPTIONS_FILE
        for p in (self.images_path, self.captions_path):
            if not p.exists():
                raise DataError(p, "store file missing")
        self._images_pf: pq.ParquetFile | None = None

    def _record(self, name: str) -> dict | None:
        """The manifest's record of the store file ``name`` (None where it records no files)."""
        return recorded_file(self.path / MANIFEST_FILE, self.manifest, name)

    def _images_file(self) -> pq.ParquetFile:
        """The images file, opened (footer parsed) once: training reads it row group by row group."""
        if self._images_pf is None:
            # pre_buffer off: with it, pyarrow caches every row group a pass reads until the pass
            # ends, so reading a split held all of its features (benchmarks/build_memory.py)
            pf = open_parquet(
                self.images_path, ("image_id", "features"), pre_buffer=False, record=self._record(IMAGES_FILE)
            )
            # the footer records the shape the features were written in: a manifest edited to
            # another of the same size (regions 4 x 4 for 2 x 8) reshaped them without a word
            wanted = {"regions": self.regions, "feature_dim": self.feature_dim}
            for key, written, want in footer_shape_disagreements(pf.schema_arrow.metadata, wanted):
                raise DataError(
                    self.images_path, f"was written with {key} {written}; the manifest's images.{key} says {want}"
                )
            self._images_pf = pf
        return self._images_pf

    @classmethod
    def open(cls, root: str | Path, split: str) -> SplitStore:
        """Split ``split`` of the store root ``root`` (a split folder given as the root is named as such)."""
        root, split = require_path("root", root), require_name("split", split)  # "" opened the root as a split
        if root.exists() or not root.is_symlink():  # as store_vocab says it, not its split's manifest
            _check_root_folder(root)
        if (root / split).exists():
            return cls(root / split)
        if (given := store_split_manifest(root)) is not None:
            raise DataError(root, f"is store split {given['split']!r}, not a store root: give the folder that holds it")
        if root.is_dir() and (root / MANIFEST_FILE).exists():  # an index, say: "no store manifest in its split"
            raise DataError(
                root,
                f"holds a {MANIFEST_FILE} that is not a store split's (an index?), so it is not a store root: {_INGESTED}",
            )
        if root.is_dir():
            held = [p.name for p, _ in store_splits(root)]
            # a precomp folder, say; hidden files and lost+found are no sign of one (ingest writes beside them)
            own = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "lost+found"]
            if not held and not (root / "vocab.json").exists() and own:
                raise DataError(root, f"is not a store root (no vocab.json, no split): {_INGESTED}")
            hint = (
                f"; from a SCAN precomp folder that has it, `heiindex ingest --precomp DIR --split {split} --out {root}` "
                "writes it"
                if split in PRECOMP_SPLITS
                else ""
            )
            raise DataError(root / split, f"no such split in this store (it holds: {', '.join(held) or 'none'}){hint}")
        return cls(root / split)

    @property
    def split(self) -> str:
        return self.manifest["split"]

    @property
    def n_images(self) -> int:
        return int(self.manifest["images"]["count"])

    @property
    def n_captions(self) -> int:
        return int(self.manifest["captions"]["count"])

    @property
    def regions(self) -> int:
        return int(self.manifest["images"]["regions"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["images"]["feature_dim"])

    @property
    def checksum(self) -> str:
        """One checksum for the split's content (images and captions)."""
        return hashlib.sha256(
            (self.manifest["images"]["sha256"] + self.manifest["captions"]["sha256"]).encode()
        ).hexdigest()

    def vocab_path(self) -> Path:
        return self.path.parent / "vocab.json"

    def iter_image_blocks(
        self, block_images: int = 256, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(image_ids (b,), features float32 (b, R, D))`` of the image rows
        ``start..stop-1`` (default: all) in store order, ``block_images`` rows a block (the last
        may be shorter). Only the row groups holding those rows are read (their row counts come
        from the file's metadata); the one holding ``start`` is read from its first row.
        ``DataError`` where the file holds another number of rows than the manifest's count."""
        stop = self.n_images if stop is None else stop
        block_images = require("block_images", block_images, at_least=1, integer=True)
        start, stop = require("start", start, integer=True), require("stop", stop, integer=True)
        if not 0 <= start <= stop <= self.n_images:
            raise ValueError(f"need 0 <= start <= stop <= {self.n_images}, got start={start}, stop={stop}")
        if start == stop:
            return
        pf = self._images_file()
        check_row_count(self.images_path, pf, self.n_images, "image rows", "the manifest's images.count")
        ends = np.cumsum([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        first = int(np.searchsorted(ends, start, side="right"))  # the row group holding row `start`
        last = int(np.searchsorted(ends, stop - 1, side="right"))  # the one holding row `stop - 1`
        skip = start - (int(ends[first - 1]) if first else 0)  # its rows before `start`
        left = stop - start
        pending = None  # rows read but not yet yielded (less than a block)
        groups = range(first, last + 1)
        batches = pf.iter_batches(batch_size=block_images, row_groups=groups, columns=["image_id", "features"])
        for batch in read_guarded(batches, self.images_path):
            drop = min(skip, batch.num_rows)
            skip -= drop
            batch = batch.slice(drop, left)
            left -= batch.num_rows
            table = pa.Table.from_batches([batch])
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= block_images:
                yield self._block(pending.slice(0, block_images))
                pending = pending.slice(block_images)
            if left == 0:  # not one batch more is decoded
                break
        if pending is not None and pending.num_rows:
            yield self._block(pending)

    def _block(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        return _image_batch(table.combine_chunks().to_batches()[0], self.regions, self.feature_dim, self.images_path)

    @property
    def n_row_groups(self) -> int:
        return self._images_file().num_row_groups

    def image_id_column(self) -> np.ndarray:
        """Every image's id, in row order (the one column read)."""
        with reading(self.images_path):
            table = self._images_file().read(columns=["image_id"])
        check_id_column(self.images_path, table, "image_id")  # a null or float id was blamed on captions.parquet
        return table.column("image_id").to_numpy()

    def check_ids(self, captions: CaptionTable, captioned: int = 0) -> None:
        """``DataError`` naming the file unless image ids and caption ids are each distinct and
        every caption's image_id is an image of this split (ingest writes such stores; a
        hand-made one may not be: a build dropped the captions of a sharded split and wrote an
        index no query could use; a repeated image id gave its captions to one of its rows in
        the index and to the other in evaluation). ``captioned``: the first that many images
        must each have a caption, as recall over them needs (an index may hold images no
        caption describes)."""
        ids = self.image_id_column()
        check_distinct(self.images_path, ids, "image_id")
        check_distinct(self.captions_path, captions.caption_ids, "caption_id")
        check_caption_image_ids(self.captions_path, captions.image_ids, ids, IMAGES_FILE)
        bare = ids[:captioned][~np.isin(ids[:captioned], captions.image_ids)]
        if len(bare):
            raise DataError(
                self.captions_path,
                f"{len(bare)} of the {min(captioned, len(ids))} images evaluated have no caption (image_id "
                f"{name_some([str(int(i)) for i in bare])}); image-to-text recall needs at least one per image",
            )

    def read_row_group(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """One stored block: ``(image_ids, features (b, R, D))`` (for shuffled training passes)."""
        pf = self._images_file()
        if not 0 <= require("row group", i, integer=True) < pf.num_row_groups:
            raise ValueError(f"row group {i} outside the {pf.num_row_groups} of {self.images_path}")
        with reading(self.images_path):
            table = pf.read_row_group(i, columns=["image_id", "features"])
        return _image_batch(table.combine_chunks().to_batches()[0], self.regions, self.feature_dim, self.images_path)

    def captions(self) -> CaptionTable:
        """The split's captions; ``DataError`` naming the file where a column is missing, the row
        count is not the manifest's, or a token id lies outside the split's vocabulary."""
        pf = open_parquet(self.captions_path, _CAPTION_COLUMNS, record=self._record(CAPTIONS_FILE))  # one footer parse
        check_row_count(self.captions_path, pf, self.n_captions, "captions", "the manifest's captions.count")
        with reading(self.captions_path):
            table = pf.read(columns=list(_CAPTION_COLUMNS))
        check_caption_columns(self.captions_path, table)
        tok = table.column("tokens").combine_chunks()
        offsets = tok.offsets.to_numpy()
        values = tok.values.to_numpy()
        size = int(self.manifest["vocab"]["size"])
        if values.size and (int(values.min()) < 0 or int(values.max()) >= size):
            bad = int(values.max()) if int(values.max()) >= size else int(values.min())
            raise DataError(
                self.captions_path, f'column "tokens" holds id {bad}, outside the vocabulary of {size} words'
            )
        lengths = np.diff(offsets).astype(np.int64)
        if len(empty := np.flatnonzero(lengths == 0)):  # the encoder's GRU refused it with a traceback
            raise DataError(
                self.captions_path,
                f'column "tokens": caption row {name_some([str(r) for r in empty])} holds no token '
                "(ingest writes at least <start> and <end>)",
            )
        padded = np.zeros((len(lengths), int(lengths.max(initial=1))), dtype=np.int32)
        mask = np.arange(padded.shape[1])[None, :] < lengths[:, None]
        padded[mask] = values
        return CaptionTable(
            caption_ids=table.column("caption_id").to_numpy(),
            image_ids=table.column("image_id").to_numpy(),
            texts=table.column("text").to_pylist(),
            tokens=padded,
            lengths=lengths,
            source=self.manifest["captions"]["sha256"],
        )


def check_caption_columns(path: Path, table: pa.Table) -> None:
    """``DataError`` naming ``path`` and the column where a captions table's ids are not integers
    or hold nulls (a null id read as "cannot convert float NaN to integer"), its texts are not
    strings (pyarrow's "Expected bytes, got a 'int' object"), or its tokens not lists of integers."""
    for column in ("caption_id", "image_id"):
        check_id_column(path, table, column)
    t = table.schema.field("text").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(path, f'column "text" must hold strings, got {t}')
    if table.column("text").null_count:  # a query's table printed None's caption with a traceback
        raise DataError(path, 'column "text" has empty (null) captions')
    try:  # else Python's bare "'utf-8' codec can't decode byte 0xff", naming no file
        table.column("text").validate(full=True)
    except pa.ArrowInvalid as exc:
        raise DataError(path, f'column "text" holds a caption that is not valid UTF-8 ({one_line(exc)})') from None
    t = table.schema.field("tokens").type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(t.value_type):
        raise DataError(path, f'column "tokens" must hold lists of integer token ids, got {t}')
    tokens = table.column("tokens")
    if tokens.null_count or pc.list_flatten(tokens).null_count:  # pyarrow's "... zero_copy_only was True"
        raise DataError(path, 'column "tokens" has empty (null) captions or token ids')


def check_id_column(path: Path, table: pa.Table | pa.RecordBatch, column: str) -> None:
    """``DataError`` naming ``path`` and ``column`` unless its ids are integers without nulls that
    fit int64 (a null read as "cannot convert float NaN to integer", a float id was taken as one,
    and an unsigned id above 2**63 - 1 failed in pyarrow's words, naming no file)."""
    t = table.schema.field(column).type
    if not pa.types.is_integer(t):
        raise DataError(path, f'column "{column}" must hold integer ids, got {t}')
    values = table.column(column)
    if values.null_count:
        raise DataError(path, f'column "{column}" has empty (null) ids')
    if t == pa.uint64() and len(values) and (top := pc.max(values).as_py()) > np.iinfo(np.int64).max:
        raise DataError(path, f'column "{column}" holds id {top}, above the largest id heiindex keeps (2**63 - 1)')


def footer_shape_disagreements(
    metadata: dict[bytes, bytes] | None, wanted: dict[str, int]
) -> list[tuple[str, str, int]]:
    """``(key, recorded, wanted)`` for each shape key (``regions``, ``feature_dim``) whose value in a
    Parquet footer's metadata, as the image writer records it, is not the one wanted. A footer
    without the key (a file another tool wrote) disagrees with nothing. The store refuses the first
    when it opens its images file; ``verify`` lists them all."""
    metadata = metadata or {}
    found = []
    for key, want in wanted.items():
        value = metadata.get(key.encode())
        if value is not None and value.decode() != str(want):
            found.append((key, value.decode(), want))
    return found


def _image_batch(batch: pa.RecordBatch, regions: int, feature_dim: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    check_id_column(path, batch, "image_id")
    ids = batch.column("image_id").to_numpy()
    feats = fixed_list_values(path, "features", batch.column("features"), regions * feature_dim)
    if feats.dtype != np.float32:  # written by another tool as float16 or float64: torch met two dtypes
        feats = feats.astype(np.float32)
    check_column_finite(path, "features", feats, ids)
    if not feats.flags.writeable:
        feats = feats.copy()  # torch wants writable memory
    return ids, feats.reshape(len(ids), regions, feature_dim)
