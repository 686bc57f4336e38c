"""The front doors of both kinds of build: ``build_index`` (what ``heiindex build`` does) writes
one index (``heiindex.index.Index.write``) or a sharded build (``heiindex.shards.write_shards``),
on the default data where no store is given; ``open_index`` opens either kind, the last build on
the default data where no path is given (what ``query`` and ``bench`` search without ``--index``).
What this module must not do: encode, hash or search itself.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import LoadedModel
from .device import resolve_device
from .errors import HeiindexError
from .hamming import check_index_options
from .hash_folder import LoadedHash
from .index import Index
from .index_manifest import sharded_manifest
from .index_write import check_codes_options
from .prototypes import PrototypeConfig, check_describing_split
from .settings import SettingError, require_config, require_name, require_path
from .shards import ShardedIndex, write_shards

__all__ = ["build_index", "open_index"]


def build_index(
    split: str = "test",
    store_root: str | Path | None = None,
    matcher: LoadedModel | str | Path | None = None,
    hasher: LoadedHash | str | Path | None = None,
    out: str | Path | None = None,
    shards: int | None = None,
    *,
    codes: str = "faiss",
    uri: str | None = None,
    milvus_index: str | None = None,
    prototypes: PrototypeConfig | None = None,
    index_type: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    log=print,
) -> tuple[Path, dict]:
    """What ``heiindex build`` does: ``split`` of ``store_root`` built into ``out``, as ``shards``
    shards (``write_shards``) or one index (``Index.write``, the only kind whose codes can go to
    Milvus: ``codes`` / ``uri`` / ``milvus_index``); the other arguments are theirs. Every setting
    is checked before anything is generated or encoded. ``store_root`` None: the default data
    (coco-sim, generated on first use, ``log`` saying so), the default matcher and hash module
    where none are given, ``out`` by default its split's index folder, and the build recorded as
    the last one (``heiindex.default_data.mark_last_built``: what ``open_index()`` and the CLI
    search without a path). Another store needs ``out``. Returns the folder written and its
    manifest."""
    from . import default_data as dd

    split = require_name("split", split)  # None failed joining it to the default index folder
    store_root = None if store_root is None else require_path("store_root", store_root)  # "": the current folder
    out = None if out is None else require_path("out", out)
    check_index_options(index_type, nlist, nprobe)
    resolve_device(device)
    check_codes_options(codes, uri, milvus_index)
    if shards is not None and codes != "faiss":
        raise HeiindexError(
            "`codes` milvus is for an unsharded build (the shards keep their codes in FAISS files)",
            settings=("codes",),
        )
    if prototypes is not None:  # a split's name ("train") failed on its .config
        check_describing_split(require_config("prototypes", prototypes, PrototypeConfig), split)
    default_data = store_root is None or store_root.resolve() == dd.default_store_dir().resolve()
    if out is None and not default_data:  # the default folder is the default data's index
        raise HeiindexError(
            f"`store_root` {store_root} needs `out`, an index folder: without it the index would replace the "
            f"default data's, {dd.default_index_dir(split)}",
            settings=("store_root", "out"),
        )
    root = store_root if store_root is not None else dd.ensure_coco_sim(progress=progress, log=log)
    out = out if out is not None else dd.default_index_dir(split)
    models = (  # only None means the default ("" or 0 built with the default model)
        dd.default_model_dir() if matcher is None else matcher,
        dd.default_hash_dir() if hasher is None else hasher,
    )
    common = dict(
        index_type=index_type, nlist=nlist, nprobe=nprobe, progress=progress, device=device, prototypes=prototypes
    )
    if shards is not None:
        manifest = write_shards(root, split, *models, out, shards, **common)
    else:
        manifest = Index.write(root, split, *models, out, codes=codes, uri=uri, milvus_index=milvus_index, **common)
    if store_root is None:
        dd.mark_last_built(out)
    return out, manifest


def open_index(
    path: str | Path | None = None,
    matcher: LoadedModel | str | Path | None = None,
    hasher: LoadedHash | str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    codes: str | None = None,
    uri: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> Index | ShardedIndex:
    """The build at ``path`` opened, whichever kind it is: a sharded one as ``ShardedIndex.open``
    opens it, else as ``Index.open`` (the arguments are theirs; ``codes`` / ``uri``, Milvus
    codes, only for an unsharded build). ``path`` None: the index the last build on the default
    data wrote (``heiindex.default_data.last_built_index``), as ``heiindex query`` and ``bench``
    search without ``--index``."""
    if path is None:
        from .default_data import last_built_index

        path = last_built_index()
    path = require_path("path", path)
    if sharded_manifest(path) is None:
        return Index.open(
            path, matcher, hasher, device=device, dtype=dtype, codes=codes, uri=uri, nprobe=nprobe, ef_search=ef_search
        )
    if codes not in (None, "faiss", "milvus"):  # "bogus" was accepted here, refused by Index.open
        raise SettingError("codes", f"codes must be 'faiss' or 'milvus', got {codes!r}")
    if codes == "milvus" or uri is not None:
        raise HeiindexError(f"{path} is a sharded build: its shards keep their codes in FAISS files")
    return ShardedIndex.open(path, matcher, hasher, device=device, dtype=dtype, nprobe=nprobe, ef_search=ef_search)
