"""Hamming search over packed binary codes with FAISS binary indexes.

``make_binary_index`` builds an ``IndexBinaryFlat`` (exact), ``IndexBinaryIVF`` (inverted lists
over a binary k-means, ``nlist``/``nprobe``) or ``IndexBinaryHNSW`` (graph), and
``hamming_candidates`` returns the top-N ids and distances. What this module must not do:
know about models or captions.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .errors import DataError

__all__ = ["INDEX_TYPES", "hamming_candidates", "load_binary_index", "make_binary_index", "save_binary_index"]

INDEX_TYPES = ("flat", "ivf", "hnsw")


def make_binary_index(
    codes: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 8, hnsw_m: int = 16
) -> faiss.IndexBinary:
    """An index over ``codes`` (n, k/8) uint8; ids are row numbers."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    bits = codes.shape[1] * 8
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind == "ivf":
        nlist = nlist or max(1, int(round(np.sqrt(len(codes)))))
        if nlist > len(codes):
            raise ValueError(f"nlist {nlist} exceeds the number of codes {len(codes)}")
        quantizer = faiss.IndexBinaryFlat(bits)
        index = faiss.IndexBinaryIVF(quantizer, bits, nlist)
        index.own_fields = True
        quantizer.this.disown()
        index.train(codes)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexBinaryHNSW(bits, hnsw_m)
    else:
        raise ValueError(f"index type must be one of {INDEX_TYPES}, got {kind!r}")
    index.add(codes)
    return index


def hamming_candidates(index: faiss.IndexBinary, query_codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` by Hamming distance: ``(distances (q, n) int32, ids (q, n) int64)``, nearest first."""
    if n > index.ntotal:
        raise ValueError(f"asked for {n} candidates, but the index holds only {index.ntotal} items")
    query_codes = np.ascontiguousarray(query_codes, dtype=np.uint8)
    dist, ids = index.search(query_codes, n)
    return dist, ids


def save_binary_index(index: faiss.IndexBinary, path: Path) -> None:
    faiss.write_index_binary(index, str(path))


def load_binary_index(path: Path) -> faiss.IndexBinary:
    if not Path(path).exists():
        raise DataError(path, "binary index file missing")
    try:
        return faiss.read_index_binary(str(path))
    except RuntimeError as exc:
        raise DataError(path, f"not a FAISS binary index ({exc})") from None
