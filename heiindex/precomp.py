"""Reader for SCAN's "precomp" layout: ``{split}_ims.npy`` and ``{split}_caps.txt``.

``{split}_ims.npy`` is float ``(n_rows, R, D)`` region features; ``{split}_caps.txt`` has one
caption per line, ``captions_per_image`` (5) consecutive lines per image. Some releases store
one feature row per caption (each image repeated); then ``rows_per_image`` is 5 and image ``i``
is row ``5 i`` (SCAN calls this ``im_div``).

The feature file is never loaded whole: its header is parsed once and each block of images is
mapped, copied and unmapped, so resident memory stays at one block whatever the file size.
What this module must not do: write anything, or know about Parquet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, counted
from .manifests import data_folder_hint
from .settings import require
from .textlines import text_lines

__all__ = ["SPLITS", "PrecompSplit", "read_captions"]

SPLITS = ("train", "dev", "test", "testall")
_FLOAT_KINDS = ("float16", "float32", "float64")


def read_captions(path: Path) -> list[str]:
    """Caption lines of ``path``; undecodable bytes and empty lines raise ``DataError``, except
    blank lines at the end (an editor's, as ``query --file`` takes them: no caption moves)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "caption file not found" + data_folder_hint(path)) from None
    lines = text_lines(raw, path)
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(path, f"line {i}: empty caption (every line must hold one caption)")
        out.append(line.strip())
    if not out:
        raise DataError(path, "no captions")
    return out


@dataclass(frozen=True)
class PrecompSplit:
    """One split of a precomp folder, validated on open (header and captions only)."""

    split: str
    images_path: Path
    captions_path: Path
    captions: tuple[str, ...]
    n_rows: int
    regions: int
    feature_dim: int
    dtype: np.dtype
    header_bytes: int
    rows_per_image: int
    captions_per_image: int

    @property
    def n_images(self) -> int:
        return self.n_rows // self.rows_per_image

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @classmethod
    def open(
        cls,
        directory: str | Path,
        split: str,
        regions: int | None = 36,
        feature_dim: int | None = 2048,
        captions_per_image: int = 5,
    ) -> PrecompSplit:
        """Open ``directory/{split}_ims.npy`` and ``{split}_caps.txt``.

        ``regions``/``feature_dim``: the expected R and D (``None`` accepts any).
        ``captions_per_image``: 5 for COCO and Flickr30K; 1 for data with one caption an image.
        """
        directory = Path(directory)
        for name, value in (("regions", regions), ("feature_dim", feature_dim)):
            if value is not None:
                require(name, value, at_least=1, integer=True)
        captions_per_image = require("captions_per_image", captions_per_image, at_least=1, integer=True)
        if split not in SPLITS:
            raise DataError(directory, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if directory.exists() and not directory.is_dir():
            raise DataError(
                directory, f"is a file, not a precomp folder (the folder holding {split}_ims.npy and {split}_caps.txt)"
            )
        if not directory.is_dir():
            raise DataError(directory, "precomp folder not found")
        ims = directory / f"{split}_ims.npy"
        caps = directory / f"{split}_caps.txt"
        shape, dtype, header = _read_npy_header(ims)
        if len(shape) != 3:
            hint = (
                f" (one vector per image: save it as shape ({shape[0]}, 1, {shape[1]}) and ingest it with `regions` 1)"
                if len(shape) == 2
                else ""
            )
            raise DataError(
                ims,
                f"feature array must have rank 3 (images, regions, features), got shape {shape}{hint}",
                settings=("regions",) if hint else (),
            )
        n_rows, r, d = shape
        if regions is not None and r != regions:
            raise DataError(ims, f"expected {regions} regions per image (axis 1), got {r}")
        if feature_dim is not None and d != feature_dim:
            raise DataError(ims, f"expected feature size {feature_dim} (axis 2), got {d}")
        if n_rows == 0:
            raise DataError(ims, "feature array has no rows")
        captions = read_captions(caps)
        n_caps = len(captions)
        if n_caps == n_rows * captions_per_image:
            rows_per_image = 1
        elif n_caps == n_rows and n_rows % captions_per_image == 0:
            rows_per_image = captions_per_image
        else:
            # A lone carriage return (old Mac line ends) stays inside a line: the file reads as fewer lines.
            returns = sum(c.count("\r") for c in captions)
            hint = (
                f"; its lines hold {counted(returns, 'lone carriage return')} (\\r, old Mac line ends)"
                if returns
                else ""
            )
            raise DataError(
                caps,
                f"{counted(n_caps, 'caption')} {'does' if n_caps == 1 else 'do'} not fit {counted(n_rows, 'feature row')} of {ims.name}: expected "
                f"{counted(captions_per_image, 'caption')} per image ({n_rows * captions_per_image} lines)"
                + (
                    f", or one feature row per caption ({n_rows} lines, each image's row repeated "
                    f"{captions_per_image} times: a multiple of {captions_per_image} rows)"
                    if captions_per_image > 1
                    else ""
                )
                + f"{hint}; for another number of captions per image, set `captions_per_image`",
                settings=("captions_per_image",),
            )
        return cls(split, ims, caps, tuple(captions), n_rows, r, d, dtype, header, rows_per_image, captions_per_image)

    def iter_image_blocks(self, block_images: int = 128) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_image_index, float32 (b, R, D))`` blocks in order.

        Non-finite values raise ``DataError`` naming the image.
        """
        block_images = require("block_images", block_images, at_least=1, integer=True)
        row_bytes = self.regions * self.feature_dim * self.dtype.itemsize
        for start in range(0, self.n_images, block_images):
            stop = min(self.n_images, start + block_images)
            first_row = start * self.rows_per_image
            n_rows = (stop - start) * self.rows_per_image  # every row of these images (mapped, not read)
            mm = np.memmap(
                self.images_path,
                dtype=self.dtype,
                mode="r",
                offset=self.header_bytes + first_row * row_bytes,
                shape=(n_rows, self.regions, self.feature_dim),
            )
            with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: named below
                block = np.array(mm[:: self.rows_per_image], dtype=np.float32)
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                row = (start + bad) * self.rows_per_image
                what = (
                    "values beyond float32's range (about 3.4e38)"
                    if np.isfinite(mm[bad * self.rows_per_image]).all()
                    else "NaN or Inf features"
                )
                raise DataError(self.images_path, f"image {start + bad} (row {row}) has {what}")
            if self.rows_per_image > 1:
                self._check_repeated(mm, start)
            del mm  # unmap: the pages leave this process's resident set
            yield start, block

    def _check_repeated(self, mm: np.ndarray, start: int) -> None:
        """In the one-row-per-caption layout each image's row stands ``rows_per_image`` times in a
        row. That layout is told apart from five captions per row by counts alone, so a file of
        distinct rows with as many captions (one caption per image) was read as every fifth image.
        Compared here: each row's first region (a page or two of each row, not the whole file)."""
        k = self.rows_per_image
        groups = np.asarray(mm[:, 0, :]).reshape(-1, k, self.feature_dim)
        finite = np.isfinite(groups).all(axis=2)  # a NaN differs from itself: named as what it is
        if not finite.all():
            image, repeat = (int(x[0]) for x in np.nonzero(~finite))
            row = (start + image) * k + repeat
            raise DataError(self.images_path, f"image {start + image} (row {row}) has NaN or Inf features")
        differs = np.flatnonzero((groups != groups[:, :1]).any(axis=(1, 2)))
        if len(differs):
            image = start + int(differs[0])
            raise DataError(
                self.images_path,
                f"rows {image * k}..{image * k + k - 1} differ, but with {self.n_rows} rows and as many captions "
                f"each image's row should stand {k} times in a row (one row per caption); for one image per row "
                f"with one caption each set `captions_per_image` 1, or give {k} captions per image "
                f"({self.n_rows * k} lines)",
                settings=("captions_per_image",),
            )

    def captions_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.captions).encode()).hexdigest()


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except (ValueError, OSError) as exc:
                detail = str(exc)
                if "malformed node" in detail:  # ast's message, which names its node objects
                    detail = "its header is not a dictionary of plain values"
                raise DataError(path, f"not a .npy array file ({detail})") from None
            header = f.tell()
    except FileNotFoundError:
        raise DataError(path, "feature file not found") from None
    if fortran:
        raise DataError(path, "Fortran-ordered arrays are not supported; save with np.save of a C-ordered array")
    if dtype.name not in _FLOAT_KINDS:
        raise DataError(path, f"features must be float16/32/64, got dtype {dtype}")
    expected = header + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise DataError(path, f"file is truncated: {size} bytes, the header promises {expected}")
    if size > expected:  # e.g. arrays appended to one file: the header's shape is not the whole file
        raise DataError(path, f"{size - expected} bytes after the array the header describes ({expected} bytes)")
    return tuple(int(s) for s in shape), dtype, header
