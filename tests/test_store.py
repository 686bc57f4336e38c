"""heiindex.store: Parquet writers, SplitStore reading, content checksums, atomic folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_store  # tests/ is on sys.path

from heiindex.errors import DataError, one_line
from heiindex.manifests import MANIFEST_FILE, file_sha256, write_json
from heiindex.outputs import atomic_dir, check_output, check_replaceable, check_writable
from heiindex.settings import SettingError
from heiindex.store import (
    CAPTIONS_FILE,
    FORMAT_VERSION,
    IMAGES_FILE,
    ImageWriter,
    SplitStore,
    write_captions,
)

R, D = 4, 3
TOKENS = [[1, 4, 5, 2], [1, 6, 2], [1, 4, 7, 8, 9, 2], [1, 2], [1, 10, 11, 2]]
TEXTS = ["a dog", "cat", "a b c d", "", "e f"]


def _feats(n: int, offset: int = 0) -> np.ndarray:
    return np.arange(n * R * D, dtype=np.float32).reshape(n, R, D) + 1000 * offset


def _five_captions():
    return np.arange(5), np.arange(5), TEXTS, TOKENS


def _manifest(n, regions, dim, images_sha, captions_sha, version=FORMAT_VERSION) -> dict:
    """A split manifest for n images and the five captions (token ids below 12)."""
    return {
        "format_version": version,
        "split": "test",
        "images": {"count": n, "regions": regions, "feature_dim": dim, "sha256": images_sha},
        "captions": {"count": 5, "sha256": captions_sha},
        "vocab": {"sha256": "0" * 64, "size": 12},
    }


def _write_split(folder, blocks=((0, 3), (3, 5)), version=FORMAT_VERSION):
    """images 0..n-1 in the given blocks (row groups), 5 captions (one per image of 0..4);
    returns (images_sha, captions_sha)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = ImageWriter(folder / IMAGES_FILE, R, D)
    n = blocks[-1][1]
    feats = _feats(n)
    for a, b in blocks:
        w.write(np.arange(a, b), feats[a:b])
    images_sha = w.close()
    captions_sha = write_captions(folder / CAPTIONS_FILE, *_five_captions())
    write_json(folder / MANIFEST_FILE, _manifest(n, R, D, images_sha, captions_sha, version))
    return images_sha, captions_sha


def test_image_writer_round_trip_through_split_store(tmp_path):
    images_sha, captions_sha = _write_split(tmp_path / "test")
    store = SplitStore.open(tmp_path, "test")
    assert (store.split, store.n_images, store.n_captions, store.regions, store.feature_dim) == ("test", 5, 5, R, D)
    assert store.n_row_groups == 2
    assert store.vocab_path() == tmp_path / "vocab.json"

    blocks = list(store.iter_image_blocks(block_images=2))
    assert [ids.tolist() for ids, _ in blocks] == [[0, 1], [2, 3], [4]]
    assert [f.shape for _, f in blocks] == [(2, R, D), (2, R, D), (1, R, D)]
    assert all(f.dtype == np.float32 for _, f in blocks)
    np.testing.assert_array_equal(np.concatenate([f for _, f in blocks]), _feats(5))

    ids, f = store.read_row_group(1)
    assert ids.tolist() == [3, 4]
    np.testing.assert_array_equal(f, _feats(5)[3:5])
    assert f[1, 3, 2] == 4 * R * D + 3 * D + 2  # image 4, region 3, feature 2
    for bad in (2, -1):
        with pytest.raises(ValueError, match=f"row group {bad} outside the 2 of .*images.parquet"):
            store.read_row_group(bad)

    assert store.checksum == hashlib.sha256((images_sha + captions_sha).encode()).hexdigest()


def _blocks_from(store, block, start, stop=None, monkeypatch=None):
    """(ids per block, features stacked, the row groups the reader was asked for, the rows of
    the batches it decoded)."""
    pf = store._images_file()
    asked, decoded = [], [0]
    read = pf.iter_batches

    def spy(*args, row_groups=None, **kw):
        asked.append(list(row_groups))
        for batch in read(*args, row_groups=row_groups, **kw):
            decoded[0] += batch.num_rows
            yield batch

    monkeypatch.setattr(pf, "iter_batches", spy)
    blocks = list(store.iter_image_blocks(block, start=start, stop=stop))
    feats = np.concatenate([f for _, f in blocks]) if blocks else np.zeros((0, R, D), np.float32)
    return [ids.tolist() for ids, _ in blocks], feats, asked, decoded[0]


def test_image_blocks_from_a_row_with_row_groups_smaller_than_a_block(tmp_path, monkeypatch):
    _write_split(tmp_path / "test", blocks=((0, 2), (2, 4), (4, 6), (6, 8), (8, 10)))
    store = SplitStore.open(tmp_path, "test")
    ids, feats, asked, rows = _blocks_from(store, 3, 5, monkeypatch=monkeypatch)
    assert ids == [[5, 6, 7], [8, 9]]
    assert (asked, rows) == ([[2, 3, 4]], 6)  # the two row groups before row 5 are not read
    np.testing.assert_array_equal(feats, _feats(10)[5:])
    ids, feats, asked, rows = _blocks_from(store, 3, 4, 9, monkeypatch=monkeypatch)
    assert ids == [[4, 5, 6], [7, 8]] and (asked, rows) == ([[2, 3, 4]], 6)
    np.testing.assert_array_equal(feats, _feats(10)[4:9])
    ids, feats, asked, rows = _blocks_from(store, 3, 0, 4, monkeypatch=monkeypatch)
    assert ids == [[0, 1, 2], [3]] and (asked, rows) == ([[0, 1]], 4)  # nothing after row 3 is read
    np.testing.assert_array_equal(feats, _feats(10)[:4])


def test_image_blocks_from_a_row_with_row_groups_larger_than_a_block(tmp_path, monkeypatch):
    _write_split(tmp_path / "test", blocks=((0, 6), (6, 10)))
    store = SplitStore.open(tmp_path, "test")
    ids, feats, asked, rows = _blocks_from(store, 2, 7, monkeypatch=monkeypatch)
    assert ids == [[7, 8], [9]] and (asked, rows) == ([[1]], 4)
    np.testing.assert_array_equal(feats, _feats(10)[7:])
    ids, feats, asked, rows = _blocks_from(store, 2, 3, 8, monkeypatch=monkeypatch)  # across the boundary
    assert ids == [[3, 4], [5, 6], [7]] and (asked, rows) == ([[0, 1]], 8)  # batches of 2 to row 7
    np.testing.assert_array_equal(feats, _feats(10)[3:8])
    assert f"{feats[4, 3, 2]:.0f}" == str(7 * R * D + 3 * D + 2)  # image 7, region 3, feature 2
    ids, feats, asked, rows = _blocks_from(store, 2, 1, 3, monkeypatch=monkeypatch)
    assert ids == [[1, 2]] and (asked, rows) == ([[0]], 4)  # no batch past the one holding row 2
    np.testing.assert_array_equal(feats, _feats(10)[1:3])
    assert _blocks_from(store, 4, 6, 6, monkeypatch=monkeypatch)[0] == []
    assert [i.tolist() for i, _ in store.iter_image_blocks(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for kwargs in ({"start": 4, "stop": 3}, {"stop": 11}, {"start": -1}):
        with pytest.raises(ValueError, match="0 <= start <= stop <= 10"):
            list(store.iter_image_blocks(**kwargs))
    for kwargs, name in (
        ({"block_images": 0}, "block_images"),
        ({"block_images": 2.0}, "block_images"),
        ({"start": 1.5}, "start"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a whole number"):
            list(store.iter_image_blocks(**kwargs))


def test_a_pass_over_the_images_holds_one_block_not_the_file(tmp_path):
    """Reading a split block by block keeps Arrow's live memory near one row group and one block:
    with pyarrow's pre_buffer on, every row group read stayed cached until the pass ended."""
    folder, regions, dim, n = tmp_path / "test", 36, 256, 256
    folder.mkdir()
    w = ImageWriter(folder / IMAGES_FILE, regions, dim)
    feats = np.random.default_rng(0).random((n, regions, dim), dtype=np.float32)  # incompressible
    for a in range(0, n, 4):  # 64 row groups of 147 KB: 9.4 MB
        w.write(np.arange(a, a + 4), feats[a : a + 4])
    captions_sha = write_captions(folder / CAPTIONS_FILE, *_five_captions())
    write_json(folder / MANIFEST_FILE, _manifest(n, regions, dim, w.close(), captions_sha))
    store, base, live = SplitStore.open(tmp_path, "test"), pa.total_allocated_bytes(), []
    for ids, block in store.iter_image_blocks(block_images=8):
        np.testing.assert_array_equal(block, feats[ids])
        live.append(pa.total_allocated_bytes() - base)
    assert len(live) == 32
    assert max(live) < feats.nbytes / 4, f"Arrow held {max(live)} bytes of a {feats.nbytes}-byte file"


def test_images_parquet_schema(tmp_path):
    _write_split(tmp_path / "test")
    pf = pq.ParquetFile(tmp_path / "test" / IMAGES_FILE)
    schema = pf.schema_arrow
    assert schema.field("image_id").type == pa.int64()
    assert schema.field("features").type == pa.list_(pa.float32(), R * D)
    assert schema.metadata[b"regions"] == b"4" and schema.metadata[b"feature_dim"] == b"3"
    assert pf.metadata.num_rows == 5
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [3, 2]


def test_captions_round_trip_padding_and_lengths(tmp_path):
    _write_split(tmp_path / "test")
    caps = SplitStore.open(tmp_path, "test").captions()
    assert len(caps) == 5
    assert caps.caption_ids.tolist() == [0, 1, 2, 3, 4]
    assert caps.image_ids.tolist() == [0, 1, 2, 3, 4]
    assert caps.texts == TEXTS
    assert caps.lengths.tolist() == [4, 3, 6, 2, 4]
    assert caps.tokens.dtype == np.int32  # as the store holds them: half the memory of int64
    assert caps.tokens.tolist() == [
        [1, 4, 5, 2, 0, 0],
        [1, 6, 2, 0, 0, 0],
        [1, 4, 7, 8, 9, 2],
        [1, 2, 0, 0, 0, 0],
        [1, 10, 11, 2, 0, 0],
    ]
    table = pq.read_table(tmp_path / "test" / CAPTIONS_FILE)
    assert table.schema.field("tokens").type == pa.list_(pa.int32())
    assert table.column("tokens").to_pylist() == TOKENS


def test_image_checksum_is_sha256_of_all_ids_and_all_features(tmp_path):
    images_sha, _ = _write_split(tmp_path / "test")
    ids = hashlib.sha256(np.arange(5, dtype=np.int64).tobytes()).hexdigest()
    feats = hashlib.sha256(_feats(5).tobytes()).hexdigest()
    assert images_sha == hashlib.sha256((ids + feats).encode()).hexdigest()


def test_checksums_stable_across_writes(tmp_path):
    a = _write_split(tmp_path / "a")
    b = _write_split(tmp_path / "b")
    assert a == b
    assert all(len(x) == 64 for x in a)
    for name in (IMAGES_FILE, CAPTIONS_FILE):
        assert file_sha256(tmp_path / "a" / name) == file_sha256(tmp_path / "b" / name)
    assert file_sha256(tmp_path / "a" / IMAGES_FILE, chunk=7) == file_sha256(tmp_path / "a" / IMAGES_FILE)


def test_checksums_change_with_content(tmp_path):
    base = write_captions(tmp_path / "c0.parquet", np.arange(5), np.arange(5), TEXTS, TOKENS)
    other_tokens = [t[:] for t in TOKENS]
    other_tokens[2][1] = 3
    assert write_captions(tmp_path / "c1.parquet", np.arange(5), np.arange(5), TEXTS, other_tokens) != base
    assert write_captions(tmp_path / "c2.parquet", np.arange(5), np.arange(5), [*TEXTS[:4], "e g"], TOKENS) != base
    assert write_captions(tmp_path / "c3.parquet", np.arange(5), np.arange(5) // 2, TEXTS, TOKENS) != base

    w0 = ImageWriter(tmp_path / "i0.parquet", R, D)
    w0.write(np.arange(2), _feats(2))
    w1 = ImageWriter(tmp_path / "i1.parquet", R, D)
    changed = _feats(2)
    changed[1, 2, 0] += 0.5
    w1.write(np.arange(2), changed)
    w2 = ImageWriter(tmp_path / "i2.parquet", R, D)  # the same images a block of one at a time
    w2.write(np.arange(1), _feats(2)[:1])
    w2.write(np.arange(1, 2), _feats(2)[1:])
    first = w0.close()
    assert first != w1.close()
    assert w2.close() == first  # the content checksum does not depend on the blocks


def test_image_writer_rejects_wrong_block_shape(tmp_path):
    w = ImageWriter(tmp_path / "i.parquet", R, D)
    for shape in ((2, R, D + 1), (2, D, R)):  # a transposed block has the right size, not the right shape
        with pytest.raises(ValueError, match=rf"block shape \({shape[1]}, {shape[2]}\) != \({R}, {D}\)"):
            w.write(np.arange(2), np.zeros(shape, np.float32))
    w.close()


def test_image_writer_extra_columns(tmp_path):
    w = ImageWriter(tmp_path / "i.parquet", R, D, extra={"codes": pa.list_(pa.uint8(), 2), "label": pa.int32()})
    w.write(np.arange(2), _feats(2), codes=np.array([[1, 2], [3, 4]], np.uint8), label=np.array([7, 8]))
    w.close()
    t = pq.read_table(tmp_path / "i.parquet")
    assert t.column("codes").to_pylist() == [[1, 2], [3, 4]]
    assert t.column("label").to_pylist() == [7, 8]


# -- SplitStore refusing bad stores -------------------------------------------------------


def test_split_store_without_manifest(tmp_path):
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="ingest") as info:
        SplitStore.open(tmp_path, "test")
    assert info.value.path == tmp_path / "test" / MANIFEST_FILE


def test_split_store_wrong_format_version(tmp_path):
    _write_split(tmp_path / "test", version=FORMAT_VERSION + 1)
    with pytest.raises(DataError, match="format_version") as info:
        SplitStore.open(tmp_path, "test")
    assert info.value.path == tmp_path / "test" / MANIFEST_FILE


def test_image_rows_missing_from_the_file_are_named(tmp_path):
    _write_split(tmp_path / "test")  # 5 rows
    manifest = json.loads((tmp_path / "test" / MANIFEST_FILE).read_text())
    manifest["images"]["count"] = 7
    write_json(tmp_path / "test" / MANIFEST_FILE, manifest)
    with pytest.raises(DataError, match=r"images.parquet: holds 5 image rows; the manifest's images.count says 7"):
        list(SplitStore.open(tmp_path, "test").iter_image_blocks(4))
    manifest["images"]["count"] = 4  # fewer: the fifth image was left out of every pass
    write_json(tmp_path / "test" / MANIFEST_FILE, manifest)
    with pytest.raises(DataError, match=r"images.parquet: holds 5 image rows; the manifest's images.count says 4"):
        list(SplitStore.open(tmp_path, "test").iter_image_blocks(4))


def test_split_store_manifest_not_json(tmp_path):
    _write_split(tmp_path / "test")
    (tmp_path / "test" / MANIFEST_FILE).write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        SplitStore.open(tmp_path, "test")
    (tmp_path / "test" / MANIFEST_FILE).write_text("[]")
    with pytest.raises(DataError, match="must hold a JSON object, got list"):
        SplitStore.open(tmp_path, "test")
    (tmp_path / "test" / MANIFEST_FILE).write_bytes(b'{"split": "\xff"}')  # not UTF-8
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        SplitStore.open(tmp_path, "test")
    (tmp_path / "test" / MANIFEST_FILE).unlink()
    (tmp_path / "test" / MANIFEST_FILE).mkdir()
    with pytest.raises(DataError, match="manifest.json: cannot be read"):
        SplitStore.open(tmp_path, "test")


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda m: m.pop("images"), r'field "images.count" is missing or not of type int \(got None\)'),
        (
            lambda m: m["captions"].update(count="5"),
            r"field \"captions.count\" is missing or not of type int \(got '5'\)",
        ),
        (lambda m: m.pop("vocab"), r'field "vocab.sha256" is missing'),
    ],
)
def test_split_store_manifest_fields_are_named(tmp_path, edit, detail):
    """These were KeyErrors, or "invalid literal for int()", wherever a field was first read."""
    _write_split(tmp_path / "test")
    manifest = json.loads((tmp_path / "test" / MANIFEST_FILE).read_text())
    edit(manifest)
    write_json(tmp_path / "test" / MANIFEST_FILE, manifest)
    with pytest.raises(DataError, match=r"test/manifest.json: " + detail):
        SplitStore.open(tmp_path, "test")


def test_split_store_captions_are_checked_against_the_manifest(tmp_path):
    folder = tmp_path / "test"
    _write_split(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["captions"]["count"] = 4  # fewer than the file's 5: the store read a subset without a word
    write_json(folder / MANIFEST_FILE, manifest)
    with pytest.raises(DataError, match=r"captions.parquet: holds 5 captions; the manifest's captions.count says 4"):
        SplitStore.open(tmp_path, "test").captions()
    manifest["captions"]["count"], manifest["vocab"]["size"] = 5, 11  # token id 11 is then outside it
    write_json(folder / MANIFEST_FILE, manifest)
    with pytest.raises(DataError, match=r'captions.parquet: column "tokens" holds id 11, outside the vocabulary of 11'):
        SplitStore.open(tmp_path, "test").captions()
    pq.write_table(pq.read_table(folder / CAPTIONS_FILE).drop_columns(["tokens"]), folder / CAPTIONS_FILE)
    with pytest.raises(DataError, match=r'captions.parquet: no column "tokens" \(columns: caption_id, image_id, text'):
        SplitStore.open(tmp_path, "test").captions()


def test_split_store_images_file_without_features_is_named(tmp_path):
    folder = tmp_path / "test"
    _write_split(folder)
    pq.write_table(pq.read_table(folder / IMAGES_FILE).drop_columns(["features"]), folder / IMAGES_FILE)
    with pytest.raises(DataError, match=r'images.parquet: no column "features" \(columns: image_id\)'):
        list(SplitStore.open(tmp_path, "test").iter_image_blocks(2))


def test_split_store_files_that_are_not_parquet_are_named(tmp_path):
    folder = tmp_path / "test"
    _write_split(folder)
    (folder / CAPTIONS_FILE).write_bytes(b"PAR1 cut short")
    with pytest.raises(DataError, match=r"test/captions.parquet: not a readable Parquet file \("):
        SplitStore.open(tmp_path, "test").captions()
    (folder / IMAGES_FILE).write_bytes(b"")
    with pytest.raises(DataError, match=r"test/images.parquet: not a readable Parquet file \("):
        list(SplitStore.open(tmp_path, "test").iter_image_blocks(2))


def test_a_parquet_file_with_a_damaged_footer_is_named(tmp_path):
    """pyarrow raises a plain OSError for a footer it cannot decode, with raw bytes in its
    message: it named no file and printed a control byte."""
    folder = tmp_path / "test"
    _write_split(folder)
    data = bytearray((folder / CAPTIONS_FILE).read_bytes())
    data[-40:-8] = bytes([0x0F] * 32)  # the end of the footer's metadata; the length and PAR1 stay
    (folder / CAPTIONS_FILE).write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"test/captions.parquet: not a readable Parquet file \(") as info:
        SplitStore.open(tmp_path, "test").captions()
    assert str(info.value).isprintable()


def test_split_store_missing_file(tmp_path):
    _write_split(tmp_path / "test")
    (tmp_path / "test" / CAPTIONS_FILE).unlink()
    with pytest.raises(DataError, match="store file missing") as info:
        SplitStore.open(tmp_path, "test")
    assert info.value.path == tmp_path / "test" / CAPTIONS_FILE


# -- atomic_dir ---------------------------------------------------------------------------


def test_atomic_dir_success_creates_target(tmp_path):
    target = tmp_path / "root" / "test"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()
        (tmp / "x.txt").write_text("new")
    assert (target / "x.txt").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["test"]


def test_atomic_dir_replaces_older_target_on_success(tmp_path):
    target = tmp_path / "test"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target, "a test output", ("*.txt",)) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),  # pyarrow's
    ],
)
def test_a_full_disk_names_the_output_and_keeps_the_old_one(tmp_path, error):
    """A full disk while writing said "Error writing bytes to file" with no file named."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(
        DataError, match=r"out: could not be written: no space left on its disk \(.*\); nothing was replaced"
    ):
        with atomic_dir(target, "a test output", ("*.txt",)) as tmp:
            (tmp / "a.txt").write_text("new")
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "old"
    with pytest.raises(PermissionError) as info:  # other errors pass as they are
        with atomic_dir(target, "a test output", ("*.txt",)):
            raise PermissionError(13, "Permission denied")
    assert type(info.value) is PermissionError and info.value.errno == 13
    # a full disk elsewhere (train-hash's TMPDIR, while it trains inside atomic_dir) is not blamed
    # on the output's disk: the error names its own file
    elsewhere = tmp_path / "tmpdir" / "scratch.bin"
    with pytest.raises(OSError) as info:
        with atomic_dir(target, "a test output", ("*.txt",)):
            raise OSError(28, "No space left on device", str(elsewhere))
    assert type(info.value) is OSError and info.value.filename == str(elsewhere)
    with pytest.raises(DataError, match="out: could not be written: no space left on its disk"):
        with atomic_dir(target, "a test output", ("*.txt",)) as tmp:  # a file of the output's: blamed on it
            raise OSError(28, "No space left on device", str(tmp / "a.txt"))
    assert (target / "a.txt").read_text() == "old"


def test_a_nested_write_failing_is_named_where_it_would_have_been(tmp_path):
    """A sharded build writes each shard with its own atomic_dir inside the build's scratch
    folder: a full disk there named the scratch path (``.out.partial-.../shard-001``)."""
    target = tmp_path / "out"
    with pytest.raises(DataError) as info:
        with atomic_dir(target, "a test output", ("*",)) as tmp:
            with atomic_dir(tmp / "shard-001", "a test output", ("*.txt",)) as inner:
                raise DataError(inner / "a.txt", "some problem", ("out",))
    assert info.value.path == target / "shard-001" / "a.txt"
    assert str(info.value) == f"{target / 'shard-001' / 'a.txt'}: some problem" and info.value.settings == ("out",)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError) as info:
        with atomic_dir(target, "a test output", ("*",)) as tmp:
            with atomic_dir(tmp / "shard-001", "a test output", ("*.txt",)):
                raise OSError(28, "No space left on device")
    assert str(info.value).startswith(f"{target / 'shard-001'}: could not be written: no space left on its disk")
    elsewhere = tmp_path / "input.txt"
    with pytest.raises(DataError) as info:  # a file outside the output stays named as it is
        with atomic_dir(target, "a test output", ("*",)):
            raise DataError(elsewhere, "bad")
    assert info.value.path == elsewhere


def test_atomic_dir_refuses_what_it_would_not_write(tmp_path):
    """An --out naming a file, an input or someone's folder was replaced (and deleted) without a
    word; now it is refused before the work starts, and left as it was."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    (folder / "model.safetensors").write_text("ours")
    ran = []
    with pytest.raises(DataError, match=r"mine: exists and holds what a model does not write \(notes.txt\)"):
        with atomic_dir(folder, "a model", ("model.safetensors", "config.json")):
            ran.append(True)
    a_file = tmp_path / "vocab.json"
    a_file.write_text("{}")
    with pytest.raises(DataError, match=r"vocab.json: exists and is not a folder; a model is written as a folder"):
        with atomic_dir(a_file, "a model", ("*",)):
            ran.append(True)
    assert not ran
    assert (folder / "notes.txt").read_text() == "keep" and a_file.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "vocab.json"]
    many = tmp_path / "many"
    many.mkdir()
    for i in range(7):
        (many / f"f{i}").write_text("")
    with pytest.raises(DataError, match=r"\(f0, f1, f2, f3, f4 and 2 more\)"):
        check_replaceable(many, "an index", ())
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty, "an index", ())  # an empty folder is fine


def test_an_output_that_cannot_be_written_is_named_before_the_work(tmp_path):
    """An --out under a file, or where the system refuses a folder, failed only when the output
    was written (for train-hash: after all the training)."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(DataError, match=rf"file/index/x: cannot be written: {a_file} is not a folder"):
        check_output(a_file / "index" / "x", "an index", ())
    with pytest.raises(DataError, match=r"/proc/heiindex-x: cannot be written in /proc"):
        with atomic_dir(Path("/proc/heiindex-x"), "an index", ()):
            pytest.fail("the work ran")
    check_writable(tmp_path / "new" / "deeper")  # absent folders are made when written: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


def test_atomic_dir_writes_where_a_symlink_points(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "manifest.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_dir(link, "an index", ("manifest.json",)) as tmp:
        (tmp / "manifest.json").write_text("new")
    assert link.is_symlink() and (link / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_atomic_dir_checks_again_before_the_swap(tmp_path):
    """Something that appears in the target while the work runs stops the swap; the new output
    is discarded and the target keeps what it holds."""
    target = tmp_path / "index"
    with pytest.raises(DataError, match="late.txt"):
        with atomic_dir(target, "an index", ("manifest.json",)) as tmp:
            (tmp / "manifest.json").write_text("{}")
            target.mkdir()
            (target / "late.txt").write_text("arrived meanwhile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    assert sorted(p.name for p in target.iterdir()) == ["late.txt"]


def test_atomic_dir_failure_leaves_no_partial_folder(tmp_path):
    target = tmp_path / "test"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "half.parquet").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    deep = tmp_path / "root" / "deeper" / "test"  # the folders made for it go too (an empty root was left)
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(deep):
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_atomic_dir_failure_keeps_older_target_intact(tmp_path):
    target = tmp_path / "test"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, "a test output", ("old.txt",)) as tmp:
            (tmp / "old.txt").write_text("half-written")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test"]


def test_a_bool_count_in_a_store_manifest_is_refused(tmp_path):
    root = small_store(tmp_path)
    with pf.edited_json(root / "test" / "manifest.json") as m:
        m["images"]["count"] = True
    with pytest.raises(DataError, match=r'field "images.count" is missing or not of type int \(got True\)'):
        SplitStore.open(root, "test")


def test_a_manifest_shape_the_features_were_not_written_in_is_refused(tmp_path):
    """regions 36 x feature_dim 8 edited to 72 x 4 (the same size): the features were read
    reshaped, and a model trained on them without a word (a review's find)."""
    root = small_store(tmp_path)
    with pf.edited_json(root / "test" / "manifest.json") as m:
        m["images"]["regions"], m["images"]["feature_dim"] = 72, 4
    store = SplitStore.open(root, "test")
    with pytest.raises(
        DataError, match=r"images.parquet: was written with regions 36; the manifest's images.regions says 72"
    ):
        next(store.iter_image_blocks())
    with pytest.raises(DataError, match="was written with regions 36"):
        store.read_row_group(0)


def test_a_backslash_name_is_not_an_entry_name():
    from heiindex.manifests import entry_name

    assert entry_name("shard-0") is True
    assert entry_name("..\\outside") is False
    assert entry_name("a\\b") is False


def test_shard_counts_must_not_be_bools(tmp_path):
    from heiindex.index_manifest import check_shard_entries

    with pytest.raises(DataError, match=r'field "shards\[0\].n_images" is missing or not of type int \(got True\)'):
        check_shard_entries(tmp_path / "manifest.json", [{"path": "s0", "n_images": True, "n_captions": 5}], True)


def test_the_current_folder_and_a_mount_point_are_not_replaceable(tmp_path, monkeypatch):
    """--out . used to run the whole job, then refuse its own scratch folder, made inside the
    target; a mount point failed at the rename, after the work. Both are refused before it."""
    inner = tmp_path / "out" / "inner"
    inner.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "out")
    for given in (Path("."), Path(""), tmp_path / "out"):
        with pytest.raises(DataError, match=r"is the current folder; an index replaces its folder whole"):
            check_output(given, "an index", ("*.faiss",))
    monkeypatch.chdir(inner)
    with pytest.raises(DataError, match=r"is a folder holding the current folder \(.*inner\)"):
        check_output(Path(".."), "an index", ("*.faiss",))
    check_output(Path("new"), "an index", ("*.faiss",))  # a new folder inside it is fine
    (tmp_path / "link").symlink_to(inner)  # the current folder by another name
    with pytest.raises(DataError, match=r"link: is the current folder"):
        check_output(tmp_path / "link", "an index", ("*.faiss",))
    check_output(Path("."), "a training run", ("best", "last"), whole=False)  # written inside, never swapped
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    with pytest.raises(DataError, match=r"loop: cannot be resolved .*a symlink loop\?"):  # not a RuntimeError
        check_output(tmp_path / "loop", "an index", ("*.faiss",))
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == tmp_path / "mnt")
    with pytest.raises(DataError, match=r"mnt: is a mount point"):
        check_output(tmp_path / "mnt", "an index", ("*.faiss",))
    check_output(tmp_path / "mnt", "a training run", ("best", "last"), whole=False)


def test_a_dangling_symlink_is_not_replaceable(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match="exists and is not a folder"):
        check_replaceable(link, "coco-sim", ("*.npy",))


def test_captions_checksum_tells_where_texts_and_token_lists_split(tmp_path):
    ids, img = [0, 1], [0, 0]
    base = write_captions(tmp_path / "a.parquet", ids, img, ["ab", "c"], [[1, 2], [3]])
    texts = write_captions(tmp_path / "b.parquet", ids, img, ["a", "bc"], [[1, 2], [3]])
    tokens = write_captions(tmp_path / "c.parquet", ids, img, ["ab", "c"], [[1], [2, 3]])
    assert base != texts
    assert base != tokens


def test_the_last_evaluated_image_without_a_caption_is_refused(tmp_path):
    store = SplitStore.open(small_store(tmp_path), "test")
    caps = store.captions()
    bare_last = caps.subset(caps.image_ids != 6)
    with pytest.raises(DataError, match=r"1 of the 7 images evaluated have no caption \(image_id 6\)"):
        store.check_ids(bare_last, captioned=7)


def _rewrite_tokens(root: Path, edit) -> None:
    path = root / "test" / "captions.parquet"
    t = pq.read_table(path)
    tokens = edit(t.column("tokens").to_pylist())
    write_captions(
        path, t.column("caption_id").to_numpy(), t.column("image_id").to_numpy(), t.column("text").to_pylist(), tokens
    )
    pf.record_again(path)


def test_a_negative_token_id_is_refused(tmp_path):
    root = small_store(tmp_path)

    def negative(tokens):
        tokens[0][1] = -1
        return tokens

    _rewrite_tokens(root, negative)
    with pytest.raises(DataError, match=r'column "tokens" holds id -1, outside the vocabulary'):
        SplitStore.open(root, "test").captions()


def test_captions_without_tokens_are_refused_by_row(tmp_path):
    """The encoder's GRU refused an empty caption with a traceback ("Length of all samples has to
    be greater than 0"); ingest always writes <start> and <end>."""
    root = small_store(tmp_path)
    _rewrite_tokens(root, lambda tokens: [[] if i in (3, 7) else t for i, t in enumerate(tokens)])
    with pytest.raises(DataError, match=r'captions.parquet: column "tokens": caption row 3, 7 holds no token'):
        SplitStore.open(root, "test").captions()


def test_caption_columns_of_other_types_or_with_null_ids_are_named(tmp_path):
    """A null image_id read as "cannot convert float NaN to integer", an int text column as
    pyarrow's "Expected bytes, got a 'int' object": neither named the file or the column."""
    root = small_store(tmp_path)
    path = root / "test" / CAPTIONS_FILE
    saved = path.read_bytes()
    table = pq.read_table(path)
    ids = table.column("image_id").to_pylist()
    for column, values, said in (
        ("image_id", pa.array([None, *ids[1:]], type=pa.int64()), 'column "image_id" has empty \\(null\\) ids'),
        ("text", pa.array(range(len(table)), type=pa.int64()), 'column "text" must hold strings, got int64'),
        ("caption_id", pa.array([str(i) for i in ids]), 'column "caption_id" must hold integer ids, got string'),
        # the next three were pyarrow's or Python's words alone, naming neither file nor column
        (
            "caption_id",
            pa.array([2**63 + i for i in range(len(table))], type=pa.uint64()),
            r'column "caption_id" holds id 9223372036854775\d+, above the largest id heiindex keeps',
        ),
        (
            "text",
            pa.array([b"\xff"] * len(table)).cast(pa.string(), safe=False),
            'column "text" holds a caption that is not valid UTF-8',
        ),
        (
            "tokens",
            pa.array([[1, None, 2]] * len(table), type=pa.list_(pa.int32())),
            'column "tokens" has empty \\(null\\) captions or token ids',
        ),
    ):
        path.write_bytes(saved)
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, values), path)
        pf.record_again(path)
        with pytest.raises(DataError, match=rf"captions.parquet: {said}"):
            SplitStore.open(root, "test").captions()


def test_image_columns_of_other_types_are_named(tmp_path):
    """features saved as bytes (as other tools save arrays) raised AttributeError ('BinaryArray'
    object has no attribute 'flatten'); a null or float image_id was blamed on captions.parquet,
    or taken."""
    root = small_store(tmp_path)
    path = root / "test" / IMAGES_FILE
    saved = path.read_bytes()
    table = pq.read_table(path)
    n = len(table)
    for column, values, said in (
        (
            "features",
            pa.array([b"x"] * n),
            r'column "features" does not hold \d+ floats for each of its rows \(binary\)',
        ),
        ("image_id", pa.array([None, *range(1, n)], type=pa.int64()), 'column "image_id" has empty \\(null\\) ids'),
        ("image_id", pa.array([float(i) for i in range(n)]), 'column "image_id" must hold integer ids, got double'),
    ):
        path.write_bytes(saved)
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, values), path)
        pf.record_again(path)
        store = SplitStore.open(root, "test")
        if column == "image_id":  # what a build checks first (SplitStore.check_ids)
            with pytest.raises(DataError, match=rf"images.parquet: {said}"):
                store.image_id_column()
        with pytest.raises(DataError, match=rf"images.parquet: {said}"):
            list(store.iter_image_blocks())


def test_a_store_manifest_count_below_one_is_named(tmp_path):
    """images.count -5 reached torch ("Trying to create tensor with negative dimension -5")."""
    root = small_store(tmp_path)
    for field in ("images.count", "images.regions", "captions.count", "vocab.size"):
        part, key = field.split(".")
        saved = (root / "test" / MANIFEST_FILE).read_bytes()
        with pf.edited_json(root / "test" / MANIFEST_FILE) as m:
            m[part][key] = -5
        with pytest.raises(DataError, match=rf'manifest.json: field "{field}" must be at least 1, got -5'):
            SplitStore.open(root, "test")
        (root / "test" / MANIFEST_FILE).write_bytes(saved)


def test_features_of_another_float_width_are_read_as_float32(tmp_path):
    """float16 features (another tool's) met the float32 model: "mat1 and mat2 must have the same
    dtype"."""
    import pyarrow.compute as pc

    root = small_store(tmp_path)
    path = root / "test" / IMAGES_FILE
    want = np.concatenate([f for _, f in SplitStore.open(root, "test").iter_image_blocks()])
    table = pq.read_table(path)
    f = table.column("features").combine_chunks()
    half = pa.FixedSizeListArray.from_arrays(pc.cast(f.flatten(), pa.float16()), f.type.list_size)
    pq.write_table(table.set_column(table.schema.get_field_index("features"), "features", half), path)
    pf.record_again(path)
    got = np.concatenate([f for _, f in SplitStore.open(root, "test").iter_image_blocks()])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))


def test_hidden_folders_are_not_manifest_folders(tmp_path):
    from heiindex.manifests import manifest_folders

    for name in ("test", ".test.partial-otherhost-1-x1y2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    assert [p.name for p in manifest_folders(tmp_path)] == ["test"]


def test_pyarrow_messages_are_quoted_on_one_line_with_raw_characters_escaped():
    """A damaged file's bytes reach pyarrow's message; the error quotes it the way it quotes user
    input (a character above U+00FF used to read as '\\x200b', which is not its code)."""
    exc = OSError("bad\x0fbyte\n  and\u200bspace")
    assert one_line(exc) == "bad\\x0fbyte and\\u200bspace"
    assert one_line(OSError("x" * 1000)).endswith("... (1,000 characters)")


def test_a_missing_or_file_store_root_is_named_as_train_names_it(tmp_path):
    """build, evaluate and train-hash said "ROOT/test/manifest.json: no store manifest here" for a
    root that does not exist or is a file, where train named the root; an empty split opened the
    root as a split."""
    expected = "a store root (the output folder of heiindex ingest) was expected"
    with pytest.raises(DataError, match=f"nothing: no such folder; {re.escape(expected)}$") as e:
        SplitStore.open(tmp_path / "nothing", "test")
    assert e.value.path == tmp_path / "nothing"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=f"file: is not a folder; {re.escape(expected)}$"):
        SplitStore.open(tmp_path / "file", "test")
    with pytest.raises(SettingError, match="split must be a non-empty string, got ''"):
        SplitStore.open(tmp_path, "")


def test_a_split_the_store_lacks_is_named_with_the_splits_it_holds(tmp_path):
    """`evaluate --split testall` on coco-sim said "no store manifest here; run `heiindex ingest`
    for this split first", and `--split foo` the same, though ingest takes no split foo."""
    _write_split(tmp_path / "test")
    (tmp_path / "index-test").mkdir()  # an index kept beside the splits is no split
    (tmp_path / "index-test" / MANIFEST_FILE).write_text('{"matcher": {}}')
    shutil.copytree(tmp_path / "test", tmp_path / ".test.old-host-1-2-abc")  # an interrupted swap's leftover
    with pytest.raises(
        DataError,
        match=r"no such split in this store \(it holds: test\); from a SCAN precomp folder that has it, "
        rf"`heiindex ingest --precomp DIR --split testall --out {tmp_path}` writes it$",
    ) as e:
        SplitStore.open(tmp_path, "testall")
    assert e.value.path == tmp_path / "testall"
    with pytest.raises(DataError, match=r"foo: no such split in this store \(it holds: test\)$"):
        SplitStore.open(tmp_path, "foo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"foo: no such split in this store \(it holds: none\)$"):
        SplitStore.open(tmp_path / "empty", "foo")
    # a precomp folder or an index given as the store: the hint to ingest into it, which ingest
    # refuses, or "no store manifest here" in a split folder the index never had
    (tmp_path / "precomp").mkdir()
    (tmp_path / "precomp" / "test_caps.txt").write_text("a dog\n")
    with pytest.raises(
        DataError,
        match=r"precomp: is not a store root \(no vocab\.json, no split\): give the store root that ingest wrote; a SCAN",
    ):
        SplitStore.open(tmp_path / "precomp", "train")
    with pytest.raises(
        DataError, match=r"index-test: holds a manifest\.json that is not a store split's \(an index\?\)"
    ):
        SplitStore.open(tmp_path / "index-test", "train")
    (tmp_path / "mount" / "lost+found").mkdir(parents=True)  # a new disk: ingest writes a store root here
    (tmp_path / "mount" / ".gitkeep").write_text("")
    with pytest.raises(DataError, match=r"no such split in this store \(it holds: none\); from a SCAN precomp"):
        SplitStore.open(tmp_path / "mount", "train")


@pytest.mark.parametrize("split", [None, "absent"])
def test_a_manifest_without_a_split_name_is_not_a_store_split(pipe, tmp_path, split):
    # A manifest that records a vocabulary but names no split (missing or null) makes its folder
    # neither a split to list nor a split given for the root.
    root = pf.copy_store(pipe, tmp_path)
    with pf.edited_json(root / "dev" / "manifest.json") as m:
        if split is None:
            m["split"] = None
        else:
            del m["split"]
    with pytest.raises(DataError, match=r"no such split in this store \(it holds: test, train\)"):
        SplitStore.open(root, "nope")
    # not "is store split": a manifest that names no split is not one, so its folder is no store root
    with pytest.raises(DataError, match=r"store/dev: holds a manifest\.json that is not a store split's"):
        SplitStore.open(root / "dev", "x")


def test_reading_stores_and_manifests_loads_no_tokenizer_torch_or_faiss():
    """``index_manifest`` reads an index's manifest without torch (the README says so), and
    ``verify`` checks files: neither needs the tokenizer, which brings nltk (0.2-0.3 s) since
    ``store_vocab`` came to ``store``; it imports the vocabulary where it is called."""
    import subprocess
    import sys

    code = (
        "import sys, heiindex.index_manifest, heiindex.store, heiindex.verify\n"
        "print(sorted(m for m in ('torch', 'faiss', 'nltk', 'heiindex.vocab') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr


def test_json_nested_too_deeply_or_holding_a_huge_integer_is_named(tmp_path):
    """Arrays nested 100,000 deep raised RecursionError (a traceback), and an integer of 5,000
    digits Python's bare "Exceeds the limit (4300 digits)", naming no file."""
    from heiindex.manifests import read_json_object
    from heiindex.vocab import Vocab

    for text, said in (
        ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(nested too deeply to read\)"),
        ('{"count": 1' + "0" * 5000 + "}", r"not valid JSON \(Exceeds the limit"),
    ):
        path = tmp_path / "manifest.json"
        path.write_text(text)
        with pytest.raises(DataError, match=rf"manifest.json: {said}"):
            read_json_object(path, "missing")
        with pytest.raises(DataError, match=rf"manifest.json: {said}"):
            Vocab.load(path)


def test_a_second_writer_of_one_output_is_refused_while_the_first_writes(tmp_path):
    """Two builds of one --out both said they wrote it, and the one to finish last won: each write
    now holds a lock file beside its target (removed when it ends, as the folders it made)."""
    from heiindex.atomic import lock_file

    target = tmp_path / "new" / "out"
    with atomic_dir(target, "an index", ("*",)) as tmp:
        (tmp / "a").write_text("first")
        assert lock_file(target).exists()
        with pytest.raises(
            DataError, match=r"new/out: another heiindex command is writing it now \(it holds \.out\.lock beside it\)"
        ):
            with atomic_dir(target, "an index", ("*",)) as second:
                (second / "a").write_text("second")
    assert (target / "a").read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "gone" / "out", "an index", ("*",)):
        raise RuntimeError  # a failed first write leaves neither its lock nor the folders it made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
