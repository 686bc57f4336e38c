"""Reading the files of a built index folder (``heiindex.index_write`` writes them).

``load_code_file`` reads one FAISS binary index of codes and checks it against the manifest
(count, bits, SHA-256); ``read_images`` and ``packed_words`` copy the re-ranking features out of
the Parquet files a row group at a time, each row checked for shape and finite values.

What this module must not do: open a whole index (``heiindex.index.Index.open`` does, through
these), or write anything.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import DataError
from .hamming import load_binary_index
from .manifests import MANIFEST_FILE, recorded_file
from .packed import PackedWords
from .store import check_column_finite, check_id_column, fixed_list_values, open_parquet, read_guarded

__all__ = ["INDEX_COLUMNS", "load_code_file", "packed_words", "read_images"]


INDEX_COLUMNS = {
    "images": ["image_id", "features", "gram"],
    "captions": ["caption_id", "image_id", "text", "tokens", "words"],
}


def load_code_file(folder: Path, what: str, manifest: dict, count: int, bits: int):
    """``folder``'s ``{what}.faiss`` (``what``: images or captions), read once. ``DataError``
    naming it where it does not hold ``count`` codes of ``bits`` bits (e.g. the two files swapped,
    or one from another build), then where its SHA-256 is not the one ``manifest`` records: FAISS
    reads a file whose codes were damaged without complaint, and the index would search with them.
    Where FAISS cannot read the file at all, a checksum that differs is what is said (a damaged
    header); the count says more of a file that reads. Hashing costs 0.1-0.2 s per 200 MB here, of
    a file read whole anyway. Read unchecked where the manifest records no files at all (an older
    heiindex, as ``verify`` reports it); a malformed record is refused as ``verify`` refuses it."""
    path = folder / f"{what}.faiss"
    record = recorded_file(folder / MANIFEST_FILE, manifest, path.name)
    data = path.read_bytes() if path.is_file() else None
    digest = None if data is None else hashlib.sha256(data).hexdigest()
    changed = record is not None and digest is not None and digest != record["sha256"]
    try:
        index = load_binary_index(path, data)
    except DataError:
        if changed:
            raise _changed_file(path, digest, record["sha256"]) from None
        raise
    if index.ntotal != count:
        raise DataError(path, f"holds {index.ntotal} codes, but the index has {count} {what}")
    if index.d != bits:
        raise DataError(path, f"holds {index.d}-bit codes, but the hash module gives {bits}")
    if changed:
        raise _changed_file(path, digest, record["sha256"])
    return index


def _changed_file(path: Path, digest: str, recorded: str) -> DataError:
    return DataError(
        path,
        f"changed since the index was built: its SHA-256 is {digest[:12]}..., {MANIFEST_FILE} "
        f"records {recorded[:12]}... (heiindex verify {path.parent} lists every changed file; build the index again)",
    )


def _row_groups(path: Path, columns: list[str], pf: pq.ParquetFile | None = None):
    """``(rows, tables)``: the file's row count and its row groups of ``columns``, read one at a
    time (no pre-buffering: a row group read is released when the next is read). A column the
    file lacks is a ``DataError``. ``pf``: the file already opened (with ``pre_buffer=False``)."""
    pf = pf or open_parquet(path, columns, pre_buffer=False)
    tables = (pf.read_row_group(i, columns=columns) for i in range(pf.num_row_groups))
    return pf.metadata.num_rows, read_guarded(tables, path)


def read_images(
    path: Path, r: int, d: int, pf: pq.ParquetFile | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image_id`` (n,), ``features`` (n, r, d) and ``gram`` (n, r, r) of an index's images file,
    read in one pass, a row group at a time, into the arrays returned."""
    n, tables = _row_groups(path, INDEX_COLUMNS["images"], pf)
    ids, out = [], {"features": np.empty((n, r, d), np.float32), "gram": np.empty((n, r, r), np.float32)}
    pos = 0
    for table in tables:
        check_id_column(path, table, "image_id")
        ids.append(table.column("image_id").to_numpy())
        for column, array in out.items():
            flat, at = array.reshape(n, int(np.prod(array.shape[1:]))), pos
            for chunk in table.column(column).chunks:
                values = fixed_list_values(path, column, chunk, flat.shape[1])
                check_column_finite(path, column, values)
                flat[at : at + len(chunk)] = values.reshape(len(chunk), flat.shape[1])
                at += len(chunk)
        pos += table.num_rows
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), out["features"], out["gram"]


def packed_words(path: Path, lengths: np.ndarray, d: int, pf: pq.ParquetFile | None = None) -> PackedWords:
    """The words column of ``path`` (``len * d`` floats per caption, ``len`` its token count)
    copied a row group at a time into the packed words' own tensor (zero row included)."""
    rows = torch.zeros((int(lengths.sum()) + 1, d))
    out, caption, pos = rows.numpy(), 0, 0
    for table in _row_groups(path, ["words"], pf)[1]:
        for chunk in table.column("words").chunks:
            t = chunk.type  # another kind of column (strings have offsets too) failed in flatten
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_floating(t.value_type):
                raise DataError(path, f'column "words" must hold lists of floats, got {t}')
            sizes = np.diff(chunk.offsets.to_numpy())
            want = lengths[caption : caption + len(chunk)] * d
            if len(want) < len(chunk):
                raise DataError(path, f'column "words" holds more captions than the {len(lengths)} of column "tokens"')
            bad = np.flatnonzero(sizes != want)
            if len(bad):
                i = caption + int(bad[0])
                raise DataError(
                    path,
                    f'column "words": caption row {i} holds {sizes[bad[0]]} floats, expected {want[bad[0]]} '
                    f"({lengths[i]} tokens x d = {d})",
                )
            values = chunk.flatten().to_numpy(zero_copy_only=False)  # flatten: this chunk's own words (a null: NaN)
            check_column_finite(path, "words", values)
            out[pos : pos + len(values) // d] = values.reshape(-1, d)
            caption, pos = caption + len(chunk), pos + len(values) // d
    if caption != len(lengths):
        raise DataError(path, f'column "words" has {caption} captions, expected {len(lengths)}')
    return PackedWords._wrap(rows, torch.from_numpy(lengths))
