"""The HEI hash module: pooled instance features -> k-bit codes, and its loss.

Pooling: the mean of an image's region embeddings and of a caption's real word embeddings
(the frozen matcher's encoders). Hash layers: one ``Linear(d -> k)`` per modality, ``tanh``
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

__all__ = ["HashConfig", "HashModule", "hash_loss", "pack_codes", "pool_regions", "pool_words", "scale_scores"]


@dataclass(frozen=True)
class HashConfig:
    bits: int = 128
    embed_size: int = 256
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.bits % 8 or not 8 <= self.bits <= 1024:
            raise ValueError(f"code length must be a multiple of 8 between 8 and 1024 bits, got {self.bits}")
        if self.pooling != "mean":
            raise ValueError(f"pooling must be 'mean', got {self.pooling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def pool_regions(regions: Tensor) -> Tensor:
    """(n, R, d) -> (n, d): mean over regions."""
    return regions.mean(dim=1)


def pool_words(words: Tensor, lengths: Tensor) -> Tensor:
    """(n, L, d) with real lengths (n,) -> (n, d): mean over real words."""
    mask = torch.arange(words.shape[1], device=words.device)[None, :] < lengths[:, None].to(words.device)
    return (words * mask[..., None]).sum(dim=1) / lengths[:, None].to(words.dtype)


class HashModule(nn.Module):
    """``image_hash`` and ``text_hash``: ``Linear(d -> k)`` each."""

    def __init__(self, config: HashConfig) -> None:
        super().__init__()
        self.config = config
        self.image_hash = nn.Linear(config.embed_size, config.bits)
        self.text_hash = nn.Linear(config.embed_size, config.bits)

    def relaxed(self, pooled: Tensor, modality: str) -> Tensor:
        """tanh codes in (-1, 1) for training."""
        layer = self.image_hash if modality == "image" else self.text_hash
        return torch.tanh(layer(pooled))

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
