"""The two HEI query pipelines, on features held in memory.

What this module is for: text to images (code the encoded captions, Hamming top-N over the
image codes, re-rank the N with the matcher) and image to text (the same from encoded images
over the caption codes). ``rerank_images`` / ``rerank_captions`` do it for a batch of queries
and are the one implementation that the bench, ``Index.candidates_for_*`` (shards, Ray) and the
single-query ``images_for_text`` / ``captions_for_image`` (``Index.search``, ``search_image``,
``benchmarks/latency.py``) share, so the latency measured is the latency served.
What it must not do: read files, or format results for people (``heiindex.index``, the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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

__all__ = [
    "Candidates",
    "EncodedQuery",
    "Ranked",
    "captions_for_image",
    "encode_text",
    "images_for_text",
    "rerank_captions",
    "rerank_images",
]


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


class Candidates(NamedTuple):
    """Hamming top-N of a batch of queries, re-ranked by the matcher. ``ids`` (q, N): rows into
    the searched set, -1 in the slots an approximate index left empty; ``scores`` (q, N) float32,
    -inf in those slots; ``hamming`` (q, N): Hamming distances of the candidates' codes."""

    ids: np.ndarray
    scores: np.ndarray
    hamming: np.ndarray


@torch.no_grad()
def rerank_images(
    model: ScanModel, image_index, codes: np.ndarray, *, words, lengths, regions, gram, n: int
) -> Candidates:
    """Text to image for a batch of encoded captions (``words`` (q, L, d) in the regions' dtype,
    ``lengths`` (q,)) with their packed ``codes``: the ``n`` nearest image codes, re-ranked."""
    dist, ids = hamming_candidates(image_index, codes, n)
    safe = torch.from_numpy(np.maximum(ids, 0)).to(regions.device)
    scores = score_image_candidates(model.attention, words, lengths, regions, safe, gram)
    return Candidates(ids, _empty_slots(ids, scores), dist)


@torch.no_grad()
def rerank_captions(
    model: ScanModel, caption_index, codes: np.ndarray, *, regions, gram, words, lengths, n: int
) -> Candidates:
    """Image to text for a batch of encoded images (``regions`` (q, R, d), ``gram`` (q, R, R))
    with their packed ``codes``: the ``n`` nearest caption codes, re-ranked."""
    dist, ids = hamming_candidates(caption_index, codes, n)
    safe = torch.from_numpy(np.maximum(ids, 0)).to(regions.device)
    scores = score_caption_candidates(model.attention, regions, words, lengths, safe, gram)
    return Candidates(ids, _empty_slots(ids, scores), dist)


def _empty_slots(ids: np.ndarray, scores: Tensor) -> np.ndarray:
    return np.where(ids >= 0, scores.float().cpu().numpy(), -np.inf).astype(np.float32)


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
    words = query.words.to(regions.dtype)  # the stored features' precision (see Index.to)
    return _top(
        rerank_images(
            model, image_index, code, words=words, lengths=query.lengths, regions=regions, gram=gram, n=candidates
        ),
        k,
    )


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
    return _top(
        rerank_captions(
            model, caption_index, code, regions=regions, gram=gram, words=words, lengths=lengths, n=candidates
        ),
        k,
    )


def _top(found: Candidates, k: int) -> Ranked:
    """The best ``k`` of one query's candidates; empty slots are dropped."""
    keep = found.ids[0] >= 0
    scores, ids, dist = found.scores[0][keep], found.ids[0][keep], found.hamming[0][keep]
    order = np.argsort(-scores, kind="stable")[:k]
    return Ranked(ids[order], scores[order], dist[order])
