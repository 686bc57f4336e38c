"""Writing the index folder of one split, or of one shard of it.

``write_index`` encodes a stored split with the matcher a block at a time, writes the projected
region features and their Gram matrices (``image_features.parquet``) and the words
(``caption_features.parquet``), hashes both modalities and writes a FAISS binary index of each,
then the manifest that ties them to the store, matcher and hash module: all into a scratch
folder that replaces ``out`` only once complete (``heiindex.outputs.atomic_dir``).
``heiindex.index.Index.write`` is this function; ``Index.build`` writes and opens.

What this module must not do: open or search an index (``heiindex.index``), or shard a build
(``heiindex.shards``, which calls it, as ``Index.write``, once per shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from . import __version__
from .attention import region_gram
from .checkpoint import LoadedModel, load_model
from .device import resolve_device, set_precision
from .encode import iter_caption_blocks
from .errors import DataError, HeiindexError, UnusedSettingWarning, name_some
from .hamming import AUTO_FLAT_MAX, check_index_options, make_binary_index, resolve_index_kind, save_binary_index
from .hash_folder import LoadedHash, check_trained_next_to, hash_checksum, load_hash
from .hashing import HashModule
from .index_manifest import INDEX_FILES, INDEX_FORMAT_VERSION, refuse_shard_folder
from .manifests import file_record, write_json
from .milvus_codes import MILVUS_INDEX_TYPES, check_server, collection_names, replaced_collections, upload_codes
from .model import ScanModel
from .outputs import atomic_dir
from .packed import word_mask
from .plot import SWEEP_PLOT
from .progress import progress_bar
from .prototypes import CaptionBank, PendingImages, PrototypeConfig, caption_bank, check_describing_split
from .settings import SettingError, require, require_name, require_path
from .store import CaptionTable, ImageWriter, SplitStore

__all__ = [
    "INDEX_OUTPUT",
    "check_codes_options",
    "check_lists_filled",
    "load_bound_models",
    "models_on",
    "shard_counts",
    "warn_nprobe_lowered",
    "warn_unused_lists",
    "write_caption_features",
    "write_index",
]


# What an index folder holds, unsharded or sharded (so that either can be rebuilt over the other),
# with the sweep plot ``heiindex bench`` writes beside it by default.
INDEX_OUTPUT = ("an index", ("manifest.json", *INDEX_FILES, "shard-[0-9]*", SWEEP_PLOT))


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


def check_codes_options(codes: str, uri: str | None, milvus_index: str | None = None) -> str | None:
    """Where a build writes its codes: "faiss" (the index's files only), or "milvus" with the
    server ``uri`` and the Milvus index type ``milvus_index`` (None: BIN_FLAT), checked here,
    before any encoding. A URI or an index type without Milvus codes would be ignored, so either
    is refused. Returns the Milvus index type (None for FAISS codes)."""
    if codes not in ("faiss", "milvus") or (codes == "milvus" and not uri):
        raise SettingError(
            "codes", f"codes must be 'faiss', or 'milvus' with a server URI (`uri`), got {codes!r}", also=("uri",)
        )
    if codes == "faiss" and uri is not None:
        raise HeiindexError(
            "uri names the Milvus server of `codes` milvus; without it the codes go to FAISS files",
            settings=("uri", "codes"),
        )
    if codes == "faiss":
        if milvus_index is not None:
            raise HeiindexError(
                f"milvus_index {milvus_index!r} sets the index type of `codes` milvus; the codes go to FAISS files",
                settings=("milvus_index", "codes"),
            )
        return None
    milvus_index = MILVUS_INDEX_TYPES[0] if milvus_index is None else milvus_index
    if milvus_index not in MILVUS_INDEX_TYPES:  # it was refused only after the whole encoding
        raise SettingError("milvus_index", f"milvus_index must be one of {MILVUS_INDEX_TYPES}, got {milvus_index!r}")
    return milvus_index


def load_bound_models(
    matcher: LoadedModel | str | Path, hasher: LoadedHash | str | Path
) -> tuple[LoadedModel, LoadedHash]:
    """For a build: the matcher and the hash module trained next to it, loaded where given as
    folders (a hash module of another matcher is refused)."""
    matcher = matcher if isinstance(matcher, LoadedModel) else load_model(require_path("matcher", matcher))
    if not isinstance(hasher, LoadedHash):
        hasher = load_hash(require_path("hasher", hasher), matcher)
    else:
        check_trained_next_to(hasher.info, hasher.path, matcher)
    return matcher, hasher


def models_on(matcher: LoadedModel, hasher: LoadedHash, device: str) -> torch.device:
    """Move a build's matcher (in eval mode) and hash module to ``device``; on a GPU, matrix
    products in exact float32, so that codes and stored features are those of float32 encoding."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        set_precision("float32")
    matcher.model.eval().to(dev)
    hasher.module.to(dev)
    return dev


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


def warn_nprobe_lowered(index_type: str, nlist: int | None, nprobe: int | None, counts: list[dict[str, int]]) -> None:
    """``UnusedSettingWarning``, once per modality and before any encoding, where an ``nprobe``
    given exceeds the lists of IVF indexes whose ``nlist`` was left to its default (``counts``:
    each index's items, ``{"images": n, "captions": m}``, one dict per shard): each such index
    probes all its lists and records that, where a query's ``nprobe`` above them is refused (a
    build given both, ``nprobe`` above ``nlist``, is refused by ``check_index_options``)."""
    if nprobe is None or nlist is not None:
        return
    for what in ("images", "captions"):
        chosen = [resolve_index_kind(index_type, c[what], None, None) for c in counts]
        fewer = [c["nlist"] for c in chosen if c["type"] == "ivf" and c["nlist"] < nprobe]  # lists of each such index
        if not fewer:
            continue
        span = f"{min(fewer)}" if min(fewer) == max(fewer) else f"{min(fewer)} to {max(fewer)}"
        if len(counts) == 1:
            whose = f"the IVF index of the {counts[0][what]:,} {what}: it probes all its lists"
        else:
            shards = "each shard" if len(fewer) == len(chosen) else "some shards"
            whose = f"the IVF indexes of the {what} of {shards}: each probes all its lists"
        warnings.warn(
            UnusedSettingWarning(
                f"`nprobe` {nprobe} exceeds the {span} lists (`nlist` left to its default) of {whose}, so every "
                "code is searched (a query's `nprobe` above them is refused)",
                settings=("nprobe", "nlist"),
            ),
            stacklevel=2,
        )


def shard_counts(captions: CaptionTable, image_ids: np.ndarray, first: int, stop: int) -> dict[str, int]:
    """What a shard of the store's image rows ``first``..``stop - 1`` indexes: its images, and the
    ``captions`` of the split that describe them (``image_ids``: the store's, in row order)."""
    return {"images": stop - first, "captions": captions.count_of(image_ids[first:stop])}


def check_encoded_finite(path: Path, ids: np.ndarray, regions: Tensor, gram: Tensor) -> None:
    """``DataError`` naming the store's images file and the images of this block (the first five,
    then how many more) whose finite features the matcher encodes to NaN or inf (values near
    float32's largest overflow): such a build exited 0 and replaced a good index with one every
    query then refused."""
    bad = ~(torch.isfinite(regions).flatten(1).all(1) & torch.isfinite(gram).flatten(1).all(1))
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().cpu().numpy()
        raise DataError(
            path,
            f"image_id {name_some([str(int(ids[r])) for r in rows])}: the matcher encodes its features to NaN or "
            "infinite values (features too large for float32 arithmetic?); nothing was written",
        )


def write_caption_features(
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


def write_index(
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
    milvus_index: str | None = None,
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
    also writes the codes to the Milvus server at ``uri`` (``heiindex.milvus_codes``), indexed
    there as ``milvus_index`` (None: BIN_FLAT); the FAISS files are written either way. ``captions``: the split's captions already read
    (``SplitStore.captions``), so that the shards of one build read them once.
    ``prototypes``: give the images prototype codes made from another split's captions
    (``heiindex.prototypes``; a ``CaptionBank`` already made, so that shards make it once);
    images are then described ``describe_images_block`` at a time, each block one more
    encoding pass over that split's captions."""
    milvus_index = check_codes_options(codes, uri, milvus_index)
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
        warn_nprobe_lowered(index_type, nlist, nprobe, [counts])
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
            check_encoded_finite(store.images_path, ids, regions, gram)
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
        cap_codes = write_caption_features(
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
            "matcher": {
                "path": str(matcher.path.resolve()),
                "sha256": matcher.checksum,
                "attention": matcher.model.attention.to_dict(),
            },
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
