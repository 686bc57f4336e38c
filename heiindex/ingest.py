"""Turn one SCAN precomp split into a heiindex Parquet store (``heiindex ingest``).

Streams the feature file block by block (bounded memory), tokenises and encodes the captions
with the store's vocabulary, and writes the split atomically (see ``heiindex.store``).
What this module must not do: train, encode with a model, or print (progress goes through the
``progress`` flag; the CLI prints the summary).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from . import __version__
from .atomic import clear_leftovers, scratch
from .errors import DataError, VocabularyWarning, counted, name_some
from .manifests import MANIFEST_FILE, file_record, manifest_folders, manifest_object, write_json
from .outputs import atomic_dir
from .precomp import PrecompSplit
from .progress import progress_bar
from .settings import require, require_name, require_path
from .store import CAPTIONS_FILE, FORMAT_VERSION, IMAGES_FILE, ImageWriter, check_store_root, write_captions
from .vocab import MAX_CAPTION_WORDS, Vocab

__all__ = ["IngestSummary", "ingest", "resolve_vocab"]

T = TypeVar("T")


# Above this share of unknown caption words, ingest warns (SCAN's COCO vocabulary leaves 0.41% of
# coco-sim's test words unknown; a vocabulary of the specials alone, 100%).
UNKNOWN_RATE_WARNED = 0.2


@dataclass
class IngestSummary:
    split: str
    path: Path
    n_images: int
    n_captions: int
    vocab_size: int
    unknown_rate: float
    unknown_words: dict[str, int]

    def line(self) -> str:
        return (
            f"{self.split}: {counted(self.n_images, 'image')}, {counted(self.n_captions, 'caption')}, "
            f"vocab {self.vocab_size}, unknown-word rate {100 * self.unknown_rate:.2f}% -> {self.path}"
        )


def resolve_vocab(
    out_root: Path, vocab: str | Path | Vocab | None, captions: list[str], split: str | None = None
) -> Vocab:
    """The vocabulary for a new split of ``out_root``.

    Given: used, and must agree with the root's ``vocab.json`` if one exists. Not given: the
    root's ``vocab.json``; else one built from these captions (SCAN's count >= 4 rule), with a
    ``VocabularyWarning`` where ``split`` is not train (SCAN builds it from train's). Where
    ``vocab.json`` is missing but other splits than ``split`` remain, the vocabulary must be the
    one they record: a new one would leave the root with splits of two vocabularies.
    """
    existing_path = out_root / "vocab.json"
    existing = Vocab.load(existing_path) if existing_path.exists() else None
    recorded = {} if existing is not None else _recorded_vocabs(out_root, split)
    if vocab is None:
        if recorded:
            raise DataError(
                existing_path,
                f"missing, but split(s) {', '.join(recorded)} of this store were tokenised with vocabulary "
                f"{_one_of(recorded)}: pass that vocabulary (the model's vocab.json) as `vocab`, or ingest "
                "into a new `out_root` folder",
                settings=("vocab", "out_root"),
            )
        if existing is not None:
            return existing
        built = Vocab.build(captions)
        if split is not None and split != "train":  # a later train split is then tokenised with its words
            warnings.warn(
                VocabularyWarning(
                    f"the store's vocabulary ({len(built)} words) was built from the {split} captions; SCAN builds "
                    "it from train's: ingest train first, or give `vocab`",
                    settings=("vocab",),
                ),
                stacklevel=3,
            )
        return built
    given = vocab if isinstance(vocab, Vocab) else Vocab.load(vocab)
    if recorded and set(recorded.values()) != {given.checksum}:
        raise DataError(
            existing_path,
            f"missing, and split(s) {', '.join(recorded)} of this store record vocabulary {_one_of(recorded)}, "
            f"not the `vocab` given ({given.checksum[:12]}...)",
            settings=("vocab",),
        )
    if existing is not None and existing != given:
        raise DataError(
            existing_path,
            "this store root already uses another vocabulary; ingest into a new `out_root` folder "
            "or pass no `vocab` to reuse this one",
            settings=("out_root", "vocab"),
        )
    return given


def _other_splits(out_root: Path, split: str | None, read: Callable[[dict], T]) -> Iterator[tuple[Path, T]]:
    """``(folder, read(its manifest))`` for each folder of ``out_root`` with a manifest, other than
    ``split``'s, where ``read`` finds what it reads: other folders (an index kept here, an older
    format) are not splits to judge."""
    for other in manifest_folders(out_root) if out_root.is_dir() else []:
        if other.name == split or (manifest := manifest_object(other)) is None:
            continue
        try:
            value = read(manifest)
        except (ValueError, KeyError, TypeError):
            continue
        yield other, value


def _claim_vocab(path: Path, voc: Vocab, split: str) -> int | None:
    """Make ``voc`` the store root's ``vocab.json`` (``path``) unless the root has one, in one step:
    it is saved beside ``path`` and hard-linked to it, which fails where ``path`` exists. A
    ``DataError`` where the one there is another vocabulary: another ingest into this root,
    started before this one saved its vocabulary, saved its own first. Two ingests into a new root
    at once each built a vocabulary from their own captions and both wrote ``vocab.json``, leaving
    one split tokenised with a vocabulary the root no longer had (``verify`` then failed). On a
    file system without hard links the save is a plain one, checked only afterwards: two
    ingests there can still race. A ``vocab.json`` that is a link is written where it points.
    Returns the inode of the file where this call made it (``_unclaim_vocab`` undoes it), else None."""
    clear_leftovers(path)  # a killed run's scratch of it
    if path.is_symlink():
        path = path.resolve()
        clear_leftovers(path)  # where the scratch is made for a link
    made = None
    if not path.exists():
        tmp = scratch(path, folder=False)  # a new file of its own: written directly, then linked
        try:
            tmp.write_text(voc.to_json())
            os.link(tmp, path)
            made = os.stat(path).st_ino
        except FileExistsError:  # saved meanwhile: compared below
            pass
        except OSError:  # no hard links on this file system: a plain save, as before
            if not path.exists():
                voc.save(path)
                made = os.stat(path).st_ino
        finally:
            tmp.unlink(missing_ok=True)
    there = Vocab.load(path)
    if there.checksum != voc.checksum:
        raise DataError(
            path,
            f"was written by another ingest into this store while this one ran ({len(there)} words, "
            f"{there.checksum[:12]}...); the {split} captions were tokenised with another vocabulary "
            f"({len(voc)} words, {voc.checksum[:12]}...), so {split} was not written: ingest it again to "
            "use the store's vocabulary (or, for a vocabulary built from train's captions as SCAN's is, "
            "ingest train first into a new root)",
        )
    return made


def _unclaim_vocab(path: Path, made: int | None, out_root: Path) -> None:
    """Remove the ``vocab.json`` this ingest made (inode ``made``) where it failed before its split
    was in place and no split of the root records a vocabulary: an interrupted first ingest into a
    new root left it, and the next ingest was refused for another ``--vocab``, or tokenised with
    the dead run's vocabulary without a word."""
    if made is None or _recorded_vocabs(out_root, None):
        return
    try:
        if os.stat(path).st_ino == made:
            path.unlink()
    except OSError:  # gone, or not to be removed: as it is
        pass


def _recorded_vocabs(out_root: Path, split: str | None) -> dict[str, str]:
    """``{split name: vocabulary sha256}`` recorded by the store splits of ``out_root`` other than ``split``."""
    return {f.name: sha for f, sha in _other_splits(out_root, split, lambda m: str(m["vocab"]["sha256"]))}


def _one_of(recorded: dict[str, str]) -> str:
    """The vocabulary checksum(s) of ``recorded``, shortened."""
    return " / ".join(sorted({f"{sha[:12]}..." for sha in recorded.values()}))


def _check_same_shape(out_root: Path, split: str, regions: int, feature_dim: int) -> None:
    """A store root holds one dataset: every split's images have the same regions and feature
    size (one model encodes them all). ``DataError`` naming the first other split that differs."""

    def shape_of(manifest: dict) -> tuple[int, int]:
        return int(manifest["images"]["regions"]), int(manifest["images"]["feature_dim"])

    for other, shape in _other_splits(out_root, split, shape_of):
        if shape != (regions, feature_dim):
            raise DataError(
                other / MANIFEST_FILE,
                f"split {other.name} of this store has {shape[0]} x {shape[1]} region features; "
                f"{split} has {regions} x {feature_dim} (ingest it into another `out_root`, or remove {other.name})",
                settings=("out_root",),
            )


def ingest(
    precomp_dir: str | Path,
    split: str,
    out_root: str | Path,
    vocab: str | Path | Vocab | None = None,
    regions: int | None = 36,
    feature_dim: int | None = 2048,
    block_images: int = 128,
    progress: bool = False,
    captions_per_image: int = 5,
) -> IngestSummary:
    """Write ``out_root/{split}`` from ``precomp_dir``; return what was written.
    ``captions_per_image``: 5 for COCO and Flickr30K (caption ``c`` is image ``c // 5``'s).

    Every input problem raises ``DataError`` before anything appears at ``out_root/{split}``.
    """
    block_images = require("block_images", block_images, at_least=1, integer=True)
    out_root = require_path("out_root", out_root)
    precomp_dir = require_path("precomp_dir", precomp_dir)
    split = require_name("split", split)  # None failed joining it to out_root
    check_store_root(out_root, split)
    src = PrecompSplit.open(precomp_dir, split, regions, feature_dim, captions_per_image)
    _check_same_shape(out_root, split, src.regions, src.feature_dim)
    voc = resolve_vocab(out_root, vocab, list(src.captions), split)

    encoded = [voc.encode(t) for t in src.captions]
    if long := [(line, len(e.tokens)) for line, e in enumerate(encoded, 1) if len(e.tokens) > MAX_CAPTION_WORDS]:
        raise DataError(  # before anything is written: build, evaluate and train padded to it and ran out of memory
            src.captions_path,
            f"line {long[0][0]}: the caption has {long[0][1]:,} words; a caption may have at most "
            f"{MAX_CAPTION_WORDS} (COCO's longest has 51)"
            + (
                f" ({counted(len(long) - 1, 'other line')} too: {name_some([str(n) for n, _ in long[1:]])})"
                if len(long) > 1
                else ""
            ),
        )
    n_tokens = sum(len(e.tokens) for e in encoded)
    unknown: dict[str, int] = {}
    for e in encoded:
        for w in e.unknown:
            unknown[w] = unknown.get(w, 0) + 1
    unknown_rate = sum(unknown.values()) / max(1, n_tokens)
    if unknown_rate > UNKNOWN_RATE_WARNED:
        warnings.warn(
            VocabularyWarning(
                f"{100 * unknown_rate:.1f}% of the {split} captions' words are not in the vocabulary and encode "
                "as <unk> (coco-sim's test: 0.41%): a vocabulary of other captions, or with capitalised words?"
            ),
            stacklevel=2,
        )

    target = out_root / split
    made = None
    try:
        with atomic_dir(target, "a store split", (IMAGES_FILE, CAPTIONS_FILE, MANIFEST_FILE)) as tmp:
            writer = ImageWriter(tmp / IMAGES_FILE, src.regions, src.feature_dim)
            bar = progress_bar(src.n_images, f"ingest {split}", progress, unit="img")
            try:
                for start, block in src.iter_image_blocks(block_images):
                    writer.write(np.arange(start, start + len(block)), block)
                    bar.update(len(block))
            finally:
                images_sha = writer.close()
                bar.close()
            cap_ids = np.arange(src.n_captions)
            captions_sha = write_captions(
                tmp / CAPTIONS_FILE,
                cap_ids,
                cap_ids // src.captions_per_image,
                list(src.captions),
                [e.ids for e in encoded],
            )
            manifest = {
                "format_version": FORMAT_VERSION,
                "created_by": f"heiindex {__version__}",
                "split": split,
                "source": {
                    "images": {"path": str(src.images_path.resolve()), "dtype": str(src.dtype), "rows": src.n_rows},
                    "captions": {"path": str(src.captions_path.resolve()), "sha256": src.captions_sha256()},
                },
                "images": {
                    "count": src.n_images,
                    "regions": src.regions,
                    "feature_dim": src.feature_dim,
                    "dtype": "float32",
                    "rows_per_image": src.rows_per_image,
                    "sha256": images_sha,
                },
                "captions": {
                    "count": src.n_captions,
                    "per_image": src.captions_per_image,
                    "tokens": n_tokens,
                    "sha256": captions_sha,
                },
                "vocab": {"size": len(voc), "sha256": voc.checksum, "unknown_rate": unknown_rate},
            }
            manifest["files"] = {name: file_record(tmp / name) for name in (IMAGES_FILE, CAPTIONS_FILE)}
            write_json(tmp / MANIFEST_FILE, manifest)
            made = _claim_vocab(out_root / "vocab.json", voc, split)
    except BaseException:  # the split not in place: a vocab.json this run made goes too
        _unclaim_vocab(out_root / "vocab.json", made, out_root)
        raise
    return IngestSummary(split, target, src.n_images, src.n_captions, len(voc), unknown_rate, unknown)
