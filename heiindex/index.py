"""The HEI index of one split: hash codes in FAISS binary indexes plus what re-ranking needs.

``Index.write`` (``heiindex.index_write``) encodes a stored split with the matcher, writes the projected region features
and their Gram matrices (images) and the word features (captions) to Parquet, hashes both
modalities and writes a FAISS binary index for each (the files are read back by
``heiindex.index_files``; ``Index.build`` writes and opens one). ``Index.open(path).search("a dog")``
codes the query, takes the top-N images by Hamming distance and re-ranks them with the
matcher; ``search_image`` does the same from an image to captions, and ``search_many`` /
``search_images`` do either for many queries, a batch at a time (``heiindex.search.BatchSearch``).

Folder layout::

    manifest.json            format, split, counts, checksums of store, matcher and hash module
    images.faiss             binary index of image codes (ids = image rows)
    captions.faiss           binary index of caption codes (ids = caption rows)
    image_features.parquet   image_id, features (projected regions, R*d float32), gram (R*R float32)
    caption_features.parquet caption_id, image_id, text, tokens, words (len*d float32)

What this module must not do: write an index (``heiindex.index_write``), train, or compute
metrics (``heiindex.bench``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from .attention import region_gram
from .checkpoint import LoadedModel, load_model
from .device import check_precision, resolve_device, set_precision
from .errors import DataError, HeiindexError, ModelMismatchError, counted
from .hamming import (
    index_on_device,
    packed_codes,
    search_breadth,
    set_search_breadth,
    stored_codes,
)
from .hash_folder import LoadedHash, hash_checksum, load_hash
from .index_files import INDEX_COLUMNS, load_code_file, packed_words, read_images
from .index_manifest import (
    attention_changes,
    check_index_manifest,
    read_index_manifest,
    searched_type,
)
from .index_write import load_bound_models, write_index
from .manifests import MANIFEST_FILE, read_unswapped, recorded_file
from .packed import PackedWords
from .search import (
    BatchSearch,
    EncodedQueries,
    Ranked,
    check_counts,
    check_queries,
    encode_queries,
    id_span,
    images_for_text,
    refuse_unknown_images,
    rerank_captions,
    rerank_images,
    top_k,
)
from .settings import SettingError, require_breadth, require_path
from .store import (
    check_caption_columns,
    check_caption_image_ids,
    check_distinct,
    check_row_count,
    open_parquet,
    reading,
    rows_of,
    sorted_ids,
)

__all__ = ["Hit", "Hits", "Index", "SearchResult", "timed_results"]


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    hamming: int
    captions: list[str] | None = None
    text: str | None = None

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "id": self.id, "score": self.score, "hamming": self.hamming}
        if self.captions is not None:
            d["captions"] = self.captions
        if self.text is not None:
            d["text"] = self.text
        return d


class Hits(list):
    """One query's hits, best first (a list of ``Hit``), with ``candidates``: how many Hamming
    candidates the matcher re-ranked to find them, summed over a sharded build's shards. That is
    N (capped at each searched set's size) unless the search came back with fewer (an
    approximate index: IVF, HNSW); None where not known (a shard served by an older heiindex's
    actor). A slice, ``.copy()`` or ``+`` gives a plain list, without the count; ``copy.copy``
    and pickling keep both."""

    def __init__(self, hits=(), candidates: int | None = None) -> None:
        super().__init__(hits)
        self.candidates = None if candidates is None else int(candidates)

    def __repr__(self) -> str:
        return f"Hits({list.__repr__(self)}, candidates={self.candidates})"


@dataclass
class SearchResult:
    """One query's answer: the query (text, or an image id), its hits best first, its unknown
    words, its share of its batch's seconds, and ``candidates``, the Hamming candidates re-ranked
    (``Hits.candidates``; None where not known)."""

    query: str | int
    results: list[Hit]
    unknown_words: list[str] = field(default_factory=list)
    seconds: float = 0.0
    candidates: int | None = None

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "unknown_words": self.unknown_words,
            "results": [h.to_dict() for h in self.results],
        }


def _ranked_hits(ranked: Ranked, hit) -> Hits:
    """One query's ``Ranked`` as ``Hits``, ranked from 1: ``hit(rank, row, score, distance)``
    makes each (the row's id and text are the searched side's)."""
    rows = zip(ranked.rows, ranked.scores, ranked.hamming, strict=True)
    return Hits(
        (hit(rank + 1, row, float(score), int(dist)) for rank, (row, score, dist) in enumerate(rows)), ranked.found
    )


def timed_results(queries: list, hits: list[Hits], unknown: list[list[str]] | None, t0: float):
    """One batch's ``SearchResult``s (text queries with their unknown words, or image ids), each
    with the batch's time since ``t0`` shared equally."""
    seconds = (time.perf_counter() - t0) / max(1, len(queries))
    for q, (query, found) in enumerate(zip(queries, hits, strict=True)):
        candidates = getattr(found, "candidates", None)  # a plain list, from a caller of its own: not known
        yield SearchResult(query, found, [] if unknown is None else unknown[q], seconds, candidates)


def load_models(
    manifest: dict,
    matcher: LoadedModel | str | Path | None,
    hasher: LoadedHash | str | Path | None,
    mpath: Path,
) -> tuple[LoadedModel, LoadedHash]:
    """The matcher and hash module given (loaded from a folder if given as one), else the ones
    the manifest of a build (at ``mpath``) names: a ``DataError`` naming the manifest where such
    a folder is not there (an index copied to another machine, a model moved), both at once
    where both are missing (they were named one command at a time)."""
    wanted = {"matcher": (matcher, "matcher"), "hash": (hasher, "hasher")}
    missing = [
        (key, manifest[key]["path"], setting)
        for key, (given, setting) in wanted.items()
        if given is None and not Path(manifest[key]["path"]).exists()
    ]
    if missing:
        what = {"matcher": "matcher", "hash": "hash module"}
        raise DataError(
            mpath,
            "records "
            + " and ".join(f"its {what[key]} at {folder}" for key, folder, _ in missing)
            + f", {'which is' if len(missing) == 1 else 'which are'} not there (moved, or the build was made "
            + f"elsewhere): give {' and '.join(f'the {what[key]} folder as `{s}`' for key, _, s in missing)}",
            settings=tuple(setting for _, _, setting in missing),
        )
    if not isinstance(matcher, LoadedModel):
        matcher = load_model(manifest["matcher"]["path"] if matcher is None else require_path("matcher", matcher))
    if not isinstance(hasher, LoadedHash):
        hasher = load_hash(manifest["hash"]["path"] if hasher is None else require_path("hasher", hasher))
    return matcher, hasher


# Milvus codes are searched by the server, from this process's CPU side
_MILVUS_ON_CPU = "an index whose codes are in Milvus is searched by the server, from the CPU: use `device` cpu"


class Index(BatchSearch):
    """An opened index: matcher, hash module, binary indexes and re-ranking features in memory."""

    def __init__(
        self, path: Path, manifest: dict, matcher: LoadedModel, hasher: LoadedHash, code_indexes: tuple | None = None
    ) -> None:
        """``code_indexes``: (images, captions) searched for Hamming candidates (e.g.
        ``heiindex.milvus_codes.MilvusCodes``); default: the FAISS files of ``path``."""
        self.path = path
        self.manifest = manifest
        self.matcher = matcher
        self.hasher = hasher
        self._ids_sorted: tuple[np.ndarray, np.ndarray] | None = None  # store.sorted_ids, made once
        self.device, self.dtype = torch.device("cpu"), "float32"  # as read; Index.to moves them
        faiss_files = code_indexes is None
        counts = {"images": manifest["n_images"], "captions": manifest["n_captions"]}
        bits = hasher.module.config.bits
        if faiss_files:
            code_indexes = tuple(load_code_file(path, what, manifest, counts[what], bits) for what in counts)
        if len(code_indexes) != 2:
            raise ValueError(f"code_indexes must be (images, captions), got {len(code_indexes)} items")
        # as opened (FAISS, on the CPU, or Milvus): ``to`` derives each device's searched indexes from them
        self._code_indexes = tuple(code_indexes)
        self.image_index, self.caption_index = code_indexes
        # The stored items' codes as the build wrote them, whichever device hashed them: the
        # bench's queries and a query by a stored image search with the codes the index holds
        # (each file checked by load_code_file). An index searched elsewhere (Milvus) hashes its
        # features instead, except prototype image codes, which the features cannot give: those
        # are read from images.faiss all the same.
        stored = {"images": self.image_index, "captions": self.caption_index} if faiss_files else {}
        if not faiss_files and "prototypes" in manifest:
            stored["images"] = load_code_file(path, "images", manifest, counts["images"], bits)
        self._image_codes: np.ndarray | None = stored_codes(stored["images"]) if "images" in stored else None
        self._caption_codes: np.ndarray | None = stored_codes(stored["captions"]) if "captions" in stored else None
        opened = {}  # each file's footer read once, for the checks here and for the reads below
        for name, file in (("images", "image_features.parquet"), ("captions", "caption_features.parquet")):
            if not (path / file).is_file():  # before either is read
                raise DataError(path / file, "missing: this index is incomplete (build it again)")
            record = recorded_file(path / MANIFEST_FILE, manifest, file)  # None: a manifest that records no files
            pf = opened[name] = open_parquet(path / file, INDEX_COLUMNS[name], pre_buffer=False, record=record)
            check_row_count(path / file, pf, counts[name], name, MANIFEST_FILE)  # before any feature is read
        r, d = manifest["regions"], manifest["embed_size"]
        if d != matcher.model.config.embed_size:  # else named as a features file too short for its rows
            raise DataError(
                path / MANIFEST_FILE,
                f'field "embed_size" is {d}, but the matcher it records embeds in {matcher.model.config.embed_size}',
            )
        # Features are copied a row group at a time into the tensors kept, never held whole as
        # Arrow columns beside them.
        ids, regions, gram = read_images(path / "image_features.parquet", r, d, opened["images"])
        self.image_ids, self.regions, self.gram = ids, torch.from_numpy(regions), torch.from_numpy(gram)
        self.image_span = id_span(ids)  # named when an unknown image id is refused
        captions = path / "caption_features.parquet"
        with reading(captions):
            c = opened["captions"].read(columns=["caption_id", "image_id", "text", "tokens"])
        check_caption_columns(captions, c)
        self.caption_ids = c.column("caption_id").to_numpy()
        self.caption_image_ids = c.column("image_id").to_numpy()
        self.texts = c.column("text").to_pylist()
        lengths = np.diff(c.column("tokens").combine_chunks().offsets.to_numpy()).astype(np.int64)
        # packed: a split's captions cost their real words, not n x the longest caption
        self.words = packed_words(captions, lengths, d, opened["captions"])
        pa.default_memory_pool().release_unused()  # Arrow's pool keeps what the reads used (137 MB at coco-sim test)
        check_distinct(path / "image_features.parquet", self.image_ids, "image_id")
        check_distinct(captions, self.caption_ids, "caption_id")
        check_caption_image_ids(captions, self.caption_image_ids, self.image_ids, "image_features.parquet")
        self.caption_image = self.image_rows(self.caption_image_ids)  # every one found: checked above
        by_image = np.argsort(self.caption_image, kind="stable")  # caption rows grouped by image, in order
        ends = np.cumsum(np.bincount(self.caption_image, minlength=len(self.image_ids)))
        self.image_captions: list[list[int]] = [part.tolist() for part in np.split(by_image, ends[:-1])]

    def __repr__(self) -> str:
        return f"<Index {str(self.path)!r}: {described(self, self.hasher.module.config.bits, self.device, self.dtype)}>"

    def __reduce__(self):
        raise TypeError(_NOT_PICKLED.format(kind="Index", path=str(self.path)))

    # -- properties ---------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.caption_ids)

    @property
    def model(self):
        return self.matcher.model

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        store_root: str | Path,
        split: str,
        matcher: LoadedModel | str | Path,
        hasher: LoadedHash | str | Path,
        out: str | Path,
        **options,
    ) -> Index:
        """Write the index of ``store_root/split`` into ``out`` (``write``, same options) and open it."""
        matcher, hasher = load_bound_models(matcher, hasher)
        cls.write(store_root, split, matcher, hasher, out, **options)
        return cls.open(out, matcher, hasher)

    write = staticmethod(write_index)  # heiindex.index_write: encode, hash and index a split into a folder

    @classmethod
    def open(
        cls,
        path: str | Path,
        matcher: LoadedModel | str | Path | None = None,
        hasher: LoadedHash | str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        codes: str | None = None,
        uri: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Index:
        """Open a built index. Without ``matcher``/``hasher`` the ones it was built with are loaded;
        given ones must be the same (checksums), else ``ModelMismatchError``. ``device`` and
        ``dtype`` are where and in what precision queries and the bench run (see ``to``).
        ``codes``: where Hamming candidates come from, "faiss" (the index's files) or "milvus"
        (the collections the build wrote, at ``uri`` or the URI it was built with); default: as
        built. ``nprobe`` / ``ef_search``: how widely an IVF / HNSW index searches, in place of
        the build's (``set_search_breadth``).

        A rebuild may swap the folder while it is read (``read_unswapped``): the open is read
        again where the manifest changed meanwhile, up to three reads in all."""
        path, args = require_path("path", path), (matcher, hasher, device, dtype, codes, uri)
        nprobe, ef_search = require_breadth(nprobe, ef_search)  # before anything is read
        return read_unswapped(path, lambda: cls._open_once(path, *args)).set_search_breadth(nprobe, ef_search)

    @classmethod
    def _open_once(cls, path: Path, matcher, hasher, device: str, dtype: str, codes, uri) -> Index:
        mpath = path / "manifest.json"
        manifest = read_index_manifest(path)
        if manifest.get("kind") == "sharded":
            raise HeiindexError(f"{path} is a sharded build: open it with heiindex.shards.ShardedIndex")
        check_index_manifest(manifest, mpath)
        matcher, hasher = load_models(manifest, matcher, hasher, mpath)
        for part, recorded, loaded, held in (
            ("matcher", manifest["matcher"], matcher, matcher.checksum),
            ("hash module", manifest["hash"], hasher, hash_checksum(hasher.module)),
        ):
            if held != recorded["sha256"]:
                # the folder the build recorded, trained again since: say so (no way out was named)
                rewritten = Path(recorded["path"]).resolve() == Path(loaded.path).resolve()
                raise ModelMismatchError(
                    f"index {path} was built with {part} {recorded['sha256'][:12]} ({recorded['path']}), not with "
                    f"{held[:12]} ({loaded.path})"
                    + ("; that folder was written again after the build" if rewritten else "")
                    + f": rebuild the index with this {part}, or give the {part} it was built with"
                )
        changed = attention_changes(manifest["matcher"].get("attention"), matcher.model.attention.to_dict())
        if changed:  # the same weights scoring another way: not the scores the build and its hash module used
            raise ModelMismatchError(
                f"index {path} was built with other attention settings of matcher {matcher.path} than its "
                f"config.json gives now ({changed}): rebuild the index with this matcher, or restore its settings"
            )
        built = manifest.get("codes", {"store": "faiss"})  # checked with the manifest (check_codes_entry)
        source = built["store"] if codes is None else codes  # "" was taken as "as built"
        if source not in ("faiss", "milvus"):
            raise SettingError("codes", f"codes must be 'faiss' or 'milvus', got {codes!r}")
        if source == "milvus" and built["store"] != "milvus":
            raise HeiindexError(
                f"index {path} was built without Milvus codes (build with `codes` milvus)", settings=("codes",)
            )
        if uri is not None and source != "milvus":  # it would be ignored
            raise HeiindexError(
                f"uri names a Milvus server, but the codes of {path} are searched in its FAISS files",
                settings=("uri",),
            )
        resolve_device(device)  # before the features are read
        check_precision(dtype)
        if source == "milvus" and device != "cpu":
            raise HeiindexError(_MILVUS_ON_CPU, settings=("device",))
        code_indexes = None  # the FAISS files
        if source == "milvus":  # the FAISS files are not read
            from .milvus_codes import MilvusCodes

            server = uri or built["uri"]
            try:
                code_indexes = tuple(
                    MilvusCodes(server, built["collections"][m], built["index_type"]) for m in ("images", "captions")
                )
            except HeiindexError as exc:  # a server that is down: the FAISS files hold the same codes
                raise HeiindexError(
                    f"{exc}; the index's FAISS files hold the same codes: `codes` faiss searches them",
                    settings=(*exc.settings, "codes"),
                ) from None
        return cls(path, manifest, matcher, hasher, code_indexes).to(device, dtype)

    def set_search_breadth(self, nprobe: int | None = None, ef_search: int | None = None) -> Index:
        """Search an approximate index more (or less) widely from now on, without a rebuild:
        ``nprobe`` IVF lists probed per query (at most the index's lists; FAISS or a Milvus
        ``BIN_IVF_FLAT`` collection), ``ef_search`` HNSW's search breadth (the build sets 128). None
        keeps the build's. A setting neither index has a use for (flat indexes; any index on a
        GPU, searched exactly) is said in an ``UnusedSettingWarning``. ``search_breadth`` tells
        what each index uses."""
        if nprobe is not None or ef_search is not None:  # its warning names the caller's line, outside heiindex
            set_search_breadth(self.hamming_indexes(named=True), nprobe, ef_search)
        return self

    def search_breadth(self) -> dict:
        """How widely each code index searches now: ``{"images": {...}, "captions": {...}}``, each
        ``{"nlist", "nprobe"}`` (IVF), ``{"ef_search"}`` (HNSW) or ``{}`` (exact)."""
        return {what: search_breadth(index) for what, index in self.hamming_indexes().items()}

    def hamming_indexes(self, named: bool = False) -> dict:
        """What Hamming candidates are searched in: {"images": index, "captions": index}; where
        ``named``, keyed "images of PATH" / "captions of PATH", as messages name them."""
        where = f" of {self.path}" if named else ""
        return {f"images{where}": self.image_index, f"captions{where}": self.caption_index}

    @property
    def lengths(self) -> Tensor:
        """Word counts of the stored captions (those of ``words``)."""
        return self.words.lengths

    def to(self, device: str = "cpu", dtype: str | None = None) -> Index:
        """Run queries and the bench on ``device`` ("cpu", "cuda", "cuda:1", ...).

        ``dtype``: None (keep the current one), "float32" (exact; what ``Index.open`` gives by
        default), "tf32" (float32 storage, TF32 matrix products on NVIDIA GPUs) or "bfloat16"
        (features stored in 16 bits: half the memory traffic; the softmax, norms and sums stay
        float32; the float32 features are not kept, so going back to float32 needs ``Index.open``
        again, and is refused here). Hamming search moves to the device too
        (``heiindex.hamming.index_on_device``)."""
        from .milvus_codes import MilvusCodes  # pymilvus is imported only when a server is used

        dev = resolve_device(device)
        dtype = self.dtype if dtype is None else dtype
        check_precision(dtype)
        store = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        # every refusal before anything moves or the process's precision switches change
        if self.regions.dtype == torch.bfloat16 and store != torch.bfloat16:
            raise HeiindexError(
                f"this index's features are held in bfloat16 (rounded when opened or moved with that dtype); "
                f"for {dtype} open it again (Index.open({str(self.path)!r}, dtype={dtype!r}))"
            )
        if dev.type != "cpu" and any(isinstance(i, MilvusCodes) for i in self._code_indexes):
            raise HeiindexError(_MILVUS_ON_CPU, settings=("device",))
        if dev.type == "cuda":
            set_precision(dtype)
        self.matcher.model.to(dev)
        self.hasher.module.to(dev)
        if store != self.regions.dtype:  # Milvus-searched: hash the stored items before a cast rounds them
            self.image_codes()
            self.caption_codes()
        self.regions = self.regions.to(dev, store)
        self.gram = self.gram.to(dev)
        self.words = self.words.to(dev, store)
        # from the indexes as opened: back on the CPU, an IVF or HNSW index is itself again
        self.image_index = index_on_device(self._code_indexes[0], dev, self._image_codes)  # codes read when opened
        self.caption_index = index_on_device(self._code_indexes[1], dev, self._caption_codes)
        self.device, self.dtype = dev, dtype
        return self

    # -- queries ------------------------------------------------------------------------------
    def _search_texts(self, texts: list[str], k, candidates, batch: int, where) -> Iterator[SearchResult]:
        encoded = check_queries(self.matcher.vocab, texts, where)  # all of them, before any search
        return self._search_batches(texts, encoded, k, candidates, batch)

    def _search_batches(self, texts, encoded, k: int, candidates: int, batch: int) -> Iterator[SearchResult]:
        for start in range(0, len(encoded), batch):
            t0 = time.perf_counter()
            with torch.no_grad():
                queries = encode_queries(self.model, encoded[start : start + batch])
                hits = self.search_encoded(queries, k, candidates)
            yield from timed_results(texts[start : start + batch], hits, queries.unknown, t0)

    @torch.no_grad()
    def search_encoded(
        self, queries: EncodedQueries, k: int, candidates: int, codes: np.ndarray | None = None
    ) -> list[Hits]:
        """``search`` for captions already encoded (``heiindex.search.encode_queries``), and
        hashed where ``codes`` are given (packed bits, one row per query): each query's hits.
        ``k`` and ``candidates`` are checked as ``search`` checks them."""
        candidates, k = check_counts(candidates, k, [self.n_images], "images", sharded=False)
        if codes is not None:
            codes = self._query_codes(codes, len(queries), "query")
        ranked = images_for_text(
            self.model, self.hasher.module, self.image_index, self.regions, self.gram, queries, k, candidates, codes
        )

        def hit(rank: int, row: int, score: float, dist: int) -> Hit:
            captions = [self.texts[c] for c in self.image_captions[row]]
            return Hit(rank, int(self.image_ids[row]), score, dist, captions=captions)

        return [_ranked_hits(r, hit) for r in ranked]

    def _search_images(self, image_ids: list[int], k, candidates, batch: int) -> Iterator[SearchResult]:
        rows = self.image_rows(image_ids)
        refuse_unknown_images([i for i, r in zip(image_ids, rows, strict=True) if r < 0], len(rows), [self.image_span])
        return self._image_batches(image_ids, rows, k, candidates, batch)

    def _image_batches(self, image_ids: list[int], rows: np.ndarray, k: int, candidates: int, batch: int):
        for start in range(0, len(rows), batch):
            t0 = time.perf_counter()
            regions, gram, codes = self.image_features(rows[start : start + batch])
            hits = self.rank_regions(regions, gram, k, candidates, codes)  # stored features, counts checked
            yield from timed_results(image_ids[start : start + batch], hits, None, t0)

    def image_features(self, rows: np.ndarray) -> tuple[Tensor, Tensor, np.ndarray]:
        """The encoded regions (q, R, d), Gram matrices (q, R, R) and codes (q, k/8) of this
        index's image ``rows``. The codes are the stored images' own (``image_codes``) where known,
        else (an index searched in Milvus, before ``image_codes`` was called) hashed from these
        features now in float32, so a query by a stored image searches with the code the index
        and the bench hold."""
        rows = np.asarray(rows, dtype=np.int64)
        sel = torch.from_numpy(rows).to(self.regions.device)
        regions, gram = self.regions.index_select(0, sel), self.gram.index_select(0, sel)
        if self._image_codes is not None:
            codes = self._image_codes[rows]
        else:
            with torch.no_grad():
                codes = self.hasher.module.image_codes(regions.float())
        return regions, gram, codes

    def image_rows(self, image_ids: list[int]) -> np.ndarray:
        """The row of each of ``image_ids`` in this index, -1 where it holds no such image (the ids
        sorted once, when first needed: ``Index.open`` needs them for the captions' images)."""
        if self._ids_sorted is None:
            self._ids_sorted = sorted_ids(self.image_ids)
        return rows_of(self._ids_sorted, image_ids)

    @torch.no_grad()
    def search_regions(
        self, regions: Tensor, gram: Tensor, k: int, candidates: int, codes: np.ndarray | None = None
    ) -> list[Hits]:
        """Captions of this index for each encoded image of ``regions`` (q, R, d) with its ``gram``
        (q, R, R), which may be stored elsewhere (e.g. in another shard), or a new image's
        (``encode_images``): Hamming top-``candidates`` over the caption codes, re-ranked, top
        ``k``; each image's hits (``Hits``, a list, with the candidates re-ranked as
        ``.candidates``). ``codes``: the images' codes where known (``image_features`` gives
        them), else hashed from ``regions``. ``regions`` and ``gram`` may be numpy arrays, as
        ``encode_images``' input may."""
        candidates, k = check_counts(candidates, k, [self.n_captions], "captions", sharded=False)
        regions, gram = _tensor_of(regions), _tensor_of(gram)
        self._check_encoded_images(regions, gram)
        if codes is not None:
            codes = self._query_codes(codes, len(regions), "image of regions")
        return self.rank_regions(regions, gram, k, candidates, codes)

    def _query_codes(self, codes, n: int, each: str) -> np.ndarray:
        """A search's ``codes`` argument as packed bits as wide as this index's, one row per query
        (``n``, ``each`` naming what a row codes); else ``SettingError``. A row short used to fail
        in ``top_k``, a row over was named image_index in the scorer."""
        try:
            codes = packed_codes("codes", codes, self.hasher.module.config.bits // 8)
        except ValueError as exc:
            raise SettingError("codes", str(exc)) from None
        if len(codes) != n:
            raise SettingError("codes", f"codes must hold one row per {each} ({n}), got {len(codes)}")
        return codes

    @torch.no_grad()
    def rank_regions(
        self, regions: Tensor, gram: Tensor, k: int, candidates: int, codes: np.ndarray | None = None
    ) -> list[Hits]:
        """``search_regions`` without its checks, for callers whose inputs are checked already
        (stored features, counts checked once per query batch, not once per batch and shard)."""
        found = self.candidates_for_images(regions, gram, candidates, codes)
        ranked = [top_k(found, k, q) for q in range(len(regions))]

        def hit(rank: int, row: int, score: float, dist: int) -> Hit:
            return Hit(rank, int(self.caption_ids[row]), score, dist, text=self.texts[row])

        return [_ranked_hits(r, hit) for r in ranked]

    @torch.no_grad()
    def encode_images(self, features: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """New images' raw region features ``(q, R, img_dim)``, as a store holds them, encoded by
        the matcher where this index runs: ``(regions, gram)`` for ``search_regions``, in float32
        whatever the index's dtype, so that a new image is hashed as the build hashed the stored
        ones (before any cast to bfloat16; ``search_regions`` casts them for scoring)."""
        features = _tensor_of(features)
        _check_image_tensor("features", features, (self.regions.shape[1], self.model.config.img_dim), "region features")
        regions = self.model.encode_images(features.to(self.regions.device, torch.float32))
        return regions, region_gram(regions)

    def _check_encoded_images(self, regions, gram) -> None:
        """``HeiindexError`` unless ``regions`` (q, R, d) and ``gram`` (q, R, R) are finite float
        tensors of this index's region count and embedding size."""
        r, d = self.regions.shape[1], self.regions.shape[2]
        hint = "encoded images (Index.encode_images gives them from raw features)"
        _check_image_tensor("regions", regions, (r, d), hint)
        _check_image_tensor("gram", gram, (r, r), hint)
        if len(regions) != len(gram):
            raise HeiindexError(f"regions and gram must hold the same images, got {len(regions)} and {len(gram)}")

    # -- batches of queries against this index (the sharded bench) ----------------------------
    @torch.no_grad()
    def candidates_for_captions(
        self, words: Tensor | PackedWords, lengths: Tensor, n: int, codes: np.ndarray | None = None
    ):
        """For each encoded caption (words (q, L, d) padded or packed, lengths (q,)): this index's Hamming
        top-``n`` images (at most all of them), re-ranked: ``heiindex.search.Candidates`` (rows -1
        and scores -inf where an approximate index found fewer). ``codes``: the captions' codes
        where already computed (else hashed here)."""
        n = min(n, self.n_images)
        dev = self.regions.device
        words, lengths = words.to(dev), lengths.to(dev)
        if codes is None:  # from the words as given: a cast to bfloat16 first could change a bit
            codes = self.hasher.module.caption_codes(words, lengths)  # in float32 a block at a time
        words = words.to(dtype=self.regions.dtype)
        return rerank_images(
            self.model, self.image_index, codes, words=words, lengths=lengths, regions=self.regions, gram=self.gram, n=n
        )

    @torch.no_grad()
    def candidates_for_images(self, regions: Tensor, gram: Tensor, n: int, codes: np.ndarray | None = None):
        """For each encoded image (regions (q, R, d), gram (q, R, R)): this index's Hamming
        top-``n`` captions (at most all of them), re-ranked; as ``candidates_for_captions``."""
        n = min(n, self.n_captions)
        regions, gram = regions.to(self.regions.device), gram.to(self.gram.device)
        if codes is None:  # from the regions as given: a cast to bfloat16 first could change a bit
            codes = self.hasher.module.image_codes(regions.float())
        regions = regions.to(self.regions.dtype)
        return rerank_captions(
            self.model,
            self.caption_index,
            codes,
            regions=regions,
            gram=gram,
            words=self.words,
            lengths=self.lengths,
            n=n,
        )

    def bench_meta(self) -> dict:
        """What the sharded bench needs to know of this index: its items, and ``how_searched``."""
        return {"image_ids": self.image_ids, "caption_image_ids": self.caption_image_ids, **self.how_searched()}

    def how_searched(self) -> dict:
        """What a bench reports of how this index searches: its code ``bits``; the ``index_type``
        its Hamming searches go through (the Milvus index type where the codes are on a Milvus
        server, else the FAISS type, ``searched_type``, or "flat" on a GPU, which searches every
        code whatever the build's type); ``search_breadth``; torch's ``threads``;
        the ``device`` and ``dtype`` it scores on."""
        from .milvus_codes import MilvusCodes  # pymilvus is imported only when a server is used

        if isinstance(self.image_index, MilvusCodes):
            index_type = f"milvus {self.manifest['codes']['index_type']}"
        elif self.image_index is not self._code_indexes[0]:  # moved to a GPU: an exact search of the same codes
            index_type = "flat"
        else:
            index_type = searched_type(self.manifest["index"])
        return {
            "bits": self.manifest["hash"]["bits"],
            "index_type": index_type,
            "search_breadth": self.search_breadth(),  # what the IVF / HNSW searches use ({}: exact)
            "threads": torch.get_num_threads(),
            "device": str(self.regions.device),
            "dtype": self.dtype,
        }

    # -- codes of what is stored (for the bench) -----------------------------------------------
    def image_codes(self) -> np.ndarray:
        """Codes of every stored image, (n_images, k/8) uint8: those the build wrote into
        ``images.faiss``, read when the index was opened (an index built on a GPU keeps them on a
        CPU, bit for bit). An index searched in Milvus, opened without reading its FAISS files,
        hashes its stored features once instead (``to`` does so before a cast to bfloat16 can
        round them), except where the build gave the images prototype codes
        (``heiindex.prototypes``): those are read from ``images.faiss``, as the features alone
        cannot give them."""
        if self._image_codes is None:
            self._image_codes = self.hash_images(self.regions)
        return self._image_codes

    def caption_codes(self) -> np.ndarray:
        """Codes of every stored caption, from ``captions.faiss`` (as ``image_codes``)."""
        if self._caption_codes is None:
            self._caption_codes = self.hash_captions(self.words)
        return self._caption_codes

    def hash_images(self, regions: Tensor) -> np.ndarray:
        """Codes of encoded images ``(n, R, d)`` (wherever they are), with this index's hash module."""
        module = self.hasher.module
        return self._hash_in_blocks(len(regions), lambda s, e, dev: module.image_codes(regions[s:e].to(dev).float()))

    def hash_captions(self, words: PackedWords) -> np.ndarray:
        """Codes of encoded captions (packed words, wherever they are), with this index's hash module."""
        module = self.hasher.module
        if words.device == next(module.parameters()).device:  # caption_codes takes 512 captions at a time itself
            return module.caption_codes(words, words.lengths)

        def block(s: int, e: int, dev: torch.device) -> np.ndarray:  # a block at a time to the module's device
            part = words.select(torch.arange(s, e, device=words.device)).to(dev)
            return module.caption_codes(part, part.lengths)

        return self._hash_in_blocks(len(words), block)

    @torch.no_grad()
    def _hash_in_blocks(self, n: int, codes_of) -> np.ndarray:
        """``codes_of(start, stop, device)`` for ``_HASH_BLOCK`` items at a time, on the hash
        module's device: wherever the features are, it holds at most a block of them in float32."""
        dev, block = next(self.hasher.module.parameters()).device, _HASH_BLOCK
        parts = [codes_of(s, min(s + block, n), dev) for s in range(0, n, block)]
        return np.concatenate(parts) if parts else np.zeros((0, self.hasher.module.config.bits // 8), np.uint8)


def described(index, bits: int, device: torch.device, dtype: str, shards: str = "") -> str:
    """An opened index (or sharded build, ``shards`` " in 3 shards") as its ``repr`` describes it
    after its folder: "split 'test', 1,000 images, 5,000 captions, 256-bit codes, cpu, float32"."""
    where = device.type if device.index is None else str(device)
    return (
        f"split {index.manifest.get('split')!r}, {counted(index.n_images, 'image')}, "
        f"{counted(index.n_captions, 'caption')}{shards}, {bits}-bit codes, {where}, {dtype}"
    )


# An opened index holds FAISS objects (SWIG, not picklable) and the models: a process that needs
# one (multiprocessing, joblib) opens it from its folder, as Ray's actors do.
_NOT_PICKLED = (
    "an opened {kind} cannot be pickled or copied (it holds FAISS indexes and the models): open it again where it "
    "is needed, {kind}.open({path!r})"
)

_HASH_BLOCK = 4096  # stored items hashed at a time (Index.image_codes / caption_codes)


def _tensor_of(x):
    """A numpy array as a tensor, anything else as given. A read-only array (np.load(...,
    mmap_mode="r"), as the README reads features) is copied: torch warns on sharing one, since a
    tensor over it could be written."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    return x


def _check_image_tensor(name: str, x, tail: tuple[int, int], what: str) -> None:
    """``HeiindexError`` naming ``name`` unless ``x`` is a finite floating-point tensor of shape
    (images, *tail), ``what`` saying what it should hold."""
    if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != tail:
        got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
        raise HeiindexError(f"{name} must be a tensor (images, {', '.join(map(str, tail))}): {what}, got {got}")
    if x.is_meta:  # torch's own error ("Tensor.item() cannot be called on meta tensors") named no argument
        raise HeiindexError(f"{name} is on the meta device, which holds shapes but no values: give it real numbers")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise HeiindexError(f"{name} must hold finite floating-point numbers (NaN or inf found, or not floats)")
