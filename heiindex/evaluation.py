"""Retrieval metrics: ranks of the ground truth, R@K, median/mean rank, rsum, COCO protocols
(which protocols a split is ranked under, and the mean of COCO 1K's folds: of ``evaluate``'s
figures and of ``bench``'s, whose timings the folds sum).

Conventions: a caption ``j`` belongs to image ``gt[j]``. Text-to-image ranks the images for each
caption; image-to-text ranks the captions for each image and counts the best-ranked of its
captions (SCAN's protocol). Ranks are 1-based. What this module must not do: score pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import HeiindexError, name_some
from .settings import SettingError

__all__ = [
    "COCO_5K_IMAGES",
    "PROTOCOLS",
    "Recall",
    "check_captioned",
    "check_finite",
    "coco_folds",
    "fold_recalls",
    "i2t_ranks",
    "main_protocol",
    "mean_of_folds",
    "protocol_plan",
    "recall",
    "t2i_ranks",
]

COCO_5K_IMAGES = 5000  # a split of this many images (COCO's testall) is ranked as COCO 5K and 1K
PROTOCOLS = ("auto", "full", "1k")


def check_finite(scores: np.ndarray, block: int = 1024) -> None:
    """``HeiindexError`` unless every score is finite. A NaN compares false with everything, so
    a NaN score matrix ranked every text-to-image ground truth first (R@1 100) and a diverged
    model looked perfect. Checked ``block`` rows at a time: no mask as large as the matrix."""
    scores = np.asarray(scores)
    if scores.size == 0:
        return
    rows = scores.reshape(len(scores), -1) if scores.ndim else scores.reshape(1, 1)
    bad = sum(
        rows[s : s + block].size - int(np.count_nonzero(np.isfinite(rows[s : s + block])))
        for s in range(0, len(rows), block)
    )
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
        d["rsum"] = round(self.rsum, 10)  # a sum of three percentages: 197.84, not 197.83999999999997
        return d


def recall(ranks: np.ndarray) -> Recall:
    """Metrics from 1-based ranks (``inf`` for a ground truth that was never retrieved)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks")
    pct = [100 * int(np.count_nonzero(ranks <= k)) / ranks.size for k in (1, 5, 10)]  # one rounding: 73.62
    return Recall(pct[0], pct[1], pct[2], float(np.floor(np.median(ranks))), float(np.mean(ranks)))


def t2i_ranks(scores: np.ndarray, gt: np.ndarray, block: int = 1024) -> np.ndarray:
    """scores (n_caps, n_imgs), gt (n_caps,) image index per caption -> (n_caps,) ranks.

    Ties count against the ground truth (an equal score ranks above it). Rows are compared
    ``block`` captions at a time (no comparison matrix as large as the scores).
    """
    scores, gt = np.asarray(scores), np.asarray(gt)
    if scores.ndim != 2 or gt.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (n_caps, n_imgs) and gt (n_caps,), got {scores.shape} and {gt.shape}")
    if len(gt) and (gt.min() < 0 or gt.max() >= scores.shape[1]):
        raise ValueError(f"gt must hold image indices in [0, {scores.shape[1]}), got {gt.min()}..{gt.max()}")
    check_finite(scores)
    ranks = np.empty(len(gt))
    for s in range(0, len(gt), block):
        rows = scores[s : s + block]
        ranks[s : s + block] = (rows >= rows[np.arange(len(rows)), gt[s : s + block], None]).sum(axis=1)
    return ranks


def check_captioned(gt: np.ndarray, n_imgs: int) -> None:
    """``HeiindexError`` where a caption (``gt``: the image row of each) names none of the
    ``n_imgs`` images, or an image has no caption: image-to-text has no ground truth to rank for
    it (it counted as a miss, lowering R@K)."""
    gt = np.asarray(gt)
    if len(gt) and (gt.min() < 0 or gt.max() >= n_imgs):
        raise HeiindexError(f"a caption's image row lies outside the {n_imgs} images ranked")
    empty = np.flatnonzero(np.bincount(gt, minlength=n_imgs) == 0)
    if len(empty):
        raise HeiindexError(
            f"{len(empty)} of {n_imgs} images have no caption (image rows {name_some([str(r) for r in empty])}); "
            "image-to-text recall needs at least one per image"
        )


def i2t_ranks(scores: np.ndarray, gt: np.ndarray, block: int = 1024) -> np.ndarray:
    """scores (n_imgs, n_caps), gt (n_caps,) image row of each caption -> (n_imgs,) rank of each
    image's best-ranked caption: 1 + the captions of other images that score at least as high as
    its best one (ties count against the ground truth, as in ``t2i_ranks``). Every image must
    have a caption (``check_captioned``). Rows are compared ``block`` images at a time."""
    scores, gt = np.asarray(scores), np.asarray(gt)
    if scores.ndim != 2 or gt.shape != (scores.shape[1],):
        raise ValueError(f"scores must be (n_imgs, n_caps) and gt (n_caps,), got {scores.shape} and {gt.shape}")
    check_finite(scores)
    n_imgs, n_caps = scores.shape
    check_captioned(gt, n_imgs)
    own = scores[gt, np.arange(n_caps)]  # each caption's score against its own image
    best = np.full(n_imgs, -np.inf)
    np.maximum.at(best, gt, own)
    ties_own = np.bincount(gt, weights=own == best[gt], minlength=n_imgs)  # its captions at its best score
    at_least = np.empty(n_imgs)
    for s in range(0, n_imgs, block):
        at_least[s : s + block] = (scores[s : s + block] >= best[s : s + block, None]).sum(axis=1)
    return at_least - ties_own + 1


def coco_folds(n_images: int, fold_size: int = 1000) -> list[tuple[int, int]]:
    """Image ranges of COCO 1K evaluation: consecutive folds of 1,000 images of ``testall``."""
    if n_images % fold_size:
        raise SettingError(
            "protocols", f"COCO 1K (`protocols` 1k) needs whole folds of {fold_size} images; this split has {n_images}"
        )
    return [(s, s + fold_size) for s in range(0, n_images, fold_size)]


def fold_recalls(scores: np.ndarray, gt: np.ndarray, folds: list[tuple[int, int]]) -> list[tuple[Recall, Recall]]:
    """(text to image, image to text) of each COCO 1K fold from the whole split's ``scores``
    (n_caps, n_imgs): each fold ranks its images (``folds``: image ranges, ``coco_folds``)
    against their captions only, a slice of the same matrix. ``mean_of_folds`` averages them."""
    scores, gt = np.asarray(scores), np.asarray(gt)
    out = []
    for start, stop in folds:
        rows = np.flatnonzero((gt >= start) & (gt < stop))
        sub, own = scores[rows, start:stop], gt[rows] - start
        out.append((recall(t2i_ranks(sub, own)), recall(i2t_ranks(sub.T, own))))
    return out


def mean_of_folds(results: list[dict]) -> dict:
    """COCO 1K's figures from its folds' results (JSON-able dicts of the same shape, as
    ``evaluate`` and ``bench`` make them): every number is the folds' mean (R@K, median and mean
    rank alike, as SCAN reports them; rounded at 10 decimals, so that the folds' rsums do not come
    back as 249.12000000000003), except that seconds are summed (``seconds_each`` pass by pass),
    a count every fold shares (images, candidates) is kept as the same int, a rank that is None
    (infinite) in any fold stays None, and lists of rows (a sweep) are averaged row by row. A
    ratio of summed seconds (a speed-up) is the caller's to compute again."""
    if not results:
        raise ValueError("no fold results to average")
    first = results[0]
    out: dict = {}
    for k, v in first.items():
        if isinstance(v, dict):
            out[k] = mean_of_folds([r[k] for r in results])
        elif isinstance(v, list) and all(isinstance(row, dict) for row in v):  # sweep rows; [] stays []
            out[k] = [mean_of_folds([r[k][i] for r in results]) for i in range(len(v))]
        elif k == "seconds_each":  # pass by pass, summed over the folds as seconds are
            out[k] = [sum(passes) for passes in zip(*(r[k] for r in results), strict=True)]
        elif any(r[k] is None for r in results):
            out[k] = None  # an infinite rank in some fold
        elif isinstance(v, int) and not isinstance(v, bool) and all(r[k] == v for r in results):
            out[k] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in results]
            out[k] = sum(vals) if k == "seconds" else round(float(np.mean(vals)), 10)
        else:
            out[k] = v
    return out


def check_protocols(protocols: str) -> None:
    if protocols not in PROTOCOLS:
        raise SettingError("protocols", f'protocols must be "auto", "full" or "1k", got {protocols!r}')


def protocol_plan(n_images: int, protocols: str) -> tuple[str | None, list[tuple[int, int]]]:
    """What a split of ``n_images`` is ranked under (``bench`` and ``evaluate`` alike): the name of
    the whole-split protocol ("5k" on a COCO-5K-sized split, else "full"; None for "1k" alone)
    and the COCO 1K folds ("1k", or "auto" on a COCO-5K-sized split; refused where the split is
    not whole folds)."""
    check_protocols(protocols)
    coco_5k = n_images == COCO_5K_IMAGES
    folds = coco_folds(n_images) if protocols == "1k" or (protocols == "auto" and coco_5k) else []
    whole = ("5k" if coco_5k else "full") if protocols in ("auto", "full") else None
    return whole, folds


def main_protocol(res: dict) -> dict:
    """The protocol of a result whose figures are also its top-level ``"t2i"`` and ``"i2t"``:
    COCO 5K, else the whole split, else COCO 1K (the folds' mean)."""
    return res.get("5k") or res.get("full") or res["1k"]
