"""Retrieval metrics: ranks of the ground truth, R@K, median/mean rank, rsum, COCO protocols.

Conventions: a caption ``j`` belongs to image ``gt[j]``. Text-to-image ranks the images for each
caption; image-to-text ranks the captions for each image and counts the best-ranked of its
captions (SCAN's protocol). Ranks are 1-based. What this module must not do: score pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import HeiindexError

__all__ = ["Recall", "check_finite", "coco_folds", "i2t_ranks", "rank_from_candidates", "recall", "t2i_ranks"]


def check_finite(scores: np.ndarray) -> None:
    """``HeiindexError`` unless every score is finite. A NaN compares false with everything, so
    a NaN score matrix ranked every text-to-image ground truth first (R@1 100) and a diverged
    model looked perfect."""
    bad = scores.size - int(np.count_nonzero(np.isfinite(scores)))
    if bad:
        raise HeiindexError(
            f"{bad} of {scores.size} matcher scores are NaN or infinite: the model's weights or the "
            "features it was given hold NaN or inf, so no ranking can be reported"
        )


@dataclass(frozen=True)
class Recall:
    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float

    @property
    def rsum(self) -> float:
        return self.r1 + self.r5 + self.r10

    def to_dict(self) -> dict:
        """Plain JSON: a median or mean rank that is infinite (some ground truth was never
        retrieved, as when it is not among HEI's N candidates) becomes ``None``."""
        d = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}
        d["rsum"] = self.rsum
        return d


def recall(ranks: np.ndarray) -> Recall:
    """Metrics from 1-based ranks (``inf`` for a ground truth that was never retrieved)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks")
    pct = [100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10)]
    return Recall(pct[0], pct[1], pct[2], float(np.floor(np.median(ranks))), float(np.mean(ranks)))


def t2i_ranks(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """scores (n_caps, n_imgs), gt (n_caps,) image index per caption -> (n_caps,) ranks.

    Ties count against the ground truth (an equal score ranks above it).
    """
    scores = np.asarray(scores)
    check_finite(scores)
    gt_score = scores[np.arange(len(gt)), gt]
    return (scores >= gt_score[:, None]).sum(axis=1).astype(np.float64)


def i2t_ranks(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """scores (n_imgs, n_caps), gt (n_caps,) image per caption -> (n_imgs,) best rank of its captions."""
    scores = np.asarray(scores)
    check_finite(scores)
    n_imgs = scores.shape[0]
    out = np.full(n_imgs, np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    pos = np.empty_like(order)
    rows = np.arange(n_imgs)[:, None]
    pos[rows, order] = np.arange(scores.shape[1])[None, :]
    for j, i in enumerate(gt):
        if 0 <= i < n_imgs:
            out[i] = min(out[i], pos[i, j] + 1)
    return out


def rank_from_candidates(candidates: np.ndarray, relevant: list[set[int]] | np.ndarray) -> np.ndarray:
    """1-based rank of the first relevant item in each ranked candidate list (``inf`` if absent).

    candidates: (n_q, N) item ids, best first; relevant: for each query its set of relevant ids
    (or an (n_q,) array of single ids).
    """
    candidates = np.asarray(candidates)
    out = np.full(len(candidates), np.inf)
    for q, row in enumerate(candidates):
        rel = relevant[q]
        rel = rel if isinstance(rel, set) else {int(rel)}
        for pos, item in enumerate(row):
            if int(item) in rel:
                out[q] = pos + 1
                break
    return out


def coco_folds(n_images: int, fold_size: int = 1000) -> list[tuple[int, int]]:
    """Image ranges of COCO 1K evaluation: consecutive folds of 1,000 images of ``testall``."""
    if n_images % fold_size:
        raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
    return [(s, s + fold_size) for s in range(0, n_images, fold_size)]
