"""Sharded HEI indexes: S self-contained shards of one split, searched and merged by score.

What this module is for: ``write_shards`` cuts a split's images into S contiguous ranges and
writes one ordinary index per range (its FAISS binary indexes, Parquet features and manifest;
each image's captions live in the image's shard), plus a top-level manifest (``build_shards`` writes and opens one). ``ShardedIndex``
answers a query by asking every shard for its own Hamming top-N, re-ranked by the matcher,
and merging the shards' top-k by matcher score.

Why the merge is never worse than one unsharded index (with exact, flat shard indexes; IVF or
HNSW shards may miss candidates, as an approximate unsharded index may): the global Hamming top-N is contained
in the union of the shards' top-N (an item among the N nearest of all is among the N nearest
of its own shard), and every candidate is scored exactly, so the merged top-k scores are at
least those of the unsharded top-k, rank by rank. They coincide whenever the unsharded top-k
are also the best-scored items of that union; they differ only when a shard's extra
candidates (items the global top-N cut off) score higher, and then the sharded answer is the
better one. With N at least the shard size every shard is scored exhaustively and the merged
top-k equals exhaustive attention's top-k.

What it must not do: start processes or talk to a Ray cluster (``heiindex.ray_engine`` does). (A
rebuild over an unsharded build whose codes were in Milvus drops its collections, through
``heiindex.milvus_codes.replaced_collections``, as any rebuild does.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import LoadedModel
from .errors import DataError, counted, name_some
from .hamming import check_index_options, set_search_breadth
from .hash_folder import LoadedHash
from .index import _NOT_PICKLED, Hit, Hits, Index, SearchResult, described, load_models, timed_results
from .index_manifest import (
    SHARDED_FORMAT_VERSION,
    check_shards,
    read_sharded_manifest,
    refuse_shard_folder,
)
from .index_write import (
    INDEX_OUTPUT,
    check_lists_filled,
    load_bound_models,
    models_on,
    shard_counts,
    warn_nprobe_lowered,
    warn_unused_lists,
)
from .manifests import read_unswapped, write_json
from .milvus_codes import replaced_collections  # pymilvus: lazily
from .outputs import atomic_dir
from .prototypes import PrototypeConfig, caption_bank, check_describing_split
from .search import (
    BatchSearch,
    Candidates,
    EncodedQueries,
    check_queries,
    encode_queries,
    refuse_unknown_images,
)
from .settings import SettingError, require, require_breadth, require_path
from .store import SplitStore

__all__ = [
    "ShardedIndex",
    "batch_results",
    "build_shards",
    "locate_images",
    "merge_hits",
    "shard_bounds",
    "shard_search_regions",
    "shard_search_text",
    "write_shards",
]


def shard_bounds(n_images: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of near-equal size, one per shard."""
    shards = require("shards", shards, integer=True)
    if not 1 <= shards <= n_images:
        raise SettingError(
            "shards", f"shards must lie in [1, {n_images}] (the split has {n_images} images), got {shards}"
        )
    edges = np.linspace(0, n_images, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def write_shards(
    store_root: str | Path,
    split: str,
    matcher: LoadedModel | str | Path,
    hasher: LoadedHash | str | Path,
    out: str | Path,
    shards: int,
    index_type: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: bool = False,
    device: str = "cpu",
    prototypes: PrototypeConfig | None = None,
) -> dict:
    """Write ``shards`` shard indexes of ``store_root/split`` under ``out`` (atomically: a failure
    leaves no half-built folder); returns the top-level manifest written. ``prototypes``: as
    ``Index.write``'s; the describing captions are hashed once for all shards, and each shard
    describes its images with them (a shard's image codes are those of the unsharded build)."""
    nlist, nprobe = check_index_options(index_type, nlist, nprobe)  # before any encoding
    store_root, out = require_path("store_root", store_root), require_path("out", out)
    refuse_shard_folder(out)  # a sharded build written over another build's shard destroyed it
    matcher, hasher = load_bound_models(matcher, hasher)
    store = SplitStore.open(store_root, split)
    bounds = shard_bounds(store.n_images, shards)
    captions = store.captions()  # read once for all shards
    store.check_ids(captions)
    # What each shard's Index.write checks first (its images and their captions), for every
    # shard before the first one is encoded (and before describing captions are hashed): a
    # smaller shard could fail after the ones before it were built.
    ids = store.image_id_column()
    counts = [shard_counts(captions, ids, a, b) for a, b in bounds]
    for (a, b), shard in zip(bounds, counts, strict=True):
        check_lists_filled(index_type, nlist, nprobe, shard, (a, b))
    warn_unused_lists(index_type, nlist, nprobe, [n for shard in counts for n in shard.values()])
    warn_nprobe_lowered(index_type, nlist, nprobe, counts)
    if prototypes is not None:  # the describing captions hashed once, where the shards encode
        check_describing_split(prototypes, split, store)  # by folder too, before any caption is read
        models_on(matcher, hasher, device)  # where and as Index.write encodes
        prototypes = caption_bank(store_root, prototypes, matcher, hasher, progress=progress)
    out = Path(out)
    entries, manifests = [], []
    # the Milvus collections of an unsharded build this replaces are dropped once it is replaced
    with replaced_collections(out), atomic_dir(out, *INDEX_OUTPUT) as tmp:
        for i, (a, b) in enumerate(bounds):
            name = f"shard-{i:03d}"
            m = Index.write(
                store_root,
                split,
                matcher,
                hasher,
                tmp / name,
                index_type=index_type,
                nlist=nlist,
                nprobe=nprobe,
                progress=progress,
                device=device,
                image_rows=(a, b),
                captions=captions,
                prototypes=prototypes,
            )
            manifests.append(m)
            entries.append(
                {"path": name, "store_rows": [a, b], "n_images": m["n_images"], "n_captions": m["n_captions"]}
            )
        # each shard reads the split again: every one must have read what the build began with
        changed = [
            e["path"] for e, m in zip(entries, manifests, strict=True) if m["store"]["checksum"] != store.checksum
        ]
        if changed:
            raise DataError(
                store.path,
                f"was replaced while the sharded build read it (shards {name_some(changed)} read other data than "
                "the build began with): nothing was written; build again once it is ingested",
            )
        manifest = {
            "format_version": SHARDED_FORMAT_VERSION,
            "kind": "sharded",
            "created_by": f"heiindex {__version__}",
            "split": split,
            "store": manifests[0]["store"],
            "matcher": manifests[0]["matcher"],
            "hash": manifests[0]["hash"],
            **({"prototypes": manifests[0]["prototypes"]} if prototypes is not None else {}),
            "n_images": sum(e["n_images"] for e in entries),
            "n_captions": sum(e["n_captions"] for e in entries),
            "shards": entries,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def build_shards(
    store_root: str | Path,
    split: str,
    matcher: LoadedModel | str | Path,
    hasher: LoadedHash | str | Path,
    out: str | Path,
    shards: int,
    **options,
) -> ShardedIndex:
    """``write_shards`` (same options), then open the result."""
    matcher, hasher = load_bound_models(matcher, hasher)
    write_shards(store_root, split, matcher, hasher, out, shards, **options)
    return ShardedIndex.open(out, matcher, hasher)


def _stacked(per_source: list[list[Candidates]]) -> list[Candidates]:
    """Each searched shard's candidates for the queries of every source shard, one after another."""
    return [
        Candidates(*(np.concatenate(parts) for parts in zip(*found, strict=True)))
        for found in zip(*per_source, strict=True)
    ]


def merge_hits(per_shard: Iterable[Hits], k: int) -> Hits:
    """The best ``k`` of the shards' hits by matcher score, renumbered from 1, with the shards'
    candidates summed (None where a shard's are not known: a plain list, from the actor of an
    older heiindex that ``heiindex serve`` started). Ties as one index breaks them (``top_k``): the smaller Hamming distance
    first, then the earlier shard, then its rank there; shards hold consecutive images, so an
    equal pair of images comes in the unsharded build's order (earlier shards broke ties first,
    whatever their distances)."""
    per_shard = list(per_shard)
    flat = [(-h.score, h.hamming, s, h.rank, h) for s, hits in enumerate(per_shard) for h in hits]
    flat.sort(key=lambda t: t[:4])
    merged = (
        Hit(rank + 1, h.id, h.score, h.hamming, captions=h.captions, text=h.text)
        for rank, (*_, h) in enumerate(flat[:k])
    )
    counts = [getattr(hits, "candidates", None) for hits in per_shard]
    return Hits(merged, None if None in counts else sum(counts))


class ShardedIndex(BatchSearch):
    """All shards of a sharded build opened in this process, sharing one matcher and hash module."""

    sharded = True

    def __init__(self, path: Path, manifest: dict, shards: list[Index]) -> None:
        self.path = path
        self.manifest = manifest
        self.shards = shards

    @classmethod
    def open(
        cls,
        path: str | Path,
        matcher: LoadedModel | str | Path | None = None,
        hasher: LoadedHash | str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> ShardedIndex:
        """Open every shard of the build at ``path``; ``nprobe`` / ``ef_search`` as
        ``Index.open``'s, for every shard (``set_search_breadth``)."""
        path = require_path("path", path)
        nprobe, ef_search = require_breadth(nprobe, ef_search)  # before any shard is read

        def read() -> ShardedIndex:  # whole, again, where a rebuild swapped the build meanwhile
            manifest = read_sharded_manifest(path)
            check_shards(path, manifest)  # from their manifests, before any shard or model is read
            models = load_models(manifest, matcher, hasher, path / "manifest.json")
            shards = []
            for entry in manifest["shards"]:  # each the shard the build records: check_shards, above
                shards.append(Index.open(path / entry["path"], *models, device=device, dtype=dtype))
            return cls(path, manifest, shards)

        return read_unswapped(path, read).set_search_breadth(nprobe, ef_search)

    def set_search_breadth(self, nprobe: int | None = None, ef_search: int | None = None) -> ShardedIndex:
        """``Index.set_search_breadth`` for every shard: each value checked against every shard
        before any is set, and one ``UnusedSettingWarning`` where no shard has a use for it."""
        if nprobe is not None or ef_search is not None:
            named = {name: index for shard in self.shards for name, index in shard.hamming_indexes(named=True).items()}
            set_search_breadth(named, nprobe, ef_search)
        return self

    def __repr__(self) -> str:
        first, shards = self.shards[0], f" in {counted(len(self.shards), 'shard')}"
        return f"<ShardedIndex {str(self.path)!r}: {described(self, first.hasher.module.config.bits, first.device, first.dtype, shards)}>"

    def __reduce__(self):
        raise TypeError(_NOT_PICKLED.format(kind="ShardedIndex", path=str(self.path)))

    def search_breadth(self) -> list[dict]:
        """``Index.search_breadth`` of each shard, in shard order."""
        return [shard.search_breadth() for shard in self.shards]

    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self.shards)

    @property
    def n_captions(self) -> int:
        return sum(s.n_captions for s in self.shards)

    def shard_sizes(self, image_query: bool) -> list[int]:
        return [s.n_captions if image_query else s.n_images for s in self.shards]

    # -- the sharded bench (run_sharded_bench) ---------------------------------------------
    def bench_metas(self) -> list[dict]:
        return [s.bench_meta() for s in self.shards]

    # Every shard answers every query: the queries' codes are the shards' own (cached), hashed
    # once, not once per shard. ``queries``: only the first that many (the bench's warm-up), taken
    # from the first shards only, else all. The queries go one source shard at a time, as views
    # of its features where it gives them all: the split's words (or regions) are not copied
    # whole beside the shards'.
    def bench_captions(self, n: int, queries: int | None = None) -> list:
        per_source = []
        for source, c in self._first(queries, image_query=True):
            words = source.words.select(torch.arange(c))  # the words themselves where c is all of them
            codes = source.caption_codes()[:c]
            per_source.append([s.candidates_for_captions(words, words.lengths, n, codes) for s in self.shards])
        return _stacked(per_source)

    def bench_images(self, n: int, queries: int | None = None) -> list:
        per_source = []
        for source, c in self._first(queries, image_query=False):
            regions, gram, codes = source.regions[:c], source.gram[:c], source.image_codes()[:c]
            per_source.append([s.candidates_for_images(regions, gram, n, codes) for s in self.shards])
        return _stacked(per_source)

    def _first(self, queries: int | None, image_query: bool) -> list[tuple[Index, int]]:
        """The shards holding the first ``queries`` captions (``image_query``: those the images
        search) or images, and how many of each (``first_counts``)."""
        counts = first_counts(self.shard_sizes(image_query), queries)
        return [(s, c) for s, c in zip(self.shards, counts, strict=True) if c]

    def _search_texts(self, texts: list[str], k, candidates, batch: int, where) -> Iterator[SearchResult]:
        """Each batch is encoded once and searched by every shard (its own Hamming top-``candidates``,
        at most its size), the shards' hits merged by score."""
        encoded = check_queries(self.shards[0].matcher.vocab, texts, where)  # all of them, before any search
        return self._search_batches(texts, encoded, k, candidates, batch)

    def _search_batches(self, texts, encoded, k: int, candidates: int, batch: int) -> Iterator[SearchResult]:
        for start in range(0, len(encoded), batch):
            t0 = time.perf_counter()
            queries = encode_queries(self.shards[0].model, encoded[start : start + batch])
            codes = self.shards[0].hasher.module.caption_codes(queries.words, queries.lengths)  # once, not per shard
            per_shard = [shard_search_text(s, queries, k, candidates, codes) for s in self.shards]
            yield from batch_results(texts[start : start + batch], per_shard, queries.unknown, k, t0)

    def _search_images(self, image_ids: list[int], k, candidates, batch: int) -> Iterator[SearchResult]:
        """Each image's features come from its own shard; every shard searches and re-ranks its own
        captions for a batch of images at once, the results are merged by score."""
        shard_of, rows = locate_images(
            image_ids, [s.image_rows(image_ids) for s in self.shards], [s.image_span for s in self.shards]
        )
        return self._image_batches(image_ids, shard_of, rows, k, candidates, batch)

    def _image_batches(self, image_ids, shard_of, rows, k: int, candidates: int, batch: int) -> Iterator[SearchResult]:
        for start in range(0, len(image_ids), batch):
            t0 = time.perf_counter()
            part = slice(start, start + batch)
            regions, gram, codes = self._features(shard_of[part], rows[part])
            per_shard = [shard_search_regions(s, regions, gram, k, candidates, codes) for s in self.shards]
            yield from batch_results(image_ids[part], per_shard, None, k, t0)

    def _features(self, shard_of: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Regions, Gram matrices and codes of the images at ``rows`` of shards ``shard_of``, in
        order: one ``Index.image_features`` call per shard holding any of them."""
        at, parts = [], []
        for s in np.unique(shard_of):
            pos = np.flatnonzero(shard_of == s)
            at.append(pos)
            parts.append(self.shards[int(s)].image_features(rows[pos]))
        back = torch.from_numpy(np.argsort(np.concatenate(at)))  # listed by shard -> in the batch's order
        regions, gram = (torch.cat([p[i] for p in parts])[back.to(parts[0][i].device)] for i in (0, 1))
        return regions, gram, np.concatenate([p[2] for p in parts])[back.numpy()]


def first_counts(sizes: Sequence[int], queries: int | None) -> list[int]:
    """How many items of each part, in order, make up the first ``queries`` items of all the parts
    together (every item where ``queries`` is None): the bench's warm-up takes its queries from
    the first shards only."""
    if queries is None:
        return [int(n) for n in sizes]
    left, counts = max(int(queries), 0), []
    for n in sizes:
        counts.append(min(int(n), left))
        left -= counts[-1]
    return counts


def shard_search_text(
    shard: Index, queries: EncodedQueries, k: int, candidates: int, codes: np.ndarray | None = None
) -> list[Hits]:
    """One shard's part of a batch of text queries (each query's hits): N and k capped at the
    shard's size. ``codes``: the batch's codes, hashed once for every shard (they share one hash
    module), else hashed here."""
    n = min(candidates, shard.n_images)
    return shard.search_encoded(queries, min(k, n), n, codes)


def batch_results(
    queries: list, per_shard: list[list[Hits]], unknown: list[list[str]] | None, k: int, t0: float
) -> Iterator[SearchResult]:
    """Each query's (text or image id) shard hits merged by score (``merge_hits``), as results
    (``heiindex.index.timed_results``)."""
    merged = [merge_hits([hits[q] for hits in per_shard], k) for q in range(len(queries))]
    return timed_results(queries, merged, unknown, t0)


def locate_images(
    image_ids: list[int], rows_per_shard: list[np.ndarray], spans: list[Sequence[int] | None] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The shard holding each image and its row there, from each shard's rows of ``image_ids`` (-1
    where not its image); ids no shard holds are refused together, with the span of the ids the
    shards hold (``spans``: each shard's ``id_span``; None: not known)."""
    rows = np.stack(rows_per_shard)
    held = rows >= 0
    refuse_unknown_images([i for i, h in zip(image_ids, held.any(axis=0), strict=True) if not h], len(image_ids), spans)
    shard_of = held.argmax(axis=0)
    return shard_of, rows[shard_of, np.arange(len(image_ids))]


def shard_search_regions(shard: Index, regions, gram, k: int, candidates: int, codes=None) -> list[Hits]:
    """One shard's part of a batch of image queries (each image's hits; a shard without captions
    has nothing to add): N and k capped at the shard's size. ``codes``: the images' own codes
    (``Index.image_features``)."""
    n = min(candidates, shard.n_captions)
    return shard.rank_regions(regions, gram, min(k, n), n, codes) if n else [Hits() for _ in range(len(regions))]
