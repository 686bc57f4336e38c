"""The HEI index of one split: hash codes in FAISS binary indexes plus what re-ranking needs.

``Index.build`` encodes a stored split with the matcher, writes the projected region features
and their Gram matrices (images) and the word features (captions) to Parquet, hashes both
modalities and writes a FAISS binary index for each. ``Index.open(path).search("a dog")``
codes the query, takes the top-N images by Hamming distance and re-ranks them with the
matcher; ``search_image`` does the same from an image to captions, and ``search_many`` /
``search_images`` do either for many queries, a batch at a time (``heiindex.search.BatchSearch``).

Folder layout::

    manifest.json            format, split, counts, checksums of store, matcher and hash module
    images.faiss             binary index of image codes (ids = image rows)
    captions.faiss           binary index of caption codes (ids = caption rows)
    image_features.parquet   image_id, features (projected regions, R*d float32), gram (R*R float32)
    caption_features.parquet caption_id, image_id, text, tokens, words (len*d float32)

What this module must not do: train, or compute metrics (``heiindex.bench``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from . import __version__
from .attention import region_gram
from .checkpoint import LoadedModel, load_model
from .device import check_precision, resolve_device, set_precision
from .encode import iter_caption_blocks
from .errors import DataError, HeiindexError, ModelMismatchError, UnusedSettingWarning
from .hamming import (
    AUTO_FLAT_MAX,
    check_index_options,
    index_on_device,
    load_binary_index,
    make_binary_index,
    resolve_index_kind,
    save_binary_index,
    search_breadth,
    set_search_breadth,
    stored_codes,
)
from .hash_folder import LoadedHash, check_trained_next_to, hash_checksum, load_hash
from .hashing import HashModule
from .index_manifest import (
    INDEX_FILES,
    INDEX_FORMAT_VERSION,
    check_index_manifest,
    read_index_manifest,
    refuse_shard_folder,
    searched_type,
)
from .manifests import MANIFEST_FILE, check_fields, file_record, read_unswapped, recorded_file, write_json
from .milvus_codes import (  # pymilvus: lazily
    MILVUS_INDEX_TYPES,
    check_server,
    collection_names,
    replaced_collections,
    upload_codes,
)
from .model import ScanModel
from .outputs import atomic_dir
from .packed import PackedWords, word_mask
from .plot import SWEEP_PLOT
from .progress import progress_bar
from .prototypes import CaptionBank, PendingImages, PrototypeConfig, caption_bank, check_describing_split
from .search import (
    BatchSearch,
    EncodedQueries,
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
from .settings import SettingError, require, require_breadth, require_name, require_path
from .store import (
    CaptionTable,
    ImageWriter,
    SplitStore,
    check_caption_columns,
    check_caption_image_ids,
    check_column_finite,
    check_distinct,
    fixed_list_values,
    open_parquet,
    read_guarded,
    reading,
    rows_of,
    sorted_ids,
)

__all__ = ["Hit", "Index", "SearchResult", "check_codes_options", "timed_results"]


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


@dataclass
class SearchResult:
    query: str | int
    results: list[Hit]
    unknown_words: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "unknown_words": self.unknown_words,
            "results": [h.to_dict() for h in self.results],
        }


def check_codes_options(codes: str, uri: str | None, milvus_index: str = "BIN_FLAT") -> None:
    """Where a build writes its codes: "faiss" (the index's files only), or "milvus" with the
    server ``uri`` (a URI without Milvus codes would be ignored, so it is refused) and the
    Milvus index type ``milvus_index`` (checked here, before any encoding)."""
    if codes not in ("faiss", "milvus") or (codes == "milvus" and not uri):
        raise SettingError(
            "codes", f"codes must be 'faiss', or 'milvus' with a server URI (`uri`), got {codes!r}", also=("uri",)
        )
    if codes == "faiss" and uri is not None:
        raise HeiindexError(
            "uri names the Milvus server of `codes` milvus; without it the codes go to FAISS files",
            settings=("uri", "codes"),
        )
    if milvus_index not in MILVUS_INDEX_TYPES:  # it was refused only after the whole encoding
        raise SettingError("milvus_index", f"milvus_index must be one of {MILVUS_INDEX_TYPES}, got {milvus_index!r}")


def timed_results(queries: list, hits: list[list[Hit]], unknown: list[list[str]] | None, t0: float):
    """One batch's ``SearchResult``s (text queries with their unknown words, or image ids), each
    with the batch's time since ``t0`` shared equally."""
    seconds = (time.perf_counter() - t0) / max(1, len(queries))
    for q, (query, found) in enumerate(zip(queries, hits, strict=True)):
        yield SearchResult(query, found, [] if unknown is None else unknown[q], seconds)


def load_bound_models(
    matcher: LoadedModel | str | Path, hasher: LoadedHash | str | Path
) -> tuple[LoadedModel, LoadedHash]:
    """For a build: the matcher and the hash module trained next to it, loaded where given as
    folders (a hash module of another matcher is refused)."""
    matcher = matcher if isinstance(matcher, LoadedModel) else load_model(matcher)
    if not isinstance(hasher, LoadedHash):
        hasher = load_hash(hasher, matcher)
    else:
        check_trained_next_to(hasher.info, hasher.path, matcher)
    return matcher, hasher


def load_models(
    manifest: dict,
    matcher: LoadedModel | str | Path | None,
    hasher: LoadedHash | str | Path | None,
    mpath: Path | None = None,
) -> tuple[LoadedModel, LoadedHash]:
    """The matcher and hash module given (loaded from a folder if given as one), else the ones
    the manifest of a build (at ``mpath``) names: a ``DataError`` naming the manifest where such
    a folder is not there (an index copied to another machine, a model moved), both at once
    where both are missing (they were named one command at a time)."""
    wanted = {"matcher": (matcher, "matcher"), "hash": (hasher, "hasher")}
    missing = [
        (key, manifest[key]["path"], setting)
        for key, (given, setting) in wanted.items()
        if not given and mpath is not None and not Path(manifest[key]["path"]).exists()
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
        matcher = load_model(matcher or manifest["matcher"]["path"])
    if not isinstance(hasher, LoadedHash):
        hasher = load_hash(hasher or manifest["hash"]["path"])
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
            code_indexes = tuple(_load_code_file(path, what, manifest, counts[what], bits) for what in counts)
        if len(code_indexes) != 2:
            raise ValueError(f"code_indexes must be (images, captions), got {len(code_indexes)} items")
        # as opened (FAISS, on the CPU, or Milvus): ``to`` derives each device's searched indexes from them
        self._code_indexes = tuple(code_indexes)
        self.image_index, self.caption_index = code_indexes
        # The stored items' codes as the build wrote them, whichever device hashed them: the
        # bench's queries and a query by a stored image search with the codes the index holds
        # (each file checked by _load_code_file). An index searched elsewhere (Milvus) hashes its
        # features instead, except prototype image codes, which the features cannot give: those
        # are read from images.faiss all the same.
        stored = {"images": self.image_index, "captions": self.caption_index} if faiss_files else {}
        if not faiss_files and "prototypes" in manifest:
            stored["images"] = _load_code_file(path, "images", manifest, counts["images"], bits)
        self._image_codes: np.ndarray | None = stored_codes(stored["images"]) if "images" in stored else None
        self._caption_codes: np.ndarray | None = stored_codes(stored["captions"]) if "captions" in stored else None
        opened = {}  # each file's footer read once, for the checks here and for the reads below
        for name, file in (("images", "image_features.parquet"), ("captions", "caption_features.parquet")):
            if not (path / file).is_file():  # before either is read
                raise DataError(path / file, "missing: this index is incomplete (build it again)")
            record = recorded_file(path / MANIFEST_FILE, manifest, file)  # None: a manifest that records no files
            pf = opened[name] = open_parquet(path / file, _INDEX_COLUMNS[name], pre_buffer=False, record=record)
            if pf.metadata.num_rows != counts[name]:  # from the footer: before any feature is read
                raise DataError(path / file, f"holds {pf.metadata.num_rows} {name}; manifest.json says {counts[name]}")
        r, d = manifest["regions"], manifest["embed_size"]
        if d != matcher.model.config.embed_size:  # else named as a features file too short for its rows
            raise DataError(
                path / MANIFEST_FILE,
                f'field "embed_size" is {d}, but the matcher it records embeds in {matcher.model.config.embed_size}',
            )
        # Features are copied a row group at a time into the tensors kept, never held whole as
        # Arrow columns beside them.
        ids, regions, gram = _read_images(path / "image_features.parquet", r, d, opened["images"])
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
        self.words = _packed_words(captions, lengths, d, opened["captions"])
        pa.default_memory_pool().release_unused()  # Arrow's pool keeps what the reads used (137 MB at coco-sim test)
        check_distinct(path / "image_features.parquet", self.image_ids, "image_id")
        check_distinct(captions, self.caption_ids, "caption_id")
        check_caption_image_ids(captions, self.caption_image_ids, self.image_ids, "image_features.parquet")
        self.caption_image = self.image_rows(self.caption_image_ids)  # every one found: checked above
        by_image = np.argsort(self.caption_image, kind="stable")  # caption rows grouped by image, in order
        ends = np.cumsum(np.bincount(self.caption_image, minlength=len(self.image_ids)))
        self.image_captions: list[list[int]] = [part.tolist() for part in np.split(by_image, ends[:-1])]

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

    @staticmethod
    def write(
        store_root: str | Path,
        split: str,
        matcher: LoadedModel | str | Path,
        hasher: LoadedHash | str | Path,
        out: str | Path,
        index_type: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        block_images: int = 256,
        block_captions: int = 1024,
        progress: bool = False,
        device: str = "cpu",
        image_rows: tuple[int, int] | None = None,
        codes: str = "faiss",
        uri: str | None = None,
        milvus_index: str = "BIN_FLAT",
        captions: CaptionTable | None = None,
        prototypes: PrototypeConfig | CaptionBank | None = None,
        describe_images_block: int = 2048,
    ) -> dict:
        """Encode, hash and index ``store_root/split`` into ``out`` (written atomically); returns
        the manifest written.
        Images and captions are encoded, hashed and written a block at a time (``block_images``,
        ``block_captions``): memory holds one block of features plus the codes.
        ``device`` is where the encoding and hashing run. ``image_rows = (a, b)`` indexes only the
        store's images a..b-1 and their captions (one shard of a sharded build). ``codes="milvus"``
        also writes the codes to the Milvus server at ``uri`` (``heiindex.milvus_codes``); the
        FAISS files are written either way. ``captions``: the split's captions already read
        (``SplitStore.captions``), so that the shards of one build read them once.
        ``prototypes``: give the images prototype codes made from another split's captions
        (``heiindex.prototypes``; a ``CaptionBank`` already made, so that shards make it once);
        images are then described ``describe_images_block`` at a time, each block one more
        encoding pass over that split's captions."""
        check_codes_options(codes, uri, milvus_index)
        if codes == "milvus":  # a server that is down: said before the encoding, not after it
            check_server(uri)
        nlist, nprobe = check_index_options(index_type, nlist, nprobe)  # before any encoding
        block_images = require("block_images", block_images, at_least=1, integer=True)
        block_captions = require("block_captions", block_captions, at_least=1, integer=True)
        if image_rows is not None:
            if len(image_rows) != 2:
                raise HeiindexError(f"image_rows must be (first, stop), got {image_rows!r}")
            image_rows = tuple(require("image_rows", v, at_least=0, integer=True) for v in image_rows)
        describe_images_block = require("describe_images_block", describe_images_block, at_least=1, integer=True)
        store_root, out = require_path("store_root", store_root), require_path("out", out)
        split = require_name("split", split)
        if prototypes is not None:
            check_describing_split(prototypes, split)
        matcher, hasher = load_bound_models(matcher, hasher)
        store = SplitStore.open(store_root, split)
        matcher.check_store(store)
        if prototypes is not None:  # by folder, before the describing captions are read
            check_describing_split(prototypes, split, store)
        if captions is not None and captions.source != store.manifest["captions"]["sha256"]:
            raise HeiindexError(
                f"the captions given ({len(captions)}) are not all the captions of store {store.path} "
                f"({store.n_captions}; their checksum differs); pass SplitStore.captions() of that store"
            )
        dev = models_on(matcher, hasher, device)
        model = matcher.model
        d, r = model.config.embed_size, store.regions
        first, stop = (0, store.n_images) if image_rows is None else image_rows
        if not first < stop:
            raise HeiindexError(f"image rows {first}..{stop} hold no image (give first < stop)")
        if stop > store.n_images:
            raise HeiindexError(f"image rows {first}..{stop} outside the store's 0..{store.n_images}")
        captions = store.captions() if captions is None else captions
        if image_rows is None:  # all before any encoding
            refuse_shard_folder(out)  # a shard is written by write_shards, inside its build's scratch
            store.check_ids(captions)
            counts = {"images": stop, "captions": len(captions)}
            check_lists_filled(index_type, nlist, nprobe, counts, None)
            warn_unused_lists(index_type, nlist, nprobe, counts.values())
        else:  # a shard's captions and lists: checked, and said once for all shards, by write_shards
            counts = shard_counts(captions, store.image_id_column(), first, stop)
            check_lists_filled(index_type, nlist, nprobe, counts, (first, stop))
        if isinstance(prototypes, PrototypeConfig):  # before anything is written
            prototypes = caption_bank(store_root, prototypes, matcher, hasher, block_captions, progress)
        with replaced_collections(out) as uploaded, atomic_dir(out, *INDEX_OUTPUT) as tmp, torch.no_grad():
            writer = ImageWriter(tmp / "image_features.parquet", r, d, extra={"gram": pa.list_(pa.float32(), r * r)})
            code_blocks = []
            pending = (
                None
                if prototypes is None
                else PendingImages(prototypes, matcher, hasher, describe_images_block, code_blocks, progress)
            )
            bar = progress_bar(stop - first, f"encode {split} images", progress, unit="img")
            kept_ids = []
            for ids, feats in store.iter_image_blocks(block_images, first, stop):  # a shard reads its rows only
                kept_ids.append(ids)
                regions = model.encode_images(torch.from_numpy(feats).to(dev))
                gram = region_gram(regions)
                writer.write(ids, regions.cpu().numpy(), gram=gram.cpu().numpy())
                if pending is None:
                    code_blocks.append(hasher.module.image_codes(regions))
                else:  # described a few blocks at a time, in order
                    pending.add(regions, gram)
                bar.update(len(ids))
            bar.close()
            if pending is not None:
                pending.flush()
            writer.close()
            img_codes = np.concatenate(code_blocks)
            if image_rows is not None:  # a shard's captions: those of its images
                captions = captions.subset(np.isin(captions.image_ids, np.concatenate(kept_ids)))
            cap_codes = _write_caption_features(
                tmp / "caption_features.parquet", model, hasher.module, captions, block_captions
            )
            where = split if image_rows is None else f"{split} (image rows {first} to {stop - 1})"
            for item_codes, what in ((img_codes, "images"), (cap_codes, "captions")):
                made = make_binary_index(item_codes, index_type, nlist, nprobe, name=f"{what} of {where}")
                save_binary_index(made, tmp / f"{what}.faiss")
            manifest = {
                "format_version": INDEX_FORMAT_VERSION,
                "created_by": f"heiindex {__version__}",
                "split": split,
                "store": {"path": str(store.path.resolve()), "checksum": store.checksum},
                "matcher": {"path": str(matcher.path.resolve()), "sha256": matcher.checksum},
                "hash": {
                    "path": str(hasher.path.resolve()),
                    "sha256": hash_checksum(hasher.module),
                    "bits": hasher.module.config.bits,
                },
                "index": {
                    "type": index_type,
                    "nlist": nlist,
                    "nprobe": nprobe,
                    "images": resolve_index_kind(index_type, len(img_codes), nlist, nprobe),
                    "captions": resolve_index_kind(index_type, len(cap_codes), nlist, nprobe),
                },
                "n_images": int(stop - first),
                "n_captions": int(len(captions)),
                "regions": r,
                "embed_size": d,
            }
            if prototypes is not None:  # absent: each image's own code
                manifest["prototypes"] = prototypes.manifest_entry()
            if image_rows is not None:
                manifest["store_rows"] = [int(first), int(stop)]
            manifest["files"] = {name: file_record(tmp / name) for name in INDEX_FILES}  # heiindex verify
            if codes == "milvus":
                unique = os.urandom(8).hex()  # a rebuild of the same index must not write the collections it searches
                key = [str(out.resolve()), manifest, unique]
                names = collection_names(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest())
                check_server(uri)  # a server that is down: an error, and no collections to drop
                uploaded.append((uri, names))  # dropped again if the build fails from here on
                upload_codes(uri, names, {"images": img_codes, "captions": cap_codes}, milvus_index)
                manifest["codes"] = {"store": "milvus", "uri": uri, "collections": names, "index_type": milvus_index}
            write_json(tmp / "manifest.json", manifest)
        return manifest

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

        A rebuild may swap the folder while it is read (``read_unswapped``): the open is tried
        again, up to three times, where the manifest changed meanwhile."""
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
        for part, loaded, held in (
            ("matcher", matcher, matcher.checksum),
            ("hash module", hasher, hash_checksum(hasher.module)),
        ):
            recorded = manifest["matcher" if part == "matcher" else "hash"]
            if held != recorded["sha256"]:
                # the folder the build recorded, trained again since: say so (no way out was named)
                rewritten = Path(recorded["path"]).resolve() == Path(loaded.path).resolve()
                raise ModelMismatchError(
                    f"index {path} was built with {part} {recorded['sha256'][:12]} ({recorded['path']}), not with "
                    f"{held[:12]} ({loaded.path})"
                    + ("; that folder was written again after the build" if rewritten else "")
                    + f": rebuild the index with this {part}, or give the {part} it was built with"
                )
        built = manifest.get("codes", {"store": "faiss"})
        check_fields(mpath, {"codes": built}, {"codes.store": str})
        if built["store"] == "milvus":
            check_fields(
                mpath,
                manifest,
                {f"codes.{f}": str for f in ("uri", "index_type", "collections.images", "collections.captions")},
            )
        source = codes or built["store"]
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
            code_indexes = tuple(
                MilvusCodes(server, built["collections"][m], built["index_type"]) for m in ("images", "captions")
            )
        return cls(path, manifest, matcher, hasher, code_indexes).to(device, dtype)

    def set_search_breadth(self, nprobe: int | None = None, ef_search: int | None = None) -> Index:
        """Search an approximate index more (or less) widely from now on, without a rebuild:
        ``nprobe`` IVF lists probed per query (at most the index's lists; FAISS or a Milvus
        ``BIN_IVF_FLAT`` collection), ``ef_search`` HNSW's search breadth (the build sets 128). None
        keeps the build's. A setting neither index has a use for (flat indexes; any index on a
        GPU, searched exactly) is said in an ``UnusedSettingWarning``. ``search_breadth`` tells
        what each index uses."""
        if nprobe is not None or ef_search is not None:
            set_search_breadth(self.hamming_indexes(named=True), nprobe, ef_search, stacklevel=3)
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
    ) -> list[list[Hit]]:
        """``search`` for captions already encoded (``heiindex.search.encode_queries``), and
        hashed where ``codes`` are given: each query's hits."""
        ranked = images_for_text(
            self.model, self.hasher.module, self.image_index, self.regions, self.gram, queries, k, candidates, codes
        )
        return [
            [
                Hit(
                    rank + 1,
                    int(self.image_ids[row]),
                    float(score),
                    int(dist),
                    captions=[self.texts[c] for c in self.image_captions[row]],
                )
                for rank, (row, score, dist) in enumerate(zip(r.rows, r.scores, r.hamming, strict=True))
            ]
            for r in ranked
        ]

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
    ) -> list[list[Hit]]:
        """Captions of this index for each encoded image of ``regions`` (q, R, d) with its ``gram``
        (q, R, R), which may be stored elsewhere (e.g. in another shard), or a new image's
        (``encode_images``): Hamming top-``candidates`` over the caption codes, re-ranked, top
        ``k``; each image's hits. ``codes``: the images' codes where known (``image_features``
        gives them), else hashed from ``regions``."""
        candidates, k = check_counts(candidates, k, [self.n_captions], "captions", sharded=False)
        self._check_encoded_images(regions, gram)
        return self.rank_regions(regions, gram, k, candidates, codes)

    @torch.no_grad()
    def rank_regions(
        self, regions: Tensor, gram: Tensor, k: int, candidates: int, codes: np.ndarray | None = None
    ) -> list[list[Hit]]:
        """``search_regions`` without its checks, for callers whose inputs are checked already
        (stored features, counts checked once per query batch, not once per batch and shard)."""
        found = self.candidates_for_images(regions, gram, candidates, codes)
        ranked = [top_k(found, k, q) for q in range(len(regions))]
        return [
            [
                Hit(rank + 1, int(self.caption_ids[c]), float(score), int(dist), text=self.texts[c])
                for rank, (c, score, dist) in enumerate(zip(r.rows, r.scores, r.hamming, strict=True))
            ]
            for r in ranked
        ]

    @torch.no_grad()
    def encode_images(self, features: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """New images' raw region features ``(q, R, img_dim)``, as a store holds them, encoded by
        the matcher where this index runs: ``(regions, gram)`` for ``search_regions``, in float32
        whatever the index's dtype, so that a new image is hashed as the build hashed the stored
        ones (before any cast to bfloat16; ``search_regions`` casts them for scoring)."""
        if isinstance(features, np.ndarray):
            # A read-only array (np.load(..., mmap_mode="r"), as the README reads features) is
            # copied: torch warns on sharing one, since a tensor over it could be written.
            features = torch.from_numpy(features if features.flags.writeable else features.copy())
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


# What an index folder holds, unsharded or sharded (so that either can be rebuilt over the other),
# with the sweep plot ``heiindex bench`` writes beside it by default.
INDEX_OUTPUT = ("an index", ("manifest.json", *INDEX_FILES, "shard-[0-9]*", SWEEP_PLOT))
_HASH_BLOCK = 4096  # stored items hashed at a time (Index.image_codes / caption_codes)
_MAX_LIST_VALUES = 2**31 - 1  # the most items one Parquet list column of a table holds (int32 offsets)
_CAPTION_SCHEMA = pa.schema(
    [
        ("caption_id", pa.int64()),
        ("image_id", pa.int64()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("words", pa.list_(pa.float32())),
    ]
)


def models_on(matcher: LoadedModel, hasher: LoadedHash, device: str) -> torch.device:
    """Move a build's matcher (in eval mode) and hash module to ``device``; on a GPU, matrix
    products in exact float32, so that codes and stored features are those of float32 encoding."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        set_precision("float32")
    matcher.model.eval().to(dev)
    hasher.module.to(dev)
    return dev


def _load_code_file(folder: Path, what: str, manifest: dict, count: int, bits: int):
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


def check_lists_filled(
    index_type: str, nlist: int | None, nprobe: int | None, counts: dict[str, int], rows: tuple[int, int] | None
) -> None:
    """IVF needs a code per list: refuse an ``nlist`` above the ``counts`` of items to index
    (``{"images": n, ...}``), before any encoding; ``rows``: the store's image rows of a shard."""
    for what, n in counts.items():
        chosen = resolve_index_kind(index_type, n, nlist, nprobe)
        if chosen["type"] != "ivf" or chosen["nlist"] <= n:
            continue
        shard = "" if rows is None else f" in its shard (image rows {rows[0]} to {rows[1] - 1}"
        if n == 0:  # whatever nlist is (or none was given): an IVF index needs a code per list
            raise SettingError(
                "index_type",
                f"no {what} to index{shard and shard + ')'}: an IVF index needs some (`index_type` flat, or fewer "
                "shards)",
            )
        where = shard and shard + "; `nlist` applies to each shard)"
        raise SettingError("nlist", f"nlist {chosen['nlist']} exceeds the {n} {what} to index{where}")


def warn_unused_lists(index_type: str, nlist: int | None, nprobe: int | None, counts: Iterable[int]) -> None:
    """``UnusedSettingWarning`` where ``nlist`` / ``nprobe`` were given to ``index_type`` auto and
    none of its indexes (``counts``: the items of each) is large enough to be IVF: they were
    recorded and built into nothing, without a word."""
    given = [f"`{name}` {value}" for name, value in (("nlist", nlist), ("nprobe", nprobe)) if value is not None]
    if not given or any(resolve_index_kind(index_type, n, nlist, nprobe)["type"] == "ivf" for n in counts):
        return
    warnings.warn(
        UnusedSettingWarning(
            f"{' and '.join(given)} not used: `index_type` auto built flat indexes (exact; it builds IVF above "
            f"{AUTO_FLAT_MAX:,} codes); `index_type` ivf builds IVF indexes at any size",
            settings=("nlist", "nprobe", "index_type"),
        ),
        stacklevel=2,
    )


def _check_image_tensor(name: str, x, tail: tuple[int, int], what: str) -> None:
    """``HeiindexError`` naming ``name`` unless ``x`` is a finite floating-point tensor of shape
    (images, *tail), ``what`` saying what it should hold."""
    if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != tail:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise HeiindexError(f"{name} must be a tensor (images, {', '.join(map(str, tail))}): {what}, got {shape}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise HeiindexError(f"{name} must hold finite floating-point numbers (NaN or inf found, or not floats)")


def shard_counts(captions: CaptionTable, image_ids: np.ndarray, first: int, stop: int) -> dict[str, int]:
    """What a shard of the store's image rows ``first``..``stop - 1`` indexes: its images, and the
    ``captions`` of the split that describe them (``image_ids``: the store's, in row order)."""
    return {"images": stop - first, "captions": captions.count_of(image_ids[first:stop])}


def _write_caption_features(
    path: Path, model: ScanModel, hasher: HashModule, caps: CaptionTable, block: int
) -> np.ndarray:
    """Encode and hash ``caps`` ``block`` captions at a time, appending each block's real words
    (flattened, ``len * d`` floats a caption) to ``path``; returns the packed codes."""
    codes = [np.zeros((0, hasher.config.bits // 8), dtype=np.uint8)]
    with pq.ParquetWriter(path, _CAPTION_SCHEMA, compression="zstd", write_page_checksum=True) as writer:
        for s, words, lens_t in iter_caption_blocks(model, caps.tokens, caps.lengths, block):
            lens = caps.lengths[s : s + block]
            tokens = caps.tokens[s : s + block, : words.shape[1]]
            codes.append(hasher.caption_codes(words, lens_t))
            words, real = words.cpu().numpy(), word_mask(lens_t, words.shape[1]).cpu().numpy()
            # A list column's offsets are int32: a table holds under 2^31 floats of words.
            step = max(1, _MAX_LIST_VALUES // (words.shape[1] * words.shape[2]))
            for a in range(0, len(lens), step):
                b, rows = min(a + step, len(lens)), slice(s + a, s + min(a + step, len(lens)))
                columns = {
                    "caption_id": pa.array(caps.caption_ids[rows], type=pa.int64()),
                    "image_id": pa.array(caps.image_ids[rows], type=pa.int64()),
                    "text": pa.array(caps.texts[rows], type=pa.string()),
                    "tokens": _lists(np.asarray(tokens[a:b][real[a:b]], np.int32), lens[a:b]),
                    "words": _lists(words[a:b][real[a:b]].reshape(-1), lens[a:b] * words.shape[2]),
                }
                writer.write_table(pa.table(columns, schema=_CAPTION_SCHEMA))
    return np.concatenate(codes)


def _lists(values: np.ndarray, sizes: np.ndarray) -> pa.ListArray:
    """A list array of consecutive runs of ``values`` (run ``i`` has ``sizes[i]`` items)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values))


_INDEX_COLUMNS = {
    "images": ["image_id", "features", "gram"],
    "captions": ["caption_id", "image_id", "text", "tokens", "words"],
}


def _row_groups(path: Path, columns: list[str], pf: pq.ParquetFile | None = None):
    """``(rows, tables)``: the file's row count and its row groups of ``columns``, read one at a
    time (no pre-buffering: a row group read is released when the next is read). A column the
    file lacks is a ``DataError``. ``pf``: the file already opened (with ``pre_buffer=False``)."""
    pf = pf or open_parquet(path, columns, pre_buffer=False)
    tables = (pf.read_row_group(i, columns=columns) for i in range(pf.num_row_groups))
    return pf.metadata.num_rows, read_guarded(tables, path)


def _read_images(
    path: Path, r: int, d: int, pf: pq.ParquetFile | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image_id`` (n,), ``features`` (n, r, d) and ``gram`` (n, r, r) of an index's images file,
    read in one pass, a row group at a time, into the arrays returned."""
    n, tables = _row_groups(path, _INDEX_COLUMNS["images"], pf)
    ids, out = [], {"features": np.empty((n, r, d), np.float32), "gram": np.empty((n, r, r), np.float32)}
    pos = 0
    for table in tables:
        if table.column("image_id").null_count:
            raise DataError(path, 'column "image_id" has empty (null) ids')
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


def _packed_words(path: Path, lengths: np.ndarray, d: int, pf: pq.ParquetFile | None = None) -> PackedWords:
    """The words column of ``path`` (``len * d`` floats per caption, ``len`` its token count)
    copied a row group at a time into the packed words' own tensor (zero row included)."""
    rows = torch.zeros((int(lengths.sum()) + 1, d))
    out, caption, pos = rows.numpy(), 0, 0
    for table in _row_groups(path, ["words"], pf)[1]:
        for chunk in table.column("words").chunks:
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
