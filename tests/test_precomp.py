"""heiindex.precomp: reading SCAN precomp splits in bounded-memory blocks, refusing bad input."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from conftest import write_precomp  # tests/ is on sys.path

from heiindex.errors import DataError
from heiindex.precomp import SPLITS, PrecompSplit, read_captions
from heiindex.settings import SettingError


def _open(folder, split="test", feature_dim=8, regions=36):
    return PrecompSplit.open(folder, split, regions=regions, feature_dim=feature_dim)


def test_open_one_row_per_image(make_precomp, testall_lines):
    folder, _, caps = make_precomp(n_images=7)
    s = _open(folder)
    assert (s.split, s.n_rows, s.n_images, s.n_captions) == ("test", 7, 7, 35)
    assert (s.regions, s.feature_dim, s.dtype, s.rows_per_image, s.captions_per_image) == (36, 8, np.float32, 1, 5)
    assert s.images_path == folder / "test_ims.npy"
    assert s.captions_path == folder / "test_caps.txt"
    assert s.captions == tuple(testall_lines[:35])
    assert s.captions[0] == "A man with a red helmet on a small moped on a dirt road ."
    assert s.header_bytes == 128  # numpy's version 1.0 header is padded to 128 bytes here


def test_expected_shape_must_be_whole_numbers(make_precomp):
    folder, _, _ = make_precomp(n_images=2)
    with pytest.raises(ValueError, match="regions must be a whole number, at least 1, got '36'"):
        PrecompSplit.open(folder, "test", regions="36", feature_dim=8)  # read "expected 36 regions, got 36"
    with pytest.raises(ValueError, match="feature_dim must be a whole number, at least 1, got 0"):
        PrecompSplit.open(folder, "test", feature_dim=0)


def test_im_div_detected_when_each_image_is_repeated_per_caption(make_precomp):
    folder, feats, _ = make_precomp(n_images=7, rows_per_image=5)
    s = _open(folder)
    assert (s.n_rows, s.n_images, s.n_captions, s.rows_per_image) == (35, 7, 35, 5)
    blocks = list(s.iter_image_blocks(block_images=3))
    assert [start for start, _ in blocks] == [0, 3, 6]
    assert [b.shape for _, b in blocks] == [(3, 36, 8), (3, 36, 8), (1, 36, 8)]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), feats)
    assert blocks[2][1][0, 35, 7] == np.float32(6 + 0.35 + 0.0007)


def test_im_div_uses_first_row_of_each_group(tmp_path, testall_lines):
    """Image i is row 5 i; of its four repeats only the first region is read, to check them."""
    rows = np.zeros((10, 36, 4), np.float32)
    rows[0:5], rows[5:10] = 1.0, 2.0
    rows[1:5, 1:], rows[6:10, 1:] = -7.0, -9.0  # not compared: only region 0 of a repeat is
    np.save(tmp_path / "dev_ims.npy", rows)
    (tmp_path / "dev_caps.txt").write_text("\n".join(testall_lines[:10]) + "\n")
    s = PrecompSplit.open(tmp_path, "dev", feature_dim=4)
    assert (s.n_images, s.rows_per_image) == (2, 5)
    ((start, block),) = s.iter_image_blocks()
    assert start == 0
    assert block[:, 0, 0].tolist() == [1.0, 2.0] and block[:, 1, 0].tolist() == [1.0, 2.0]


def test_rows_that_are_not_repeated_are_not_read_as_one_per_caption(tmp_path, testall_lines):
    """10 rows and 10 captions fit the one-row-per-caption layout by count alone: 10 distinct
    images with a caption each were ingested as 2 images, their captions given to those two."""
    rows = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 36, 4), np.float32)
    rows[5:10] = 5.0  # the second image repeated; the first not
    np.save(tmp_path / "dev_ims.npy", rows)
    (tmp_path / "dev_caps.txt").write_text("\n".join(testall_lines[:10]) + "\n")
    s = PrecompSplit.open(tmp_path, "dev", feature_dim=4)
    with pytest.raises(DataError, match=r"dev_ims.npy: rows 0..4 differ, but with 10 rows and as many captions") as e:
        list(s.iter_image_blocks())
    # the fix for one caption per image is the setting, which the message names (it told only of 50 lines)
    assert "for one image per row with one caption each set `captions_per_image` 1" in e.value.problem
    assert e.value.settings == ("captions_per_image",)
    s = PrecompSplit.open(tmp_path, "dev", feature_dim=4, captions_per_image=1)
    assert (s.n_images, s.rows_per_image) == (10, 1)


def test_five_rows_five_captions_is_one_image_repeated(tmp_path, testall_lines):
    np.save(tmp_path / "test_ims.npy", np.ones((5, 36, 2), np.float32))
    (tmp_path / "test_caps.txt").write_text("\n".join(testall_lines[:5]))  # no final newline
    s = PrecompSplit.open(tmp_path, "test", feature_dim=2)
    assert (s.n_images, s.n_captions, s.rows_per_image) == (1, 5, 5)


@pytest.mark.parametrize("block_images", [1, 2, 3, 7, 128])
def test_blocks_cover_all_images_in_order(make_precomp, block_images):
    folder, feats, _ = make_precomp(n_images=7)
    blocks = list(_open(folder).iter_image_blocks(block_images))
    starts = [s for s, _ in blocks]
    assert starts == list(range(0, 7, block_images))
    for start, block in blocks:
        assert block.dtype == np.float32
        assert block.shape == (min(block_images, 7 - start), 36, 8)
        np.testing.assert_array_equal(block, feats[start : start + len(block)])
    assert sum(len(b) for _, b in blocks) == 7


@pytest.mark.parametrize("rows_per_image", [1, 5])
def test_iteration_never_loads_the_whole_file(make_precomp, monkeypatch, rows_per_image):
    """No np.load; each memmap spans at most one block of rows; blocks are (block, R, D)."""
    folder, feats, _ = make_precomp(n_images=7, rows_per_image=rows_per_image)
    s = _open(folder)

    def no_load(*a, **k):
        raise AssertionError("np.load must not be used on the feature file")

    real_memmap = np.memmap
    mapped = []

    def spy_memmap(*args, **kwargs):
        mapped.append(kwargs["shape"])
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(np, "load", no_load)
    monkeypatch.setattr(np, "fromfile", no_load)
    monkeypatch.setattr(np, "memmap", spy_memmap)
    blocks = list(s.iter_image_blocks(block_images=2))
    assert [b.shape for _, b in blocks] == [(2, 36, 8)] * 3 + [(1, 36, 8)]
    if rows_per_image == 1:
        assert mapped == [(2, 36, 8)] * 3 + [(1, 36, 8)]
    else:  # image i is row 5i: a block of 2 images maps its 10 rows (reads 2 whole, and region 0 of each)
        assert mapped == [(10, 36, 8)] * 3 + [(5, 36, 8)]
    monkeypatch.undo()
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), feats)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_are_read_as_float32(make_precomp, dtype):
    folder, feats, _ = make_precomp(n_images=3, dtype=dtype)
    s = _open(folder)
    assert s.dtype == dtype
    ((_, block),) = s.iter_image_blocks()
    assert block.dtype == np.float32
    np.testing.assert_array_equal(block, feats.astype(dtype).astype(np.float32))


def test_any_shape_accepted_with_none(make_precomp):
    folder, feats, _ = make_precomp(n_images=2, regions=5, feature_dim=3)
    s = PrecompSplit.open(folder, "test", regions=None, feature_dim=None)
    assert (s.regions, s.feature_dim) == (5, 3)
    ((_, block),) = s.iter_image_blocks()
    np.testing.assert_array_equal(block, feats)


def test_captions_sha256_is_stable_and_content_based(make_precomp, tmp_path):
    a, _, _ = make_precomp("a", n_images=2)
    b, _, _ = make_precomp("b", n_images=2)
    c, _, _ = make_precomp("c", n_images=2, first_line=10)
    assert _open(a).captions_sha256() == _open(b).captions_sha256()
    assert _open(a).captions_sha256() != _open(c).captions_sha256()


def test_read_captions_strips_and_accepts_crlf(tmp_path):
    p = tmp_path / "caps.txt"
    p.write_bytes(b"  A dog .  \r\nA cat .\r\n")
    assert read_captions(p) == ["A dog .", "A cat ."]


def test_read_captions_drops_a_byte_order_mark(tmp_path):
    """Editors on Windows save one; it stayed on the first caption, which tokenised to <unk>."""
    p = tmp_path / "caps.txt"
    p.write_bytes("A dog .\nA cat .\n".encode("utf-8-sig"))
    assert read_captions(p) == ["A dog .", "A cat ."]


def test_read_captions_refuses_an_empty_file(tmp_path):
    p = tmp_path / "caps.txt"
    for content in (b"", b"\n\n"):
        p.write_bytes(content)
        with pytest.raises(DataError, match="no captions") as info:
            read_captions(p)
        assert info.value.path == p


def test_read_captions_takes_blank_lines_at_the_end_only(tmp_path):
    """An editor's blank lines after the last caption were refused ("line 36: empty caption"),
    where query --file takes them; one between captions would move every caption after it."""
    p = tmp_path / "caps.txt"
    p.write_bytes(b"A dog .\nA cat .\n\n  \r\n")
    assert read_captions(p) == ["A dog .", "A cat ."]
    p.write_bytes(b"A dog .\n\nA cat .\n")
    with pytest.raises(DataError, match="line 2: empty caption"):
        read_captions(p)


def test_splits():
    assert SPLITS == ("train", "dev", "test", "testall")


def test_bad_input_raises_data_error_naming_the_file(bad_precomp):
    """Open and iterate: every malformed input of conftest.BAD_CASES is refused (with no warning
    printed beside the message)."""
    with pytest.raises(DataError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")
        s = PrecompSplit.open(bad_precomp.folder, bad_precomp.split, feature_dim=bad_precomp.feature_dim)
        for _ in s.iter_image_blocks(block_images=2):
            pass
    assert info.value.path == bad_precomp.named
    assert str(bad_precomp.named) in str(info.value)
    assert bad_precomp.detail in str(info.value)


@pytest.mark.parametrize(
    "rows, region, row", [(slice(25, 30), 1, 25), (slice(25, 30), 0, 25), (slice(27, 28), 0, 27)]
)  # region 0: the one the repeats are compared on (NaN != NaN); row 27: a repeat, not the row read
def test_non_finite_found_in_a_later_block_names_the_image(make_precomp, rows, region, row):
    folder, _, _ = make_precomp(n_images=7, rows_per_image=5)
    a = np.load(folder / "test_ims.npy")
    a[rows, region, 1] = np.nan  # image 5
    np.save(folder / "test_ims.npy", a)
    s = _open(folder)
    it = s.iter_image_blocks(block_images=2)
    assert next(it)[0] == 0
    assert next(it)[0] == 2
    with pytest.raises(DataError, match=rf"image 5 \(row {row}\) has NaN or Inf"):
        next(it)


def test_fortran_order_refused(make_precomp):
    folder, feats, _ = make_precomp(n_images=2)
    np.save(folder / "test_ims.npy", np.asfortranarray(feats))
    with pytest.raises(DataError, match="Fortran") as info:
        _open(folder)
    assert info.value.path == folder / "test_ims.npy"


def test_zero_rows_refused(tmp_path):
    np.save(tmp_path / "test_ims.npy", np.zeros((0, 36, 8), np.float32))
    (tmp_path / "test_caps.txt").write_text("a dog\n")
    with pytest.raises(DataError, match="no rows"):
        _open(tmp_path)


def test_distinct_rows_with_one_caption_each_are_refused_when_not_a_multiple_of_5(make_precomp):
    folder, _, _ = make_precomp(n_images=7, n_captions=7)
    with pytest.raises(DataError, match="7 captions do not fit 7 feature rows"):
        _open(folder)


def test_one_caption_per_image_is_read_where_captions_per_image_says_so(make_precomp):
    """Data with one caption an image could not be ingested: 7 images and 7 captions read as 5
    captions per image, refused ("7 captions do not fit 7 feature rows")."""
    folder, feats, caps = make_precomp(n_images=7, n_captions=7)
    split = PrecompSplit.open(folder, "test", regions=None, feature_dim=None, captions_per_image=1)
    assert (split.n_images, split.n_captions, split.rows_per_image, split.captions_per_image) == (7, 7, 1, 1)
    ((_, block),) = split.iter_image_blocks()
    np.testing.assert_array_equal(block, feats)
    with pytest.raises(SettingError, match="captions_per_image must be"):
        PrecompSplit.open(folder, "test", regions=None, feature_dim=None, captions_per_image=0)
    with pytest.raises(DataError, match=r"7 captions do not fit 7 feature rows .* expected 2 captions per image"):
        PrecompSplit.open(folder, "test", regions=None, feature_dim=None, captions_per_image=2)


def test_rows_that_differ_in_a_later_block_are_named_by_their_file_rows(tmp_path):
    write_precomp(tmp_path, n_images=3, rows_per_image=5)
    rows = np.load(tmp_path / "test_ims.npy")
    rows[12, 0, 0] += 1.0  # image 2, its third repeat
    np.save(tmp_path / "test_ims.npy", rows)
    split = _open(tmp_path)
    with pytest.raises(DataError, match=r"rows 10\.\.14 differ"):
        list(split.iter_image_blocks(block_images=1))


def test_source_captions_sha256_is_of_the_lines_joined_by_newlines(make_precomp):
    folder, _, caps = make_precomp(n_images=2)
    split = _open(folder)
    assert split.captions_sha256() == hashlib.sha256("\n".join(caps).encode()).hexdigest()
