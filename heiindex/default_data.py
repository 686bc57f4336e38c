"""The bundled default dataset, "coco-sim": real COCO captions, SIMULATED image features.

Captions and SCAN's COCO vocabulary ship in ``data/coco-captions/``; the image features are
generated on first use by ``heiindex.simulate`` (seeded, deterministic) and go through the
same ingest path as real data. Splits: ``test`` = the first 1,000 images of COCO 5K
``testall`` (COCO 1K fold 1), ``train`` = its other 4,000 images, ``dev`` = SCAN's dev images.
Numbers on coco-sim are NOT comparable with published COCO numbers: the image side is made up.

Where things live (``HEIINDEX_DATA`` overrides the data folder)::

    data/coco-captions/              shipped captions and vocab
    data/models/scan-coco-sim/       the default matcher (committed)
    data/models/hash-coco-sim/       the default hash module (committed)
    data/coco-sim/precomp/           generated SCAN-format features (git-ignored)
    data/coco-sim/store/             ingested Parquet stores (git-ignored)
    data/coco-sim/index/{split}/     built indexes (git-ignored)
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from . import simulate
from .atomic import atomic_file, interrupted_hint
from .errors import DataError, HeiindexError, LastBuiltWarning
from .ingest import ingest
from .simulate import SimConfig, write_coco_sim_precomp

__all__ = [
    "SPLITS",
    "coco_sim_dir",
    "data_dir",
    "default_hash_dir",
    "default_index_dir",
    "default_model_dir",
    "ensure_coco_sim",
    "last_built_index",
    "wanted_stamp",
]

SPLITS = ("train", "dev", "test")


def data_dir() -> Path:
    env = os.environ.get("HEIINDEX_DATA")
    if env:
        return Path(env)
    repo_data = Path(__file__).resolve().parent.parent / "data"
    return repo_data if (repo_data / "coco-captions").exists() else Path.cwd() / "data"


def coco_sim_dir() -> Path:
    return data_dir() / "coco-sim"


def default_store_dir() -> Path:
    """The default data's store root (``ensure_coco_sim`` writes it)."""
    return coco_sim_dir() / "store"


def default_model_dir() -> Path:
    return data_dir() / "models" / "scan-coco-sim"


def default_hash_dir() -> Path:
    return data_dir() / "models" / "hash-coco-sim"


def default_index_dir(split: str) -> Path:
    return coco_sim_dir() / "index" / split


def _last_marker() -> Path:
    return coco_sim_dir() / "index" / "LAST"


def last_built_index() -> Path:
    """The index the last ``build`` on the default data wrote (``test`` if none)."""
    marker = _last_marker()
    if not marker.exists():
        return default_index_dir("test")
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    if not text:  # "" would be the current folder
        raise DataError(
            marker,
            "should name the index the last build on the default data wrote, and names none: give the index's "
            "folder, or build again (which rewrites it)",
        )
    path = Path(text)
    if not path.exists():  # else "no index here; run heiindex build first", as if none had been built
        default = default_index_dir("test")
        there = f" (the default one, {default}, is there)" if (default / "manifest.json").exists() else ""
        raise HeiindexError(  # where a replace of it was killed between two renames, the hint says how back
            f"the last build on the default data wrote {path}, which is gone{interrupted_hint(path)}: give an "
            f"index's folder{there}, or build again"
        )
    return path


def mark_last_built(path: Path) -> None:
    """Record ``path`` as the index the last ``build`` on the default data wrote. Where the marker
    cannot be written (a read-only data folder), the index stands: a ``LastBuiltWarning`` says so
    (a build with ``--out`` failed after writing its index, on a checkout with no index folder yet)."""
    marker = _last_marker()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(marker) as tmp:
            tmp.write_text(str(Path(path).resolve()) + "\n", encoding="utf-8")  # as last_built_index reads it
    except OSError as exc:
        warnings.warn(
            LastBuiltWarning(
                f"{path} is built, but {marker} could not record it as the last build ({exc.strerror or exc}): "
                "give its folder to query and bench"
            ),
            stacklevel=2,
        )


def wanted_stamp(config: SimConfig) -> dict:
    """What coco-sim's ``VERSION.json`` must hold for its data to be reused: the simulator's
    version (``simulate.SIMULATOR_VERSION``, bumped when its output changes) and its settings."""
    return {
        "sim_version": simulate.SIMULATOR_VERSION,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
    }


def ensure_coco_sim(config: SimConfig = SimConfig(), progress: bool = False, log=print) -> Path:
    """Generate and ingest coco-sim once; return its store root."""
    root, store = coco_sim_dir(), default_store_dir()
    stamp = root / "VERSION.json"
    want = wanted_stamp(config)
    if _stamp(stamp) == want and all((store / s / "manifest.json").exists() for s in SPLITS):
        return store
    captions = data_dir() / "coco-captions"
    log("generating coco-sim (real COCO captions, simulated image features) ...")
    write_coco_sim_precomp(captions, root / "precomp", config)
    vocab = captions / "coco_precomp_vocab.json"
    if (store / "vocab.json").exists():
        (store / "vocab.json").unlink()
    for split in SPLITS:  # generated data, all re-ingested: a changed feature size must not meet the old splits
        if (store / split).is_dir():
            shutil.rmtree(store / split)
    for split in SPLITS:
        summary = ingest(
            root / "precomp",
            split,
            store,
            vocab=vocab,
            regions=config.regions,
            feature_dim=config.feature_dim,
            progress=progress,
        )
        log(summary.line())
    with atomic_file(stamp) as tmp:
        tmp.write_text(json.dumps(want, indent=2) + "\n")
    return store


def _stamp(path: Path) -> dict | None:
    """What the coco-sim stamp records; None where it is missing or unreadable (a damaged stamp
    only means the generated data is regenerated)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
