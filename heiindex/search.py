"""The two HEI query pipelines, on features held in memory.

What this module is for: text to images (encode the caption, code it, Hamming top-N over the
image codes, re-rank the N with the matcher, keep the top k) and image to text (the same from
an encoded image over the caption codes). ``Index.search`` / ``Index.search_image`` and
``benchmarks/latency.py`` share them, so the latency measured is the latency served.
What it must not do: read files, or format results for people (``heiindex.index``, the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .attention import score_caption_candidates, score_image_candidates
from .errors import HeiindexError
from .hamming import hamming_candidates
from .hashing import HashModule
from .model import ScanModel
from .packed import PackedWords
from .vocab import Vocab

__all__ = ["EncodedQuery", "Ranked", "captions_for_image", "encode_text", "images_for_text"]


@dataclass
class EncodedQuery:
    words: Tensor  # (1, L, d)
    lengths: Tensor  # (1,)
    unknown: list[str]


@dataclass
class Ranked:
    """Top-k items of one query, best first: rows into the searched set, matcher scores,
    Hamming distances of their codes to the query's code."""

    rows: np.ndarray
    scores: np.ndarray
    hamming: np.ndarray


@torch.no_grad()
def encode_text(model: ScanModel, vocab: Vocab, text: str) -> EncodedQuery:
    """Word features of a caption; empty or all-unknown captions are refused with a clear error."""
    if not text or not text.strip():
        raise HeiindexError("the query is empty")
    enc = vocab.encode(text)
    if not enc.tokens:
        raise HeiindexError(f"the query {text!r} has no words")
    if len(enc.unknown) == len(enc.tokens):
        raise HeiindexError(f"no word of the query is in the model's vocabulary: {', '.join(enc.unknown)}")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(enc.ids)], device=device)
    words = model.encode_captions(torch.tensor([enc.ids], device=device), lengths)
    return EncodedQuery(words, lengths, list(enc.unknown))


@torch.no_grad()
def images_for_text(
    model: ScanModel,
    hasher: HashModule,
    image_index,
    regions: Tensor,
    gram: Tensor,
    query: EncodedQuery,
    k: int,
    candidates: int,
) -> Ranked:
    """Text to image: Hamming top-``candidates`` over the image codes, re-ranked, top ``k``."""
    code = hasher.caption_codes(query.words, query.lengths)
    dist, ids = _kept(*hamming_candidates(image_index, code, candidates))
    cand = torch.from_numpy(ids).to(regions.device)
    words = query.words.to(regions.dtype)  # the stored features' precision (see Index.to)
    scores = score_image_candidates(model.attention, words, query.lengths, regions, cand, gram)
    return _top(scores[0].float().cpu().numpy(), ids[0], dist[0], k)


@torch.no_grad()
def captions_for_image(
    model: ScanModel,
    hasher: HashModule,
    caption_index,
    words: Tensor | PackedWords,
    lengths: Tensor,
    regions: Tensor,
    gram: Tensor,
    k: int,
    candidates: int,
) -> Ranked:
    """Image to text for one encoded image ``regions`` (1, R, d) with its ``gram`` (1, R, R)."""
    code = hasher.image_codes(regions.float())
    dist, ids = _kept(*hamming_candidates(caption_index, code, candidates))
    cand = torch.from_numpy(ids).to(regions.device)
    scores = score_caption_candidates(model.attention, regions, words, lengths, cand, gram)
    return _top(scores[0].float().cpu().numpy(), ids[0], dist[0], k)


def _kept(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the empty slots (id -1) an approximate index leaves when it finds fewer than N."""
    keep = ids[0] >= 0
    return dist[:, keep], ids[:, keep]


def _top(scores: np.ndarray, ids: np.ndarray, dist: np.ndarray, k: int) -> Ranked:
    order = np.argsort(-scores, kind="stable")[:k]
    return Ranked(ids[order], scores[order], dist[order])
