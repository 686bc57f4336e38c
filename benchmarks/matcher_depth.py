"""Recall at depth N of exhaustive attention on a built index: how often the matcher itself
ranks the ground truth within its top N (the ceiling any first stage is judged against), and
the same for the index's Hamming ranking.

For each direction it prints, at each depth N, the fraction of queries whose ground truth the
matcher ranks within its top N and the fraction within the Hamming top N (every item ranked by
Hamming distance, a tie counted against the ground truth as in every heiindex rank; the bench's
candidate recall keeps FAISS's own cut inside a tie at the N-th distance, so it can be higher:
94.72% against 94.5% at N = 100 on coco-sim test); the smallest N
at which each reaches ``--target``; of the queries the Hamming top ``--n`` misses, how many the
matcher ranks within its top 1 / 10 / N (the ones re-ranking N candidates can lose in R@K); and
an upper bound for spending a mean of ``--n`` candidates unevenly (``binned_budget``): queries in
tenths by the spread of their top ``--n`` Hamming distances, each tenth its own N.
A text query has one ground-truth image; an image query counts its best-ranked caption.

    python benchmarks/matcher_depth.py [INDEX_DIR] [--depths 50,100,200] [--n 100] [--target 0.98]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from heiindex.bench import _Sub, candidate_ranks
from heiindex.evaluation import i2t_ranks, t2i_ranks
from heiindex.hamming import hamming_candidates
from heiindex.index import Index
from heiindex.scoring import exhaustive_scores


def hamming_ranks(ix: Index, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per direction: the 1-based rank of the ground truth in the Hamming ranking of every item
    (t2i per caption, i2t per image: its best-ranked caption), and the spread of each query's
    top ``n`` distances (distance of the ``n``-th minus that of the first)."""
    out = {}
    for direction, index, codes, n_items in (
        ("t2i", ix.image_index, ix.caption_codes(), ix.n_images),
        ("i2t", ix.caption_index, ix.image_codes(), ix.n_captions),
    ):
        dist, cand = hamming_candidates(index, codes, n_items)
        ranks, _ = candidate_ranks(direction, cand, -dist.astype(np.float64), ix.caption_image)
        out[direction] = (ranks, dist[:, n - 1] - dist[:, 0])
    return out


def smallest_depth(ranks: np.ndarray, target: float) -> int:
    """The smallest N with at least ``target`` of the ranks <= N."""
    return int(np.sort(ranks)[int(np.ceil(target * len(ranks))) - 1])


def binned_budget(ranks: np.ndarray, signal: np.ndarray, budget: int, bins: int = 10, step: int = 5):
    """An upper bound for spending ``budget`` candidates per query on average, unevenly: the
    queries are cut into ``bins`` groups of (nearly) equal size by ``signal``, and each group
    gets its own N (a multiple of ``step``, the groups' N averaging at most ``budget``), chosen
    exactly (dynamic programming) to find the most ground truths. Chosen on the very queries it
    is scored on, so no policy over these groups does better. Returns (recall, N per group,
    lowest signal first)."""
    groups = np.array_split(np.argsort(signal, kind="stable"), bins)
    units = budget * bins // step  # the groups' N summed, in steps
    # found[g, u]: ground truths of group g within its top u * step (u = 0 .. units)
    found = np.array([[int((ranks[g] <= u * step).sum()) for u in range(units + 1)] for g in groups])
    best = np.zeros(units + 1, dtype=np.int64)  # best[u]: most found by the groups so far within u steps
    picks = []
    for g in range(bins):
        # cand[u, v]: this group takes v of u steps, the groups before it u - v
        cand = np.full((units + 1, units + 1), -(10**9), dtype=np.int64)
        for u in range(units + 1):
            cand[u, : u + 1] = best[u - np.arange(u + 1)] + found[g, : u + 1]
        picks.append(cand.argmax(axis=1))
        best = cand.max(axis=1)
    n, u = [], units
    for g in reversed(range(bins)):
        v = int(picks[g][u])
        n.append(v * step)
        u -= v
    return float(best[units]) / len(ranks), n[::-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", nargs="?", default="data/coco-sim/index/test")
    ap.add_argument("--depths", default="50,100,200")
    ap.add_argument("--n", type=int, default=100, help="candidates re-ranked, for the misses' breakdown")
    ap.add_argument("--target", type=float, default=0.98)
    args = ap.parse_args()
    ix = Index.open(args.index)
    scores = exhaustive_scores(ix.model, _Sub(ix, np.arange(ix.n_images), np.arange(ix.n_captions)))
    matcher = {"t2i": t2i_ranks(scores, ix.caption_image), "i2t": i2t_ranks(scores.T, ix.caption_image)}
    hamming = hamming_ranks(ix, args.n)
    out = {}
    for direction in ("t2i", "i2t"):
        m, (h, spread) = matcher[direction], hamming[direction]
        recall, per_group = binned_budget(h, spread, args.n)
        missed = h > args.n
        out[direction] = {
            "recall_at_depth": {
                int(n): {"matcher": float((m <= int(n)).mean()), "hamming": float((h <= int(n)).mean())}
                for n in args.depths.split(",")
            },
            f"depth_for_{args.target}": {
                "matcher": smallest_depth(m, args.target),
                "hamming": smallest_depth(h, args.target),
            },
            f"hamming_misses_at_{args.n}": {
                "queries": int(missed.sum()),
                "of_queries": len(h),
                "matcher_rank_1": int((missed & (m <= 1)).sum()),
                "matcher_rank_le_10": int((missed & (m <= 10)).sum()),
                f"matcher_rank_le_{args.n}": int((missed & (m <= args.n)).sum()),
            },
            f"hamming_uneven_budget_{args.n}": {"recall": recall, "n_per_tenth_by_spread": per_group},
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
