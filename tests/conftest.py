"""Shared fixtures for the data-layer tests: tiny real precomp folders and bad variants of them.

``make_precomp`` writes ``{split}_ims.npy`` (``n_images x regions x feature_dim``, values that
identify image, region and feature) and ``{split}_caps.txt`` (real COCO lines of
``data/coco-captions/testall_caps.txt``). ``bad_precomp`` is parametrised over every malformed
input the precomp reader must refuse; ``test_precomp`` and ``test_ingest`` both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "coco-captions"
TESTALL_CAPS = DATA / "testall_caps.txt"
SCAN_VOCAB = DATA / "coco_precomp_vocab.json"


@lru_cache(maxsize=1)
def _testall_lines() -> tuple[str, ...]:
    return tuple(TESTALL_CAPS.read_text(encoding="utf-8").split("\n")[:-1])


@pytest.fixture(scope="session")
def scan_vocab_path() -> Path:
    """SCAN's COCO vocabulary JSON (11,352 words)."""
    return SCAN_VOCAB


@pytest.fixture(scope="session")
def testall_lines() -> tuple[str, ...]:
    """The 25,000 caption lines of COCO testall, in file order (line 1 is index 0)."""
    return _testall_lines()


def image_features(n_images: int, regions: int = 36, feature_dim: int = 8) -> np.ndarray:
    """float32 ``(n, R, D)``: value ``i + r / 100 + d / 10000``, so every cell is identifiable."""
    i = np.arange(n_images, dtype=np.float64)[:, None, None]
    r = np.arange(regions, dtype=np.float64)[None, :, None]
    d = np.arange(feature_dim, dtype=np.float64)[None, None, :]
    return (i + r / 100 + d / 10000).astype(np.float32)


def write_precomp(
    folder: Path,
    split: str = "test",
    n_images: int = 7,
    regions: int = 36,
    feature_dim: int = 8,
    rows_per_image: int = 1,
    first_line: int = 0,
    n_captions: int | None = None,
    dtype=np.float32,
) -> tuple[np.ndarray, list[str]]:
    """Write one precomp split into ``folder``; return ``(features per image, captions)``.

    ``rows_per_image=5`` stores each image's row 5 times (one row per caption, SCAN's im_div 5).
    ``n_captions`` defaults to 5 per image; the captions are testall lines from ``first_line``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    feats = image_features(n_images, regions, feature_dim)
    rows = np.repeat(feats, rows_per_image, axis=0) if rows_per_image > 1 else feats
    np.save(folder / f"{split}_ims.npy", rows.astype(dtype))
    n = 5 * n_images if n_captions is None else n_captions
    caps = list(_testall_lines()[first_line : first_line + n])
    (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    return feats, caps


def small_store(tmp_path: Path, splits: tuple[str, ...] = ("test",)) -> Path:
    """A store root ``tmp_path / "root"`` ingested from precomp folders written under
    ``tmp_path / "pre"``: one split of 7 images (36 x 8 features, 5 captions each) per name in
    ``splits``."""
    from heiindex.ingest import ingest

    for split in splits:
        write_precomp(tmp_path / "pre", split=split, n_images=7)
        ingest(tmp_path / "pre", split, tmp_path / "root", regions=36, feature_dim=8)
    return tmp_path / "root"


@pytest.fixture
def make_precomp(tmp_path):
    """Factory: ``make_precomp(name="precomp", **write_precomp kwargs) -> (folder, feats, caps)``."""

    def make(name: str = "precomp", **kwargs):
        folder = tmp_path / name
        feats, caps = write_precomp(folder, **kwargs)
        return folder, feats, caps

    return make


# -- malformed inputs -----------------------------------------------------------------------


@dataclass
class BadCase:
    """A precomp folder the reader must refuse with ``DataError``.

    ``named``: the path the error must carry (and print); ``detail``: a substring of its message.
    """

    name: str
    folder: Path
    split: str
    named: Path
    detail: str
    feature_dim: int = 8


def _ims(folder: Path, split: str = "test") -> Path:
    return folder / f"{split}_ims.npy"


def _caps(folder: Path, split: str = "test") -> Path:
    return folder / f"{split}_caps.txt"


def _missing_folder(folder: Path) -> BadCase:
    gone = folder.parent / "no-such-folder"
    return BadCase("missing_folder", gone, "test", gone, "precomp folder not found")


def _missing_ims(folder: Path) -> BadCase:
    _ims(folder).unlink()
    return BadCase("missing_ims", folder, "test", _ims(folder), "feature file not found")


def _missing_caps(folder: Path) -> BadCase:
    _caps(folder).unlink()
    return BadCase("missing_caps", folder, "test", _caps(folder), "caption file not found")


def _caps_not_multiple(folder: Path) -> BadCase:
    extra = _testall_lines()[35]
    with open(_caps(folder), "a", encoding="utf-8") as f:
        f.write(extra + "\n")
    return BadCase("caps_not_multiple", folder, "test", _caps(folder), "36 captions do not fit 7 feature rows")


def _caps_too_few(folder: Path) -> BadCase:
    lines = _caps(folder).read_text().split("\n")[:-1]
    _caps(folder).write_text("\n".join(lines[:34]) + "\n")
    return BadCase("caps_too_few", folder, "test", _caps(folder), "34 captions do not fit 7 feature rows")


def _lone_carriage_returns(folder: Path) -> BadCase:
    """Old Mac line ends: the file reads as one line, which said only '1 captions do not fit'."""
    _caps(folder).write_text("\r".join(_caps(folder).read_text().split("\n")[:-1]) + "\r")
    return BadCase(
        "lone_carriage_returns",
        folder,
        "test",
        _caps(folder),
        "1 caption does not fit 7 feature rows of test_ims.npy: expected 5 captions per image (35 lines), or one "
        "feature row per caption (7 lines, each image's row repeated 5 times: a multiple of 5 rows); its lines "
        "hold 34 lone carriage returns (\\r, old Mac line ends); for another number of captions per image, set "
        "`captions_per_image`",
    )


def _precomp_is_a_file(folder: Path) -> BadCase:
    file = folder / "test_caps.txt"
    return BadCase(
        "precomp_is_a_file", file, "test", file, "is a file, not a precomp folder (the folder holding test_ims.npy and"
    )


def _rank2(folder: Path) -> BadCase:
    np.save(_ims(folder), np.zeros((7, 36 * 8), np.float32))
    return BadCase(
        "rank2",
        folder,
        "test",
        _ims(folder),
        "must have rank 3 (images, regions, features), got shape (7, 288) (one vector per image: save it as shape "
        "(7, 1, 288) and ingest it with `regions` 1)",
    )


def _rank4(folder: Path) -> BadCase:
    np.save(_ims(folder), np.zeros((7, 36, 8, 1), np.float32))
    return BadCase("rank4", folder, "test", _ims(folder), "must have rank 3")


def _wrong_regions(folder: Path) -> BadCase:
    np.save(_ims(folder), np.zeros((7, 10, 8), np.float32))
    return BadCase("wrong_regions", folder, "test", _ims(folder), "expected 36 regions per image (axis 1), got 10")


def _wrong_feature_dim(folder: Path) -> BadCase:
    np.save(_ims(folder), np.zeros((7, 36, 6), np.float32))
    return BadCase("wrong_feature_dim", folder, "test", _ims(folder), "expected feature size 8 (axis 2), got 6")


def _nan(folder: Path) -> BadCase:
    a = np.load(_ims(folder))
    a[4, 17, 3] = np.nan
    np.save(_ims(folder), a)
    return BadCase("nan", folder, "test", _ims(folder), "image 4 (row 4) has NaN or Inf")


def _inf(folder: Path) -> BadCase:
    a = np.load(_ims(folder))
    a[6, 0, 0] = -np.inf
    np.save(_ims(folder), a)
    return BadCase("inf", folder, "test", _ims(folder), "image 6 (row 6) has NaN or Inf")


def _beyond_float32(folder: Path) -> BadCase:
    """A float64 file's value that float32 cannot hold: it became inf, with numpy's overflow
    warning printed, and was called NaN or Inf."""
    a = np.load(_ims(folder)).astype(np.float64)
    a[3, 5, 2] = 1e39
    np.save(_ims(folder), a)
    return BadCase("beyond_float32", folder, "test", _ims(folder), "image 3 (row 3) has values beyond float32's range")


def _empty_line(folder: Path) -> BadCase:
    lines = _caps(folder).read_text().split("\n")[:-1]
    lines[2] = "   "
    _caps(folder).write_text("\n".join(lines) + "\n")
    return BadCase("empty_line", folder, "test", _caps(folder), "line 3: empty caption")


def _bad_bytes(folder: Path) -> BadCase:
    raw = _caps(folder).read_bytes().split(b"\n")
    raw[11] = raw[11][:5] + b"\xff\xfe" + raw[11][5:]
    _caps(folder).write_bytes(b"\n".join(raw))
    return BadCase("bad_bytes", folder, "test", _caps(folder), "line 12: bytes are not valid UTF-8")


def _unknown_split(folder: Path) -> BadCase:
    return BadCase("unknown_split", folder, "val", folder, "unknown split 'val'")


def _truncated_npy(folder: Path) -> BadCase:
    raw = _ims(folder).read_bytes()
    _ims(folder).write_bytes(raw[:-100])
    return BadCase("truncated_npy", folder, "test", _ims(folder), "file is truncated")


def _trailing_bytes(folder: Path) -> BadCase:
    with _ims(folder).open("ab") as f:
        f.write(b"\0" * 64)
    return BadCase("trailing_bytes", folder, "test", _ims(folder), "64 bytes after the array the header describes")


def _truncated_header(folder: Path) -> BadCase:
    raw = _ims(folder).read_bytes()
    _ims(folder).write_bytes(raw[:20])
    return BadCase("truncated_header", folder, "test", _ims(folder), "not a .npy array file")


def _not_npy(folder: Path) -> BadCase:
    _ims(folder).write_bytes(b"this is a text file, not a numpy array\n" * 10)
    return BadCase("not_npy", folder, "test", _ims(folder), "not a .npy array file")


def _header_not_literal(folder: Path) -> BadCase:
    """numpy's parse error named ast's node objects ("<ast.Name object at 0x7f...>")."""
    raw = _ims(folder).read_bytes()
    _ims(folder).write_bytes(raw.replace(b"'descr': '<f4'", b"'descr': fooo "))
    return BadCase("header_not_literal", folder, "test", _ims(folder), "its header is not a dictionary of plain values")


def _int_dtype(folder: Path) -> BadCase:
    np.save(_ims(folder), np.zeros((7, 36, 8), np.int32))
    return BadCase("int_dtype", folder, "test", _ims(folder), "features must be float16/32/64")


BAD_CASES = {
    f.__name__.lstrip("_"): f
    for f in (
        _missing_folder,
        _missing_ims,
        _missing_caps,
        _caps_not_multiple,
        _caps_too_few,
        _lone_carriage_returns,
        _precomp_is_a_file,
        _rank2,
        _rank4,
        _wrong_regions,
        _wrong_feature_dim,
        _nan,
        _inf,
        _beyond_float32,
        _empty_line,
        _bad_bytes,
        _unknown_split,
        _truncated_npy,
        _trailing_bytes,
        _truncated_header,
        _not_npy,
        _header_not_literal,
        _int_dtype,
    )
}


@pytest.fixture(params=sorted(BAD_CASES))
def bad_precomp(request, make_precomp) -> BadCase:
    """A 7-image, 35-caption (feature size 8) precomp folder broken in one way (see BAD_CASES)."""
    folder, _, _ = make_precomp()
    case = BAD_CASES[request.param](folder)
    assert case.name == request.param
    return case


# -- the small trained pipeline shared by the model, training, hash, index, bench and CLI tests --


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread per test module: on a shared 2-core machine two threads were seen to
    turn seconds into minutes."""
    import pipeline_fixtures

    with pipeline_fixtures.one_torch_thread():
        yield


@pytest.fixture(scope="session")
def pipe(tmp_path_factory):
    """Stores, two trained matchers, a hash module and an index of a small learnable set."""
    import pipeline_fixtures

    return pipeline_fixtures.get_pipeline(tmp_path_factory)
