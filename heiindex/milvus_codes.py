"""Hash codes of a build kept in Milvus, a shared vector database (optional: heiindex[milvus]).

What this module is for: ``upload_codes`` writes a build's image and caption codes into two
Milvus collections (BINARY_VECTOR fields, metric HAMMING, index BIN_FLAT or BIN_IVF_FLAT), and
``MilvusCodes`` searches one of them with the interface of a FAISS binary index (``ntotal``,
``search(codes, n)``), so ``Index`` fetches its Hamming candidates from Milvus while features
and re-ranking stay in heiindex's own Parquet files. Row ids in Milvus are the index's rows.

Searches use ``consistency_level="Bounded"`` (Strong added ~200 ms per search in a trial).
What it must not do: score, or hold features.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import HeiindexError, LeftoverWarning
from .manifests import manifest_object

__all__ = [
    "MILVUS_INDEX_TYPES",
    "MilvusCodes",
    "check_server",
    "collection_names",
    "drop_collections",
    "replaced_collections",
    "upload_codes",
]

MILVUS_INDEX_TYPES = ("BIN_FLAT", "BIN_IVF_FLAT")
_BATCH = 10_000


def _pymilvus():
    try:
        with warnings.catch_warnings():  # pymilvus 2.3's own import of pkg_resources: two lines on every command
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import pymilvus
    except ImportError:
        raise HeiindexError("Milvus codes need pymilvus: pip install 'heiindex[milvus]'") from None
    return pymilvus


def _connect(uri: str, timeout: float = 5.0) -> str:
    """An alias connected to ``uri`` (http://host:port); a clear error naming it when unreachable."""
    pm = _pymilvus()
    alias = "heiindex-" + hashlib.sha256(uri.encode()).hexdigest()[:8]
    if pm.connections.has_connection(alias):
        return alias
    try:
        pm.connections.connect(alias=alias, uri=uri, timeout=timeout)
    except Exception as exc:  # pymilvus raises its own exception types per version
        raise HeiindexError(f"cannot reach the Milvus server at {uri}: {type(exc).__name__}: {exc}") from None
    return alias


def check_server(uri: str) -> None:
    """``HeiindexError`` naming ``uri`` unless a Milvus server answers there."""
    _connect(uri)


def collection_names(index_checksum: str) -> dict[str, str]:
    """Collection names of one build, from a key of its own (``Index.write`` hashes its output
    path, its manifest and a random part): a rebuild writes new collections, never the ones the
    index it replaces still searches."""
    return {m: f"heiindex_{index_checksum[:16]}_{m}" for m in ("images", "captions")}


def drop_collections(uri: str, names: dict[str, str]) -> None:
    """Drop a build's collections where they exist (a replaced or failed build's). Best effort: a
    ``LeftoverWarning`` names what could not be dropped."""
    try:
        pm = _pymilvus()
        alias = _connect(uri)
        for name in names.values():
            if pm.utility.has_collection(name, using=alias):
                pm.utility.drop_collection(name, using=alias)
    except Exception as exc:  # a server gone meanwhile: the build itself stands
        warnings.warn(
            LeftoverWarning(
                f"Milvus collections {', '.join(names.values())} at {uri} could not be dropped "
                f"({type(exc).__name__}: {exc}); drop them by hand"
            ),
            stacklevel=2,
        )


@contextmanager
def replaced_collections(out: Path) -> Iterator[list[tuple[str, dict[str, str]]]]:
    """Around a build of the index at ``out``: yields a list for the build to add each
    ``(uri, names)`` it uploads. When the build fails they are dropped (the index at ``out``, which
    still searches its own, is untouched); when it succeeds, the collections of the index it
    replaced are dropped (they served a folder that is gone: a process that opened it must open
    the new build)."""
    codes = (manifest_object(Path(out)) or {}).get("codes")  # None: no index there, or FAISS codes only
    ok = isinstance(codes, dict) and isinstance(codes.get("uri"), str) and isinstance(codes.get("collections"), dict)
    replaced = (codes["uri"], codes["collections"]) if ok else None
    uploaded: list[tuple[str, dict[str, str]]] = []
    try:
        yield uploaded
    except BaseException:
        for uri, names in uploaded:
            drop_collections(uri, names)
        raise
    if replaced and replaced not in uploaded:
        drop_collections(*replaced)


def upload_codes(uri: str, names: dict[str, str], codes: dict[str, np.ndarray], kind: str = "BIN_FLAT") -> None:
    """Write ``codes["images"]`` and ``codes["captions"]`` (uint8, (n, k/8)) to Milvus, replacing
    collections of the same names, index them with ``kind`` and load them for search."""
    if kind not in MILVUS_INDEX_TYPES:
        raise HeiindexError(f"Milvus index type must be one of {MILVUS_INDEX_TYPES}, got {kind!r}")
    pm = _pymilvus()
    alias = _connect(uri)
    for modality, name in names.items():
        data = np.ascontiguousarray(codes[modality], dtype=np.uint8)
        if pm.utility.has_collection(name, using=alias):
            pm.utility.drop_collection(name, using=alias)
        fields = [
            pm.FieldSchema("row", pm.DataType.INT64, is_primary=True),
            pm.FieldSchema("code", pm.DataType.BINARY_VECTOR, dim=data.shape[1] * 8),
        ]
        col = pm.Collection(name, pm.CollectionSchema(fields, description=f"heiindex {modality} codes"), using=alias)
        for s in range(0, len(data), _BATCH):
            block = data[s : s + _BATCH]
            col.insert([list(range(s, s + len(block))), [c.tobytes() for c in block]])
        col.flush()
        params = {} if kind == "BIN_FLAT" else {"nlist": milvus_nlist(len(data))}
        col.create_index("code", {"index_type": kind, "metric_type": "HAMMING", "params": params})
        col.load()


def milvus_nlist(n: int) -> int:
    """The lists of a ``BIN_IVF_FLAT`` collection of ``n`` codes, as ``upload_codes`` makes it."""
    return max(1, min(4096, int(np.sqrt(n))))


class MilvusCodes:
    """One collection of codes, searched like a FAISS binary index. ``kind``: its Milvus index
    type (the manifest's ``codes.index_type``); a ``BIN_IVF_FLAT`` collection has ``nlist`` lists
    and probes ``nprobe`` of them (at most ``nlist``), ``heiindex.hamming.set_search_breadth``
    changes it; ``nlist`` is None for ``BIN_FLAT``, an exact search."""

    def __init__(self, uri: str, name: str, kind: str = "BIN_FLAT", nprobe: int = 16) -> None:
        pm = _pymilvus()
        self.uri, self.name, self.kind = uri, name, kind
        alias = _connect(uri)
        if not pm.utility.has_collection(name, using=alias):
            raise HeiindexError(
                f"Milvus at {uri} has no collection {name!r}: build the index again with its codes there "
                f'(`heiindex build --codes milvus --uri {uri}`; from Python, codes="milvus", uri={uri!r})'
            )
        try:
            self._col = pm.Collection(name, using=alias)
            self._col.load()
            self.ntotal = int(self._col.num_entities)
        except pm.exceptions.MilvusException as exc:  # e.g. a collection left without its index
            raise HeiindexError(
                f"Milvus at {uri} cannot serve collection {name!r} ({exc}); build the index again"
            ) from None
        self.d = next(int(f.params["dim"]) for f in self._col.schema.fields if f.name == "code")  # bits
        self.nlist = milvus_nlist(self.ntotal) if kind == "BIN_IVF_FLAT" else None
        self.nprobe = nprobe if self.nlist is None else min(nprobe, self.nlist)

    def search(self, query_codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances (q, n) int32, rows (q, n) int64)``, nearest first; -1 where Milvus
        returned fewer than n."""
        q = np.ascontiguousarray(query_codes, dtype=np.uint8)
        try:
            res = self._col.search(
                [c.tobytes() for c in q],
                "code",
                {"metric_type": "HAMMING", "params": {"nprobe": self.nprobe}},
                limit=n,
                consistency_level="Bounded",
            )
        except Exception as exc:
            raise HeiindexError(f"Milvus search at {self.uri} failed: {type(exc).__name__}: {exc}") from None
        dist = np.full((len(q), n), np.iinfo(np.int32).max, dtype=np.int32)
        ids = np.full((len(q), n), -1, dtype=np.int64)
        for i, hits in enumerate(res):
            for j, h in enumerate(hits):
                ids[i, j], dist[i, j] = h.id, int(round(h.distance))
        return _in_faiss_order(dist, ids)


def _in_faiss_order(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's results by distance, then row (empty slots last), as FAISS lists them: Milvus
    returns equal distances in its own order, and re-ranking keeps a tie's Hamming order."""
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), dist), axis=-1)
    return np.take_along_axis(dist, order, axis=-1), np.take_along_axis(ids, order, axis=-1)
