"""Hamming search over packed binary codes with FAISS binary indexes, or with torch.

``make_binary_index`` builds an ``IndexBinaryFlat`` (exact), ``IndexBinaryIVF`` (inverted lists
over a binary k-means, ``nlist``/``nprobe``) or ``IndexBinaryHNSW`` (graph), and
``hamming_candidates`` returns the top-N ids and distances; ``set_search_breadth`` changes how
widely an opened approximate index searches (IVF's ``nprobe``, HNSW's ``efSearch``), without a
rebuild. ``TorchBinaryIndex`` is the exact search on any torch device (the GPU path when no
faiss-gpu is installed), with the same ``search`` interface. What this module must not do: know about models or captions.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch

from .errors import DataError, SparseListsWarning, UnusedSettingWarning, caller_stacklevel
from .settings import SettingError, require, require_breadth

__all__ = [
    "INDEX_TYPES",
    "TorchBinaryIndex",
    "hamming_candidates",
    "hamming_distances",
    "load_binary_index",
    "make_binary_index",
    "packed_codes",
    "save_binary_index",
    "search_breadth",
    "set_search_breadth",
]

INDEX_TYPES = ("flat", "ivf", "hnsw")
# ``--index auto``, from benchmarks/hamming.py on the 2-core machine (benchmarks/RESULTS.md):
# exact flat search costs ~0.7-2 ms per query per million codes and needs no training, so it is
# used up to AUTO_FLAT_MAX codes; above, IVF with AUTO_NLIST lists probed AUTO_NPROBE at a time.
AUTO_FLAT_MAX = 2_000_000
AUTO_NLIST = 4096
AUTO_NPROBE = 64


def check_index_options(kind: str, nlist: int | None, nprobe: int | None) -> tuple[int | None, int | None]:
    """What a build asks for, checked before any encoding: a known ``kind``, and ``nlist`` /
    ``nprobe`` (whole numbers >= 1) only where an IVF index may be built (ivf, or auto at scale),
    ``nprobe`` at most ``nlist`` where both are given (a query refuses it too). Returns ``(nlist, nprobe)`` as Python ints (a manifest records them as JSON), None where not given."""
    nlist, nprobe = _check_kind_and_sizes(kind, nlist, nprobe)
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None and kind not in ("ivf", "auto"):
            raise SettingError(
                name,
                f"{name} sets up IVF indexes (`index_type` ivf, or auto at scale), not `index_type` {kind!r}",
                also=("index_type",),
            )
    if nlist is not None and nprobe is not None and nprobe > nlist:  # was capped at nlist without a word
        raise SettingError(
            "nprobe",
            f"nprobe {nprobe} exceeds `nlist` {nlist}: a search probes at most the lists there are",
            also=("nlist",),
        )
    return nlist, nprobe


def _check_kind_and_sizes(kind: str, nlist: int | None, nprobe: int | None) -> tuple[int | None, int | None]:
    """A known index ``kind`` (or auto); ``nlist`` / ``nprobe``, where given, whole numbers >= 1
    (returned as ints: FAISS takes no numpy integer)."""
    if kind != "auto" and kind not in INDEX_TYPES:
        raise SettingError(
            "index_type", f"`index_type` must be one of {INDEX_TYPES}, got {kind!r}; or 'auto' to choose by size"
        )
    return tuple(
        None if value is None else require(name, value, at_least=1, integer=True)
        for name, value in (("nlist", nlist), ("nprobe", nprobe))
    )


def resolve_index_kind(kind: str, n_codes: int, nlist: int | None = None, nprobe: int | None = None) -> dict:
    """The index ``make_binary_index`` builds for ``kind`` over ``n_codes`` codes:
    ``{"type", "nlist", "nprobe"}``. ``auto`` is flat up to ``AUTO_FLAT_MAX`` codes, else IVF.
    ``nlist`` / ``nprobe``, where given, are whole numbers >= 1 (ignored where no IVF is built);
    ``nprobe`` is at most ``nlist``, as the index searches (``make_binary_index``)."""
    nlist, nprobe = _check_kind_and_sizes(kind, nlist, nprobe)
    if kind not in ("auto", "ivf"):
        return {"type": kind, "nlist": None, "nprobe": None}
    if kind == "auto" and n_codes <= AUTO_FLAT_MAX:
        return {"type": "flat", "nlist": None, "nprobe": None}
    if kind == "auto":
        nlist, nprobe = nlist or AUTO_NLIST, nprobe or AUTO_NPROBE
    else:
        nlist, nprobe = nlist or max(1, int(round(np.sqrt(n_codes)))), nprobe or 8
    return {"type": "ivf", "nlist": nlist, "nprobe": min(nprobe, nlist)}  # as the index will search (recorded so)


def make_binary_index(
    codes: np.ndarray,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 16,
    ef_search: int = 128,
    name: str = "codes",
) -> faiss.IndexBinary:
    """An index over ``codes`` (n, k/8) uint8; ids are row numbers. ``kind``: flat, ivf, hnsw or
    auto (``resolve_index_kind``). ``name`` says what the codes are in a ``SparseListsWarning``
    (an IVF index with fewer codes per list than FAISS advises).

    ``ef_search`` is HNSW's search breadth; it must be at least the number of candidates asked
    for, or HNSW returns fewer good ones (FAISS's default, 16, is meant for top-10). ``hnsw_m``,
    the links per node, must be at least 2 (FAISS crashes the process on 0 or 1)."""
    codes = packed_codes("codes", codes)
    if kind == "hnsw":
        hnsw_m = require("hnsw_m", hnsw_m, at_least=2, integer=True)
        ef_search = require("ef_search", ef_search, at_least=1, integer=True)
    bits = codes.shape[1] * 8
    chosen = resolve_index_kind(kind, len(codes), nlist, nprobe)  # the defaults live there
    kind, nlist, nprobe = chosen["type"], chosen["nlist"], chosen["nprobe"]
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind == "ivf":
        if nlist > len(codes):
            raise ValueError(f"nlist {nlist} exceeds the number of codes {len(codes)}")
        quantizer = faiss.IndexBinaryFlat(bits)
        index = faiss.IndexBinaryIVF(quantizer, bits, nlist)
        index.own_fields = True
        quantizer.this.disown()
        _warn_sparse_lists(index, len(codes), name)
        index.train(codes)
        index.nprobe = min(nprobe, nlist)
    else:  # hnsw
        index = faiss.IndexBinaryHNSW(bits, hnsw_m)
        index.hnsw.efSearch = ef_search
    index.add(codes)
    return index


def search_breadth(index) -> dict:
    """How widely ``index`` searches now: ``{"nlist", "nprobe"}`` for an IVF index (FAISS's, or a
    Milvus ``BIN_IVF_FLAT`` collection: ``heiindex.milvus_codes.MilvusCodes``), ``{"ef_search"}``
    for HNSW, ``{}`` for an exact search (flat, ``TorchBinaryIndex``, a GPU index)."""
    if isinstance(index, faiss.IndexBinaryIVF):
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if isinstance(index, faiss.IndexBinaryHNSW):
        return {"ef_search": int(index.hnsw.efSearch)}
    if getattr(index, "nlist", None) is not None:  # a Milvus IVF collection
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    return {}


def set_search_breadth(
    indexes: dict, nprobe: int | None = None, ef_search: int | None = None, stacklevel: int | None = None
) -> None:
    """From now on, search each approximate index of ``indexes`` (what it holds -> index) with
    ``nprobe`` IVF lists probed per query and HNSW's ``ef_search``; None keeps the build's. A larger
    value finds more of the true Hamming neighbours, more slowly. Every value is checked before
    any is set: ``SettingError`` for one that is not a whole number >= 1, or an ``nprobe`` above an
    index's lists (naming it). A value that no index of ``indexes`` has a use for (an exact
    index, or HNSW given ``nprobe``) is said in an ``UnusedSettingWarning`` (``stacklevel`` as
    ``warnings.warn``'s, counted from this function: 2 is its caller; None: the first caller
    outside heiindex)."""
    nprobe, ef_search = require_breadth(nprobe, ef_search)
    now = {name: search_breadth(index) for name, index in indexes.items()}
    for name, breadth in now.items():
        if nprobe is not None and "nlist" in breadth and nprobe > breadth["nlist"]:
            raise SettingError(
                "nprobe", f"nprobe {nprobe} exceeds the {breadth['nlist']} lists of the index of the {name}"
            )
    used = set()
    for name, index in indexes.items():
        if nprobe is not None and "nprobe" in now[name]:
            index.nprobe = nprobe
            used.add("nprobe")
        if ef_search is not None and "ef_search" in now[name]:
            index.hnsw.efSearch = ef_search
            used.add("ef_search")
    given = {"nprobe": nprobe, "ef_search": ef_search}
    unused = [f"`{n}` {v}" for n, v in given.items() if v is not None and n not in used]
    if unused:
        kinds = sorted({_kind_name(index) for index in indexes.values()})
        warnings.warn(
            UnusedSettingWarning(
                f"{' and '.join(unused)} not used: the index searches {' and '.join(kinds)} "
                "(`nprobe` sets how many IVF lists are probed, `ef_search` HNSW's search breadth)",
                settings=("nprobe", "ef_search"),
            ),
            stacklevel=caller_stacklevel() if stacklevel is None else stacklevel,
        )


def _kind_name(index) -> str:
    """What kind of search ``index`` makes, in a few words (``set_search_breadth``'s warning)."""
    breadth = search_breadth(index)
    if "nlist" in breadth:
        return "IVF lists"
    return "an HNSW graph" if breadth else "exactly (flat)"


def _warn_sparse_lists(index, n_codes: int, name: str) -> None:
    """Warn (``SparseListsWarning``) where ``n_codes`` are too few to train ``index``'s lists by
    FAISS's own rule (``cp.min_points_per_centroid`` codes per list, 39), and keep FAISS from
    printing its own line about it on standard error, in the middle of a build's progress bars.
    The lists are trained all the same: only the warning moves."""
    nlist, least = index.nlist, index.cp.min_points_per_centroid
    if n_codes >= nlist * least:
        return
    most = n_codes // least
    fix = "`index_type` flat" if most < 1 else f"`nlist` {most}{' or less' if most > 1 else ''}, or `index_type` flat,"
    lists = f"{nlist} list" if nlist == 1 else f"{nlist} lists"
    warnings.warn(
        SparseListsWarning(
            f"IVF index of {n_codes} {name} in {lists}: {n_codes / nlist:.1f} per list, fewer than the "
            f"{least} FAISS advises for training their centroids, so queries may miss more candidates than "
            f"they need to. {fix} avoids it",
            settings=("nlist", "index_type"),
        ),
        stacklevel=3,
    )
    index.cp.min_points_per_centroid = 1  # FAISS's own warning, said once above


class TorchBinaryIndex:
    """Exact Hamming search with torch, on any device.

    Codes become +-1 vectors and ``hamming = (k - x . y) / 2``, one matrix product per block:
    every product and partial sum is a small integer, exact in float32 and, for k <= 2048, in
    float16 (used on GPUs). Answers equal FAISS's ``IndexBinaryFlat``'s, ties included.
    """

    def __init__(self, codes: np.ndarray, device: str | torch.device = "cpu", block: int = 1 << 20) -> None:
        codes = packed_codes("codes", codes)
        self.device = torch.device(device)
        self.bits = codes.shape[1] * 8
        self.dtype = torch.float16 if self.device.type == "cuda" and self.bits <= 2048 else torch.float32
        self.block = require("block", block, at_least=1, integer=True)
        self._signs = _signs(torch.from_numpy(codes).to(self.device), self.dtype)  # (n, k)

    @property
    def ntotal(self) -> int:
        return self._signs.shape[0]

    @property
    def d(self) -> int:
        return self.bits

    def search(self, query_codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances (q, n) int32, ids (q, n) int64)``, nearest first and, at equal distance,
        lowest id first; slots beyond the codes held get id -1 and distance 2**31 - 1. All as
        FAISS's ``IndexBinaryFlat`` answers."""
        query_codes = packed_codes("query codes", query_codes, self.bits // 8)
        n = require("n", n, at_least=1, integer=True)
        m = min(n, self.ntotal)  # found; the rest of the n slots are empty
        dist = np.full((len(query_codes), n), np.iinfo(np.int32).max, dtype=np.int32)
        ids = np.full((len(query_codes), n), -1, dtype=np.int64)
        if len(query_codes) == 0 or m == 0:
            return dist, ids
        q = _signs(torch.from_numpy(query_codes).to(self.device), self.dtype)
        # One int64 key per pair, distance * ntotal + id: its order is (distance, id), FAISS's.
        best = None
        for s in range(0, self.ntotal, self.block):  # db blocks bound the (q, block) score matrix
            sims = (q @ self._signs[s : s + self.block].T).float()
            keys = sims.neg_().add_(self.bits).div_(2).round_().long()  # Hamming distances, in place
            keys.mul_(self.ntotal).add_(torch.arange(s, s + keys.shape[1], device=self.device))
            if best is not None:
                keys = torch.cat([best, keys], 1)
            best = torch.topk(keys, min(m, keys.shape[1]), dim=1, largest=False).values  # sorted, smallest first
        best = best.cpu().numpy()
        dist[:, :m], ids[:, :m] = best // self.ntotal, best % self.ntotal
        return dist, ids


def index_on_device(
    index: faiss.IndexBinary, device: str | torch.device, codes: np.ndarray | None = None
) -> faiss.IndexBinary | TorchBinaryIndex:
    """The same codes, searched on ``device``: unchanged on CPU; on a GPU, faiss-gpu's
    ``GpuIndexBinaryFlat`` when faiss-gpu is installed (``pip install heiindex[gpu]``), else
    ``TorchBinaryIndex``. Both are exact, so an IVF or HNSW index becomes exact on the GPU.
    ``codes``: the index's codes where the caller holds them already (``stored_codes``)."""
    device = torch.device(device)
    if device.type == "cpu":
        return index
    codes = stored_codes(index) if codes is None else codes
    if device.type == "cuda" and hasattr(faiss, "GpuIndexBinaryFlat") and faiss.get_num_gpus() > 0:
        config = faiss.GpuIndexBinaryFlatConfig()  # on the GPU asked for: faiss's default is GPU 0
        config.device = device.index if device.index is not None else torch.cuda.current_device()
        gpu = faiss.GpuIndexBinaryFlat(faiss.StandardGpuResources(), index.d, config)
        gpu.add(codes)
        return gpu
    return TorchBinaryIndex(codes, device)


def stored_codes(index: faiss.IndexBinary) -> np.ndarray:
    """The ``(ntotal, k/8)`` codes held by a FAISS binary index, row i = id i."""
    if index.ntotal == 0:
        return np.zeros((0, index.code_size), np.uint8)
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.uint8).reshape(index.ntotal, index.code_size)


def _signs(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed little-endian bytes (n, k/8) -> +-1 (n, k) in ``dtype``."""
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = (codes.unsqueeze(-1) >> shifts) & 1  # bit i of byte j is code bit 8 j + i
    return bits.reshape(codes.shape[0], codes.shape[1] * 8).to(dtype) * 2 - 1


def hamming_distances(query_codes: np.ndarray, codes: np.ndarray, block: int = 2048) -> np.ndarray:
    """Every query's Hamming distance to every code, (q, n) float32 (exact: small integers), as
    ``TorchBinaryIndex`` computes them, ``block`` queries at a time: what ranking every item by
    its code alone needs (the bench's "Hamming alone")."""
    query_codes = packed_codes("query codes", query_codes)
    codes = packed_codes("codes", codes, query_codes.shape[1])
    block = require("block", block, at_least=1, integer=True)
    bits = codes.shape[1] * 8
    signs = _signs(torch.from_numpy(codes), torch.float32)
    out = np.empty((len(query_codes), len(codes)), dtype=np.float32)
    for s in range(0, len(query_codes), block):
        q = _signs(torch.from_numpy(query_codes[s : s + block]), torch.float32)
        out[s : s + block] = ((bits - q @ signs.T) / 2).numpy()
    return out


def hamming_candidates(
    index: faiss.IndexBinary | TorchBinaryIndex, query_codes: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` by Hamming distance: ``(distances (q, n) int32, ids (q, n) int64)``, nearest first.
    ``query_codes``: (q, k/8) uint8, as wide as the index's codes."""
    n = require("candidates", n, at_least=1, integer=True)
    if n > index.ntotal:
        raise ValueError(f"asked for {n} candidates, but the index holds only {index.ntotal} items")
    query_codes = packed_codes("query codes", query_codes, index.d // 8)
    if isinstance(index, faiss.IndexBinaryFlat):
        with flat_search_lock(index):  # the way, per call (n varies), and the search that reads it
            index.use_heap = not counting_search(index, n)
            return index.search(query_codes, n)
    return index.search(query_codes, n)


# FAISS reads ``use_heap`` again for every batch of 32 queries, with the GIL released: a search
# that chose the heap (its counters too large for COUNTING_BYTES) counted where another thread set
# the flag meanwhile (a review measured 0.7 GB more address space; up to ~13 GB per batch at
# worst). The answers are the same either way; the memory bound is not. So the flag and the search
# hold one of these locks, picked by the index: searches of one flat index take turns at the
# Hamming step (milliseconds at coco-sim's size), while re-ranking, the long part, runs side by side.
_FLAT_LOCKS = tuple(threading.Lock() for _ in range(64))


def flat_search_lock(index: faiss.IndexBinaryFlat) -> threading.Lock:
    """The lock ``hamming_candidates`` holds while it sets ``index.use_heap`` and searches."""
    return _FLAT_LOCKS[(id(index) >> 4) % len(_FLAT_LOCKS)]


# FAISS's flat binary search keeps each query's n nearest in a heap by default. Where n is a large
# share of the codes (HEI's 100 candidates of coco-sim's 1,000 images), most distances displace
# the heap's top. Its counting search (``use_heap = False``: the ids in one bucket per distance)
# returns the same distances and ids, in the same order (distance, then id), and was 2-3x faster
# there (``benchmarks/flat_counting.py``; benchmarks/RESULTS.md, "Hamming search"). It is used
# where n is at least 1 / COUNTING_SHARE of the codes (with fewer, the heap took 0.85-1.42x the
# time of counting, single-threaded, in the cases measured: FAISS's default is left alone there),
# and where its counters fit COUNTING_BYTES: (bits + 1) x n ids of 8 bytes for each query of a
# batch of ``query_batch_size`` (32), allocated per batch (66 MB at 256 bits and n = 1,000).
COUNTING_BYTES = 64 << 20
COUNTING_SHARE = 200


def counting_search(index: faiss.IndexBinaryFlat, n: int) -> bool:
    """Whether ``hamming_candidates`` searches the flat ``index`` for ``n`` candidates by FAISS's
    counting search rather than its heap (the same answer either way)."""
    held = index.query_batch_size * (index.d + 1) * n * 8
    return held <= COUNTING_BYTES and n * COUNTING_SHARE >= index.ntotal


def packed_codes(name: str, codes: np.ndarray, width: int | None = None) -> np.ndarray:
    """``codes`` as contiguous (n, k/8) uint8 rows of packed bits (``numpy.packbits``, what the hash
    module gives), ``width`` bytes wide where given. Other dtypes are refused, not wrapped to bytes."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(
            f"{name} must be packed bits, an (n, k/8) uint8 array (numpy.packbits), got {codes.dtype} of shape {codes.shape}"
        )
    if width is not None and codes.shape[1] != width:
        raise ValueError(f"{name} are {codes.shape[1] * 8}-bit, the index holds {width * 8}-bit codes")
    return np.ascontiguousarray(codes)


def save_binary_index(index: faiss.IndexBinary, path: Path) -> None:
    faiss.write_index_binary(index, str(path))


def load_binary_index(path: Path, data: bytes | None = None) -> faiss.IndexBinary:
    """The FAISS binary index in ``path``, or in ``data``, that file's bytes already read (the
    caller checks them against a checksum); ``DataError`` naming ``path`` where it is missing or
    not such an index."""
    if data is None and not Path(path).exists():
        raise DataError(path, "binary index file missing")
    try:
        if data is not None:
            return faiss.deserialize_index_binary(np.frombuffer(data, dtype=np.uint8))
        return faiss.read_index_binary(str(path))
    except (RuntimeError, MemoryError) as exc:  # MemoryError: a damaged header's size (std::bad_alloc)
        raise DataError(path, f"not a FAISS binary index ({type(exc).__name__}: {exc})") from None
