"""The HEI hash module: pooled instance features -> k-bit codes, and its loss.

Pooling of the frozen matcher's region / real-word embeddings to one vector per instance:
``mean``; ``max`` (per dimension); ``attn``, weights from a softmax (temperature 10) of each
item's cosine to the mean, a parameter-free form of attention pooling guided by the mean; or
``query`` (the default), regions by their mean and words by a learned attention query ``q``
(weights ``softmax(word . q)`` over the real words; ``q`` trained with the hash layers, initial
norm 5). Hash layers: one ``Linear(d -> k)`` per modality, ``tanh``
while training, ``sign`` at inference; codes are packed to ``k / 8`` bytes, bit ``i`` set where
the ``i``-th output is positive, the layout FAISS binary indexes read.

Loss (HEI): with code similarity ``h_ij = b_i . b_j / k`` in [-1, 1], matched pairs are pulled
to 1 by ``(h_ij - 1)^2`` (averaged), and an unmatched pair is pushed down only where its code
similarity exceeds the frozen matcher's judgement of it, by ``(h_ij - s_ij)^2`` averaged over
the violating pairs. Scales: SCAN's LogSumExp scores are not in [-1, 1] (they exceed the best
word relevance by up to log(L)/lambda_lse), so ``s`` is mapped per batch by the affine map that
sends the batch's lowest score to -1 and the mean matched-pair score to +1, clipped to [-1, 1]:
a negative the matcher rates as highly as a true match may share the full code, one it rates
lowest must have opposite codes. What this module must not do: search or train loops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .packed import PackedWords, word_mask
from .settings import SettingError, settle

__all__ = [
    "POOLINGS",
    "HashConfig",
    "HashModule",
    "code_ranking_loss",
    "hash_loss",
    "pack_codes",
    "pool_regions",
    "pool_words",
    "scale_scores",
]


@dataclass(frozen=True)
class HashConfig:
    bits: int = 256
    embed_size: int | None = None  # the matcher's embedding size: None lets train_hash take the matcher's
    pooling: str = "query"  # coco-sim: +0.5 / +0.1 test candidate recall over mean pooling (benchmarks/RESULTS.md)

    def __post_init__(self) -> None:
        settle(self, "bits", integer=True)  # a numpy int: an int
        if self.embed_size is not None:
            settle(self, "embed_size", at_least=1, integer=True)
        if self.bits % 8 or not 8 <= self.bits <= 1024:
            raise SettingError(
                "bits", f"bits (the code length k) must be a multiple of 8 between 8 and 1024, got {self.bits}"
            )
        if self.pooling not in POOLINGS:
            raise SettingError("pooling", f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


POOLINGS = ("mean", "max", "attn", "query")
_ATTN_TEMPERATURE = 10.0
_QUERY_NORM = 5.0  # the learned query's initial norm (benchmarks/hash_exp.py's q_scale)


def _pool(x: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Pool (n, m, d) over m where ``mask`` (n, m) is True."""
    m = mask[..., None].to(x.dtype)
    mean = (x * m).sum(dim=1) / m.sum(dim=1)
    if pooling == "mean":
        return mean
    if pooling == "max":
        return x.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
    if pooling == "attn":  # weights from each item's cosine to the mean, softmax at temperature 10
        cos = torch.nn.functional.cosine_similarity(x, mean[:, None, :], dim=-1)
        w = torch.softmax((_ATTN_TEMPERATURE * cos).masked_fill(~mask, float("-inf")), dim=1)
        return (w[..., None] * x).sum(dim=1)
    if pooling == "query":
        raise ValueError("'query' pooling is learned: pool with HashModule.pool_images / pool_captions")
    raise SettingError("pooling", f"pooling must be one of {POOLINGS}, got {pooling!r}")


def pool_regions(regions: Tensor, pooling: str = "mean") -> Tensor:
    """(n, R, d) -> (n, d) over all regions (``query`` pooling pools regions by their mean)."""
    pooling = "mean" if pooling == "query" else pooling
    return _pool(regions, torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device), pooling)


def pool_words(words: Tensor, lengths: Tensor, pooling: str = "mean") -> Tensor:
    """(n, L, d) with real lengths (n,) -> (n, d) over the real words (the padding may hold
    anything: it is zeroed first, since a mask multiplied into NaN or inf is NaN)."""
    mask = word_mask(lengths.to(words.device), words.shape[1])
    return _pool(_zero_padding(words, mask), mask, pooling)


def _zero_padding(words: Tensor, mask: Tensor) -> Tensor:
    return words.masked_fill(~mask[..., None], 0.0)


class HashModule(nn.Module):
    """``image_hash`` and ``text_hash``: ``Linear(d -> k)`` each; with ``query`` pooling also
    ``word_query`` (d,), the learned query that pools the words."""

    def __init__(self, config: HashConfig) -> None:
        super().__init__()
        if config.embed_size is None:
            raise SettingError(
                "embed_size", "a hash module needs embed_size, its matcher's embedding size (train_hash fills it in)"
            )
        self.config = config
        self.image_hash = nn.Linear(config.embed_size, config.bits)
        self.text_hash = nn.Linear(config.embed_size, config.bits)
        if config.pooling == "query":
            q = torch.randn(config.embed_size)
            self.word_query = nn.Parameter(q / q.norm() * _QUERY_NORM)

    def relaxed(self, pooled: Tensor, modality: str) -> Tensor:
        """tanh codes in (-1, 1) for training."""
        layer = self.image_hash if modality == "image" else self.text_hash
        return torch.tanh(layer(pooled))

    def pool_images(self, regions: Tensor) -> Tensor:
        return pool_regions(regions, self.config.pooling)

    def pool_captions(self, words: Tensor, lengths: Tensor) -> Tensor:
        if self.config.pooling != "query":
            return pool_words(words, lengths, self.config.pooling)
        mask = word_mask(lengths.to(words.device), words.shape[1])
        words = _zero_padding(words, mask)  # as pool_words: NaN or inf padding times a zero weight is NaN
        logits = (words @ self.word_query.to(words.dtype)).masked_fill(~mask, float("-inf"))
        return (torch.softmax(logits, dim=1).unsqueeze(-1) * words).sum(dim=1)

    @torch.no_grad()
    def image_codes(self, regions: Tensor) -> np.ndarray:
        """Packed codes of encoded images (n, R, d)."""
        return self.codes(self.pool_images(regions), "image")

    @torch.no_grad()
    def caption_codes(self, words: Tensor | PackedWords, lengths: Tensor, block: int = 512) -> np.ndarray:
        """Packed codes of encoded captions: padded words (n, L, d) with lengths (n,), or
        ``PackedWords`` with their own lengths (others are a ``ValueError``, as in
        ``heiindex.attention``). Packed words are padded ``block`` captions at a time, so memory
        stays bounded, in order of length, so that a block is padded to about its own captions'
        length, not to the longest caption's: on coco-sim test (5,000 captions, 13 words on
        average, at most 40) in length order 0.14 s, in stored order 0.33 s (timed by hand), the codes
        the same."""
        if not isinstance(words, PackedWords):
            return self.codes(self.pool_captions(words.float(), lengths), "text")
        lengths = words.own_lengths(lengths)
        out = np.empty((len(words), self.config.bits // 8), np.uint8)
        order = torch.argsort(lengths, stable=True)
        for s in range(0, len(words), block):
            rows = order[s : s + block]
            lens = lengths.index_select(0, rows)
            pooled = self.pool_captions(words.gather(rows, int(lens.max())).float(), lens)
            out[rows.cpu().numpy()] = self.codes(pooled, "text")
        return out

    @torch.no_grad()
    def codes(self, pooled: Tensor, modality: str) -> np.ndarray:
        """Packed binary codes ``(n, k / 8)`` uint8 of pooled features ``(n, d)``."""
        layer = self.image_hash if modality == "image" else self.text_hash
        return pack_codes(layer(pooled) > 0)


def pack_codes(bits: Tensor) -> np.ndarray:
    """Boolean ``(n, k)`` -> uint8 ``(n, k / 8)``, bit ``i`` of the code at byte ``i // 8``,
    position ``i % 8`` (little-endian within a byte, as FAISS reads them)."""
    return np.packbits(bits.cpu().numpy().astype(np.uint8), axis=1, bitorder="little")


def scale_scores(scores: Tensor, positive: Tensor) -> Tensor:
    """Map matcher scores of a batch to [-1, 1]: the minimum to -1, the mean of ``scores[positive]`` to +1."""
    lo = scores.min()
    hi = scores[positive].mean()
    span = (hi - lo).clamp_min(1e-6)
    return (2 * (scores - lo) / span - 1).clamp(-1, 1)


def code_ranking_loss(img_codes: Tensor, txt_codes: Tensor, positive: Tensor, margin: float = 0.2) -> Tensor:
    """Hinge triplet loss on code similarities, summed over negatives, averaged over pairs.

    img_codes (n, k) and txt_codes (n, k) are aligned: row i of each is a matched pair (the
    diagonal of ``positive``). Not part of the HEI paper's loss: added because it ranks the
    true match above the others directly, which is what candidate recall measures.
    """
    h = img_codes @ txt_codes.T / img_codes.shape[1]
    d = h.diag()
    cost_txt = (margin + h - d[:, None]).clamp(min=0).masked_fill(positive, 0)  # image i vs caption j
    cost_img = (margin + h - d[None, :]).clamp(min=0).masked_fill(positive, 0)  # caption j vs image i
    return (cost_txt.sum() + cost_img.sum()) / h.shape[0]


def hash_loss(img_codes: Tensor, txt_codes: Tensor, target: Tensor, positive: Tensor) -> Tensor:
    """HEI loss of a batch.

    img_codes: (n_i, k), txt_codes: (n_t, k) relaxed codes in [-1, 1]; target: (n_i, n_t) scaled
    matcher scores in [-1, 1]; positive: (n_i, n_t) bool, True for matched pairs.
    """
    h = img_codes @ txt_codes.T / img_codes.shape[1]
    matched = ((h[positive] - 1) ** 2).mean()
    neg = ~positive
    viol = neg & (h > target)
    unmatched = ((h - target)[viol] ** 2).mean() if bool(viol.any()) else h.sum() * 0
    return matched + unmatched
