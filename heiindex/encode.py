"""Encode a stored split with a matcher, block by block.

``encode_split`` returns the projected region features of every image and the word features
of every caption, kept in memory for what follows (evaluation, training validation): at
d = 1024, the 5,000 images of COCO 5K take 0.74 GB, and their 25,000 captions 1.4 GB as
``heiindex.packed.PackedWords`` (padded to the longest caption, 52 tokens, they would take 5.3
GB). Raw 2048-d region features and padded words are only ever held one block at a time.
What this module must not do: score pairs or write files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .attention import region_gram
from .checkpoint import LoadedModel, check_encodable
from .model import ScanModel
from .packed import PackedWords, word_mask
from .progress import progress_bar
from .settings import require
from .store import CaptionTable, SplitStore, rows_of, sorted_ids

__all__ = [
    "EncodedSplit",
    "encode_caption_block",
    "encode_captions",
    "encode_captions_packed",
    "encode_images",
    "check_split",
    "encode_split",
    "iter_caption_blocks",
]


@dataclass
class EncodedSplit:
    """Encoded features of one split.

    regions: (n_imgs, R, d); gram: (n_imgs, R, R); words: packed, ``words.shape`` (n_caps, L, d)
    (``words.padded()`` for the padded tensor); lengths: (n_caps,); caption_image: (n_caps,) row
    of each caption's image in ``regions``.
    """

    image_ids: np.ndarray
    regions: Tensor
    gram: Tensor
    words: PackedWords
    lengths: Tensor
    caption_image: np.ndarray
    captions: CaptionTable


@torch.no_grad()
def encode_images(
    model: ScanModel | LoadedModel,
    store: SplitStore,
    block_images: int = 256,
    progress: bool = False,
    limit: int | None = None,
    pool: Callable[[Tensor], Tensor] | None = None,
) -> tuple[np.ndarray, Tensor]:
    """Encoded regions of the first ``limit`` (default all) images: ``(ids, (n, R, d))``.
    ``pool``: applied to each block's regions ``(b, R, d)`` (on the CPU), whose ``(b, ...)``
    results are kept instead: the split's regions are then never all in memory."""
    if isinstance(model, LoadedModel):  # as encode_split takes one
        model = model.model
    block_images = require("block_images", block_images, at_least=1, integer=True)
    n = store.n_images if limit is None else min(require("limit", limit, at_least=1, integer=True), store.n_images)
    dev = next(model.parameters()).device  # encoding runs where the model is; the result is on the CPU
    d = model.config.embed_size
    out = torch.empty((n, store.regions, d)) if pool is None else None  # pooled: shaped by the first block
    ids = np.empty(n, dtype=np.int64)
    pos = 0
    bar = progress_bar(n, f"encode {store.split} images", progress, unit="img")
    for block_ids, feats in store.iter_image_blocks(block_images, 0, n):
        part = model.encode_images(torch.from_numpy(feats).to(dev)).cpu()
        if pool is not None:
            part = pool(part)
            out = part.new_empty((n, *part.shape[1:])) if out is None else out
        out[pos : pos + len(block_ids)] = part
        ids[pos : pos + len(block_ids)] = block_ids
        pos += len(block_ids)
        bar.update(len(block_ids))
    bar.close()
    return ids, (torch.empty((0, d)) if out is None else out)


@torch.no_grad()
def iter_caption_blocks(
    model: ScanModel, tokens: np.ndarray, lengths: np.ndarray, block: int = 1024
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(first row, words (b, L_b, d), lengths (b,))``, ``block`` captions at a time, encoded
    where the model is (and left there); each block's tokens are cut to its longest caption."""
    block = require("block", block, at_least=1, integer=True)
    lengths = np.asarray(lengths, dtype=np.int64)
    for s in range(0, len(lengths), block):
        yield s, *encode_caption_block(model, tokens[s : s + block], lengths[s : s + block])


@torch.no_grad()
def encode_caption_block(model: ScanModel, tokens: np.ndarray, lengths: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(words (b, L, d), lengths (b,))`` of one block of padded token ids ``(b, >= L)``, cut to
    its longest caption ``L`` and encoded where the model is (and left there)."""
    dev = next(model.parameters()).device
    lens = np.asarray(lengths, dtype=np.int64)
    tok = torch.from_numpy(np.asarray(tokens[:, : int(lens.max())], dtype=np.int64))
    lens_t = torch.from_numpy(lens).to(dev)
    return model.encode_captions(tok.to(dev), lens_t), lens_t


@torch.no_grad()
def encode_captions(model: ScanModel, tokens: np.ndarray, lengths: np.ndarray, block: int = 1024) -> Tensor:
    """Word features ``(n_caps, L, d)`` of padded token ids ``(n_caps, L)``; zero at padding.
    Encoding runs where the model is; the result is on the CPU."""
    out = torch.zeros((len(tokens), np.shape(tokens)[1], model.config.embed_size))
    for s, w, _ in iter_caption_blocks(model, tokens, lengths, block):
        out[s : s + len(w), : w.shape[1]] = w.cpu()
    return out


@torch.no_grad()
def encode_captions_packed(
    model: ScanModel, tokens: np.ndarray, lengths: np.ndarray, block: int = 1024, rows: Tensor | None = None
) -> PackedWords:
    """``encode_captions``, packed: each block's real words are copied into one tensor of the
    split's real words (on the CPU), so the padded ``(n_caps, L, d)`` tensor never exists.
    ``rows``: that tensor, ``(total words + 1, d)`` zeroed, where the caller keeps it elsewhere
    than in memory (``heiindex.train_hash`` maps a temporary file); by default a new one."""
    lens = torch.from_numpy(np.asarray(lengths, dtype=np.int64))
    shape = (int(lens.sum()) + 1, model.config.embed_size)  # and the zero row
    if rows is None:
        rows = torch.zeros(shape)
    elif tuple(rows.shape) != shape:
        raise ValueError(f"rows must have shape {shape} (the words and a zero row), got {tuple(rows.shape)}")
    pos = 0
    for _, w, block_lens in iter_caption_blocks(model, tokens, lengths, block):
        real = w[word_mask(block_lens, w.shape[1])].cpu()
        rows[pos : pos + len(real)] = real
        pos += len(real)
    return PackedWords._wrap(rows, lens)


def check_split(
    model: ScanModel | LoadedModel, store: SplitStore, max_images: int | None = None
) -> tuple[ScanModel, CaptionTable]:
    """The bare model and ``store``'s captions, once both are checked for evaluation: a
    ``LoadedModel`` against the store by ``LoadedModel.check_store`` (the same vocabulary, the same
    feature size), a bare ``ScanModel`` by ``check_encodable`` (feature size, vocabulary size);
    distinct ids, and a caption for each of the first ``max_images`` images (``check_ids``)."""
    model = check_model(model, store)
    captions = store.captions()
    store.check_ids(captions, captioned=store.n_images if max_images is None else max_images)
    return model, captions


def check_model(model: ScanModel | LoadedModel, store: SplitStore) -> ScanModel:
    """The bare model, once checked against ``store`` as ``check_split`` checks it (without reading
    the captions: an ensemble's members share them)."""
    if isinstance(model, LoadedModel):
        model.check_store(store)
        return model.model
    check_encodable(model, store)
    return model


def encode_split(
    model: ScanModel | LoadedModel,
    store: SplitStore,
    max_images: int | None = None,
    progress: bool = False,
    captions: CaptionTable | None = None,
) -> EncodedSplit:
    """Encode images and captions of ``store`` (the first ``max_images`` images and their captions),
    checked first by ``check_split``. ``captions``: what ``check_split`` returned for this store
    and ``max_images``, where a loop encodes the split again and again (train's dev split): then
    ``model`` is the bare model it returned and nothing is read or checked twice."""
    if max_images is not None:
        max_images = require("max_images", max_images, at_least=1, integer=True)
    if captions is None:
        model, captions = check_split(model, store, max_images)
    model.eval()
    ids, regions = encode_images(model, store, progress=progress, limit=max_images)
    caption_image = rows_of(sorted_ids(ids), captions.image_ids)
    if (caption_image < 0).any():
        captions = captions.subset(caption_image >= 0)
        caption_image = caption_image[caption_image >= 0]
    words = encode_captions_packed(model, captions.tokens, captions.lengths)
    gram = region_gram(regions)
    return EncodedSplit(ids, regions, gram, words, words.lengths, caption_image, captions)
