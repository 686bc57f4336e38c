"""``heiindex bench``: exhaustive attention vs HEI (Hamming top-N + re-rank) vs Hamming alone.

For each protocol (the whole split; on ``testall`` also COCO 1K, the mean over 5 folds of
1,000 images) and each direction: R@1/5/10, median and mean rank, rsum, the fraction of
queries whose ground truth is among the N candidates, wall seconds of each stage (HEI's
include hashing its queries, as a new query pays) and the speed-up of HEI over exhaustive. The exhaustive score matrix serves both directions, so each
direction's exhaustive time is the time of that one matrix.
What this module must not do: print (the CLI renders the returned dict).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import attention
from .bench_settings import check_bench_settings
from .errors import DataError, HeiindexError, HeiindexWarning
from .evaluation import (
    check_captioned,
    check_finite,
    i2t_ranks,
    main_protocol,
    mean_of_folds,
    protocol_plan,
    recall,
    t2i_ranks,
)
from .hamming import hamming_distances, make_binary_index
from .index import Index
from .manifests import MANIFEST_FILE, read_json_object
from .plot import plot_sweep
from .scoring import exhaustive_scores
from .search import bench_depth, rerank_captions, rerank_images
from .settings import SettingError, require, require_flag
from .store import rows_of, sorted_ids

__all__ = [
    "candidate_metrics",
    "candidate_ranks",
    "rerank_direction",
    "run_bench",
    "run_sharded_bench",
    "warm_up",
]


def _negative_hamming(q_codes: np.ndarray, x_codes: np.ndarray) -> np.ndarray:
    """Scores that rank every item by its code alone (higher is nearer)."""
    out = hamming_distances(q_codes, x_codes)
    return np.negative(out, out=out)


def _ranks_of_first_hit(cand: np.ndarray, scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, float]:
    """Re-ranked candidate lists -> (1-based rank of the best-scored relevant item: 1 + the other
    candidates scoring at least as high, so ties count against the ground truth as in
    ``evaluation.t2i_ranks``; ``inf`` if none is a candidate; the fraction of queries with a
    relevant item among the candidates). Empty slots (id -1) never count, whatever their score:
    FAISS gives them INT_MAX distances in IVF but INT_MIN in HNSW."""
    valid = cand >= 0
    relevant = relevant & valid
    check_finite(scores[valid])  # a NaN would sort last: a diverged model's ranks, reported
    found = relevant.any(axis=1)
    best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)
    ahead = (valid & ~relevant & (scores >= best[:, None])).sum(axis=1)
    return np.where(found, ahead + 1.0, np.inf), float(np.mean(found))


def candidate_ranks(
    direction: str, cand: np.ndarray, scores: np.ndarray, caption_image: np.ndarray
) -> tuple[np.ndarray, float]:
    """Of candidate lists ``cand`` (q, n) ranked by ``scores``: the 1-based rank of each query's
    first ground truth (``inf`` if none is among them) and the fraction of queries with one."""
    return _ranks_of_first_hit(cand, scores, _relevant(direction, cand, caption_image))


def _relevant(direction: str, cand: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """``(q, n)`` bool: candidate ``cand[i, j]`` is a ground truth of query ``i``, empty slots
    (-1) never. ``caption_image``: the image row of each caption row. "t2i": the queries are
    the captions (in order), the candidates image rows; "i2t": the queries are the image rows
    0..q-1, the candidates caption rows."""
    if direction == "t2i":
        return (cand == caption_image[:, None]) & (cand >= 0)
    check_captioned(caption_image, len(cand))  # an image with no caption has nothing to find
    return (caption_image[np.maximum(cand, 0)] == np.arange(len(cand))[:, None]) & (cand >= 0)


def candidate_metrics(
    direction: str, cand: np.ndarray, scores: np.ndarray, hamming: np.ndarray, caption_image: np.ndarray, seconds
) -> dict:
    """Of candidate lists ``cand`` (q, n) with matcher ``scores`` and ``hamming`` distances:
    R@K ranked by score ("hei", taking ``seconds``), R@K ranked by Hamming distance within the
    candidates ("hamming") and the fraction of queries with a ground truth among the candidates.
    The sharded bench's figures; the unsharded bench ranks every item by Hamming distance for
    "hamming" (its median and mean ranks are over all items; R@1/5/10 are the same for n >= 10
    unless items at the ground truth's distance fall beyond the n-th candidate: FAISS cuts a
    tie at n, and those items, counted against the ground truth over all items, are not here)."""
    relevant = _relevant(direction, cand, caption_image)
    ranks, cand_recall = _ranks_of_first_hit(cand, scores, relevant)
    ham_ranks, _ = _ranks_of_first_hit(cand, -hamming.astype(np.float64), relevant)
    return {
        "hei": {**recall(ranks).to_dict(), "seconds": seconds},
        "hamming": {**recall(ham_ranks).to_dict(), "seconds": None},
        "candidate_recall": cand_recall,
        **candidates_found(cand),
    }


def candidates_found(cand: np.ndarray) -> dict:
    """How full candidate lists ``cand`` (q, slots) are: ``"candidate_slots"``, and
    ``"candidates_found"``, the mean per query of the slots not left empty (-1) by an approximate
    index's search; only those are re-ranked."""
    return {"candidate_slots": int(cand.shape[1]), "candidates_found": float((cand >= 0).sum(1).mean())}


@torch.no_grad()
def rerank_direction(
    direction: str, index: Index, sub: _Sub, img_codes: np.ndarray, cap_codes: np.ndarray, n: int, use_stored: bool
):
    """One direction of the HEI pass: the queries' codes search the other side's (the index's own
    binary index where ``use_stored``, else one made of the subset's codes), and the matcher
    re-ranks the ``n`` candidates (``Candidates``)."""
    feats = {"words": sub.words, "lengths": sub.lengths, "regions": sub.regions, "gram": sub.gram, "n": n}
    if direction == "t2i":  # captions search the image codes
        searched = index.image_index if use_stored else make_binary_index(img_codes)
        return rerank_images(index.model, searched, cap_codes, **feats)
    searched = index.caption_index if use_stored else make_binary_index(cap_codes)  # images search caption codes
    return rerank_captions(index.model, searched, img_codes, **feats)


def _hei(index: Index, sub: _Sub, img_rows: np.ndarray, cap_rows: np.ndarray, n: int, use_stored: bool) -> dict:
    """HEI in both directions over a subset (rows into the index's images / captions; ``sub``
    holds their features)."""
    row_in_sub = np.full(index.n_images, -1)
    row_in_sub[img_rows] = np.arange(len(img_rows))
    gt = row_in_sub[index.caption_image[cap_rows]]
    img_codes, cap_codes = index.image_codes()[img_rows], index.caption_codes()[cap_rows]
    out = {}
    for direction in ("t2i", "i2t"):
        # The stage pays for hashing its queries from their encoded features, as a new query does,
        # and searches with the codes the build stored for them: the same codes from float32
        # features (a test checks it), and still those where the index holds its features in
        # bfloat16, since a new query is hashed before that cast. Encoding the queries is timed
        # in neither stage: exhaustive scoring needs it as much. Where the build gave the images
        # prototype codes (heiindex.prototypes), image queries search with those, as a query by a
        # stored image does; describing them is a build cost, not timed here.
        t0 = time.perf_counter()
        if direction == "t2i":
            index.hash_captions(sub.words)
        else:
            index.hash_images(sub.regions)
        cand, scores, _ = rerank_direction(direction, index, sub, img_codes, cap_codes, n, use_stored)
        seconds = time.perf_counter() - t0
        ranks, cand_recall = candidate_ranks(direction, cand, scores, gt)
        out[direction] = {"ranks": ranks, "seconds": seconds, "candidate_recall": cand_recall, **candidates_found(cand)}
    out["gt"] = gt
    out["codes"] = (img_codes, cap_codes)
    return out


def versus_exhaustive(hei_ranks: np.ndarray, exhaustive_ranks: np.ndarray) -> dict:
    """What re-ranking only the candidates changed against scoring every item, per query:
    ``{"lost": {"r1", "r5", "r10"}, "gained": {...}}``, the percent of queries whose ground truth
    exhaustive scoring ranks within K and HEI does not ("lost": with the same scores, a ground
    truth among the candidates can only rank higher, so these are ground truths the Hamming
    search missed), and the reverse ("gained": items that outscored the ground truth and that the
    Hamming search left out). HEI's R@K is exhaustive's minus lost plus gained."""
    hei, ex = np.asarray(hei_ranks), np.asarray(exhaustive_ranks)
    out: dict = {"lost": {}, "gained": {}}
    for k in (1, 5, 10):
        out["lost"][f"r{k}"] = 100 * int(np.count_nonzero((ex <= k) & (hei > k))) / hei.size
        out["gained"][f"r{k}"] = 100 * int(np.count_nonzero((hei <= k) & (ex > k))) / hei.size
    return out


WARMUP_QUERIES = 64  # queries per direction in the bench's untimed warm-up, at least


def warmup_queries(n: int) -> int:
    """How many queries a direction the warm-up searches at depth ``n``: ``WARMUP_QUERIES``, or
    more where their pairs would fit the one chunk that re-ranking scores without sorting by
    length (``attention.ONE_CHUNK_PAIRS``), a path the timed passes do not take."""
    return max(WARMUP_QUERIES, attention.ONE_CHUNK_PAIRS // n + 1)


def warm_up(index: Index, n: int, exhaustive: bool = True, use_stored: bool = True) -> float:
    """One small untimed pass of each stage the bench times, so that no timed pass pays what a
    process pays once: CUDA loads each kernel on its first launch, and on an H200 the first HEI
    text-to-image pass of a process took 0.79 s against 0.12 s for the next (benchmarks/RESULTS.md,
    "GPU"); the bench's first timed pass is HEI's. The first captions search every image's codes
    and the first images every caption's, hashed and re-ranked at depth ``n`` as the timed passes
    are (``warmup_queries(n)`` of each). They search the stored indexes where ``use_stored``, else flat
    indexes of the codes, as the COCO 1K folds do. Exhaustive scoring (where ``exhaustive``)
    scores the first ``WARMUP_QUERIES`` images against the first as many captions. Returns its
    wall seconds; its results are dropped."""
    t0 = time.perf_counter()
    queries = warmup_queries(n)
    few_images, few_captions = np.arange(min(queries, index.n_images)), np.arange(min(queries, index.n_captions))
    img_codes, cap_codes = index.image_codes(), index.caption_codes()
    sub = _Sub(index, None, few_captions)
    index.hash_captions(sub.words)
    rerank_direction("t2i", index, sub, img_codes, cap_codes[few_captions], n, use_stored)
    sub = _Sub(index, few_images, None)
    index.hash_images(sub.regions)
    rerank_direction("i2t", index, sub, img_codes[few_images], cap_codes, n, use_stored)
    if exhaustive:
        block = np.arange(min(WARMUP_QUERIES, index.n_images)), np.arange(min(WARMUP_QUERIES, index.n_captions))
        exhaustive_scores(index.model, _Sub(index, *block))
    return time.perf_counter() - t0


def _timed(fn, *args):
    """``(fn(*args), its wall seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _seconds_of(passes: list[float]) -> dict:
    """A stage's ``seconds`` (its one pass), with ``seconds_each`` where it ran several (``--repeats``)."""
    return {"seconds": passes[0], **({"seconds_each": passes} if len(passes) > 1 else {})}


def _settle_timing(d: dict) -> None:
    """One direction's timing figures: each stage's seconds the median of its passes where it
    ran several (``seconds_each``; over COCO 1K folds, summed pass by pass), and the speed-up of
    HEI over exhaustive from them, where exhaustive ran."""
    for stage in ("exhaustive", "hei"):
        if "seconds_each" in d.get(stage, {}):
            d[stage]["seconds"] = float(np.median(d[stage]["seconds_each"]))
    if "exhaustive" in d:
        d["speedup"] = d["exhaustive"]["seconds"] / max(d["hei"]["seconds"], 1e-9)


def _protocol(
    index: Index,
    img_rows: np.ndarray,
    n: int,
    sweep: list[int],
    use_stored: bool,
    exhaustive: bool = True,
    repeats: int = 1,
) -> dict:
    cap_mask = np.isin(index.caption_image, img_rows)
    cap_rows = np.flatnonzero(cap_mask)
    sub = _Sub(index, img_rows, cap_rows)  # the protocol's features, sliced once for every pass
    hei = _hei(index, sub, img_rows, cap_rows, n, use_stored)
    gt = hei["gt"]
    img_codes, cap_codes = hei["codes"]
    res: dict = {"images": int(len(img_rows)), "captions": int(len(cap_rows)), "candidates": n}
    ex_ranks, ex_seconds = {}, None
    if exhaustive:  # ranked at once: one score matrix (captions x images) alive at a time
        ex_scores, ex_seconds = _timed(exhaustive_scores, index.model, sub)
        ex_ranks = {"t2i": t2i_ranks(ex_scores, gt), "i2t": i2t_ranks(ex_scores.T, gt)}
        del ex_scores
    # The seconds of every pass of each stage; _settle_timing turns them into the figures.
    runs = {"exhaustive": [ex_seconds], "t2i": [hei["t2i"]["seconds"]], "i2t": [hei["i2t"]["seconds"]]}
    for _ in range(repeats - 1):  # timed again, alternately, on a noisy machine (the ranks are the first pass's)
        again = _hei(index, sub, img_rows, cap_rows, n, use_stored)
        for direction in ("t2i", "i2t"):
            runs[direction].append(again[direction]["seconds"])
        if exhaustive:
            runs["exhaustive"].append(_timed(exhaustive_scores, index.model, sub)[1])
    ham, ham_seconds = _timed(_negative_hamming, cap_codes, img_codes)
    ham_ranks = {"t2i": t2i_ranks(ham, gt), "i2t": i2t_ranks(ham.T, gt)}
    del ham
    for direction in ("t2i", "i2t"):
        d = {}
        if ex_ranks:
            d["exhaustive"] = {**recall(ex_ranks[direction]).to_dict(), **_seconds_of(runs["exhaustive"])}
        d["hei"] = {**recall(hei[direction]["ranks"]).to_dict(), **_seconds_of(runs[direction])}
        d["hamming"] = {**recall(ham_ranks[direction]).to_dict(), "seconds": ham_seconds}
        d["candidate_recall"] = hei[direction]["candidate_recall"]
        d.update({key: hei[direction][key] for key in ("candidate_slots", "candidates_found")})
        if ex_ranks:
            d["versus_exhaustive"] = versus_exhaustive(hei[direction]["ranks"], ex_ranks[direction])
        _settle_timing(d)
        res[direction] = d
    if sweep:
        rows = []
        for m in sweep:
            h = _hei(index, sub, img_rows, cap_rows, m, use_stored)
            row = {"candidates": m}
            for direction in ("t2i", "i2t"):
                r = recall(h[direction]["ranks"])
                row[direction] = {
                    **r.to_dict(),
                    "candidate_recall": h[direction]["candidate_recall"],
                    "candidates_found": h[direction]["candidates_found"],
                    "seconds": h[direction]["seconds"],
                }
                if ex_ranks:
                    row[direction]["versus_exhaustive"] = versus_exhaustive(h[direction]["ranks"], ex_ranks[direction])
            rows.append(row)
        res["sweep"] = rows
    return res


class _Sub:
    """The slice of an index's encoded features that one protocol scores: the images of
    ``img_rows`` and the captions of ``cap_rows``, copied; all of a side (None, or every row in
    order) is the index's own features, not a copy."""

    def __init__(self, index: Index, img_rows: np.ndarray | None, cap_rows: np.ndarray | None) -> None:
        dev = index.regions.device
        if _every_row(img_rows, index.n_images):
            self.regions, self.gram = index.regions, index.gram
        else:
            img_t = torch.from_numpy(img_rows).to(dev)
            self.regions, self.gram = index.regions[img_t], index.gram[img_t]
        if _every_row(cap_rows, index.n_captions):
            self.words = index.words
        else:
            self.words = index.words.select(torch.from_numpy(cap_rows).to(dev))
        self.lengths = self.words.lengths


def _every_row(rows: np.ndarray | None, n: int) -> bool:
    """``rows`` is None or 0..n-1 in order."""
    return rows is None or (len(rows) == n and bool(np.array_equal(rows, np.arange(n))))


def _depth_limit(index: Index, full: bool, folds: list[tuple[int, int]]) -> tuple[int, str]:
    """The largest N the bench can rank: the smallest set a protocol ranks, the whole split
    (``full``) and / or each COCO 1K fold (its images, its captions); and why, where a fold sets it."""
    limit = min(index.n_images, index.n_captions) if full else None
    fold_limit = min(
        (min(e - s, int(np.isin(index.caption_image, np.arange(s, e)).sum())) for s, e in folds), default=None
    )
    if fold_limit is not None and (limit is None or fold_limit < limit):
        return fold_limit, " (a COCO 1K fold's size; `protocols` full benches only the whole split)"
    return limit, ""


def _check_depths(topk: int, sweep: list[int], limit: int, why: str) -> None:
    """``topk`` and every ``sweep`` value must lie in [1, ``limit``]; ``why``: why the limit is
    what it is, where a protocol sets it (naming ``protocols``). Every value out of range is named
    in one message, ``topk``'s first, the sweep's in ascending order (``check_bench_settings`` sorts
    them): one at a time, the README's example took four tries on a small index."""
    named = []
    for name, values in (("topk", [topk]), ("sweep", sweep)):
        bad = [n for n in values if n < 1 or n > limit]
        if bad:
            label = name if not named else f"`{name}`"  # the first bare, others quoted (heiindex.errors)
            shown = f"{bad[0]}" if len(bad) == 1 else f"values {', '.join(map(str, bad))}"
            named.append((name, f"{label} {shown}"))
    if named:
        raise SettingError(
            named[0][0],
            f"{' and '.join(text for _, text in named)} must lie in [1, {limit}] for this index{why}",
            also=(*(name for name, _ in named[1:]), "protocols"),
        )


def run_bench(
    index: Index,
    topk: int | None = None,
    sweep: list[int] | None = None,
    protocols: str = "auto",
    exhaustive: bool = True,
    repeats: int = 1,
    warmup: bool = True,
    plot: str | Path | None = None,
) -> dict:
    """Benchmark an opened index. ``protocols``: "auto" (whole split; plus COCO 1K folds when the
    split has 5,000 images, as ``testall``), "full" or "1k". ``repeats``: how many times HEI and
    exhaustive scoring are timed, alternately; each stage's ``seconds`` (and the speed-up) are
    then the median, and ``seconds_each`` lists every pass. ``topk``: N, the candidates HEI
    re-ranks; by default 100, or the largest the index allows where that is smaller.
    ``warmup``: first run ``warm_up`` (its seconds are ``"warmup_seconds"``; None without it), so
    that the timed passes are those of a process that has scored before. ``plot``: with
    ``sweep``, a .png path to draw the main protocol's sweep in (checked before any pass; its
    path is ``"plot"``; needs matplotlib). A plot that cannot be written, or that would go into
    the index's own folder after a rebuild replaced the build benched, is left out with a
    ``HeiindexWarning`` (no ``"plot"`` key); the figures come back all the same."""
    if getattr(index, "sharded", False):
        raise HeiindexError("run_bench benches one index; bench a sharded build with run_sharded_bench")
    if not isinstance(index, Index):  # a path failed on its .n_images
        raise HeiindexError(f"index must be an opened Index (Index.open(path)), got {type(index).__name__}")
    exhaustive, warmup = require_flag("exhaustive", exhaustive), require_flag("warmup", warmup)  # "no" ran them
    sweep, plot, repeats = check_bench_settings(sweep, plot, repeats, protocols)
    # before any pass: a float topk failed in the warm-up's search, named "candidates"
    topk = None if topk is None else require("topk", topk, integer=True)
    whole, folds = protocol_plan(index.n_images, protocols)
    full = whole is not None
    limit, why = _depth_limit(index, full, folds)
    topk = bench_depth(topk, limit)
    _check_depths(topk, sweep, limit, why)
    check_captioned(index.caption_image, index.n_images)  # before any pass, not after the first
    out: dict = {
        "split": index.manifest["split"],
        "index": str(index.path),
        **index.how_searched(),
        "prototypes": index.manifest.get("prototypes"),  # None: each image's own code
        # the timed passes search the stored indexes only where the whole split is benched
        "warmup_seconds": warm_up(index, topk, exhaustive, use_stored=full) if warmup else None,
    }
    if full:
        out[whole] = _protocol(
            index, np.arange(index.n_images), topk, sweep, use_stored=True, exhaustive=exhaustive, repeats=repeats
        )
    if folds:
        runs = [
            _protocol(index, np.arange(s, e), topk, sweep, use_stored=False, exhaustive=exhaustive, repeats=repeats)
            for s, e in folds
        ]
        out["1k"] = mean_of_folds(runs)
        out["1k"]["folds"] = len(runs)
        # The folds search flat indexes of their own codes, whatever the stored index's type.
        out["1k"]["index_type"] = "flat"
        for direction in ("t2i", "i2t"):  # from the summed seconds, not the mean of the folds' ratios
            _settle_timing(out["1k"][direction])
    primary = main_protocol(out)
    for direction in ("t2i", "i2t"):
        out[direction] = primary[direction]
    if plot is not None and _rebuilt_under(index, plot):
        warnings.warn(
            HeiindexWarning(
                f"the sweep plot {plot} was not written: {index.path} no longer holds the build benched (rebuilt "
                "or removed while the bench ran), and the plot would have stood beside another build's files; the "
                "bench's figures are those of the build opened"
            ),
            stacklevel=2,
        )
    elif plot is not None:
        try:
            out["plot"] = str(plot_sweep(primary["sweep"], plot))
        except OSError as exc:  # a full disk, say: the figures are kept and returned, the plot named
            warnings.warn(
                HeiindexWarning(
                    f"the sweep plot {plot} could not be written ({exc.strerror or exc}); the bench's figures "
                    "are complete without it"
                ),
                stacklevel=2,
            )
    return out


def _rebuilt_under(index: Index, plot: Path) -> bool:
    """Whether ``plot`` goes into ``index``'s own folder and that folder no longer holds the build
    opened (a rebuild swapped it in during the bench): its manifest on disk is not the one read."""
    if Path(plot).resolve().parent != index.path.resolve():
        return False
    try:
        return read_json_object(index.path / MANIFEST_FILE, "") != index.manifest
    except DataError:  # gone or unreadable: not the build opened either
        return True


def run_sharded_bench(engine, topk: int | None = None, warmup: bool = True) -> dict:
    """HEI and Hamming-alone R@K, both directions, over a sharded build.

    ``engine``: a ``ShardedIndex`` or ``heiindex.ray_engine.RayShardedIndex``. The queries are
    the stored encoded captions and images of all shards (as ``heiindex bench`` uses one index's);
    each shard answers every query of a direction in one batch (on Ray, all shards at once), with its own Hamming
    top-``topk`` (capped at the shard's size) re-ranked by the matcher; the candidates of all shards are merged per query and
    ranked by score (HEI) or by Hamming distance (Hamming alone), as ``heiindex bench`` ranks one
    index's candidates. Exhaustive scoring is not part of it (bench the unsharded build for it).
    ``topk`` by default: 100, or the largest the build allows where that is smaller. ``warmup``:
    first an untimed pass of a few queries a direction, as ``heiindex.bench.warm_up`` (its
    seconds are ``"warmup_seconds"``; None without it).
    """
    if not getattr(engine, "sharded", False):  # an Index failed on its .bench_metas
        raise HeiindexError(
            f"run_sharded_bench benches a sharded build (ShardedIndex, RayShardedIndex), got {type(engine).__name__}; "
            "bench one index with run_bench"
        )
    warmup = require_flag("warmup", warmup)  # "no" ran the warm-up
    metas = engine.bench_metas()
    img_sizes = [len(m["image_ids"]) for m in metas]
    cap_sizes = [len(m["caption_image_ids"]) for m in metas]
    limit = max(sum(img_sizes), sum(cap_sizes))  # each direction's shards are capped at their own size
    # a float topk passed the range check and failed in the warm-up's search, named "candidates"
    topk = bench_depth(None if topk is None else require("topk", topk, integer=True), limit)
    if not 1 <= topk <= limit:
        raise SettingError("topk", f"topk {topk} must lie in [1, {limit}] for this index (its images or captions)")
    image_ids = np.concatenate([m["image_ids"] for m in metas])
    caption_image = rows_of(sorted_ids(image_ids), np.concatenate([m["caption_image_ids"] for m in metas]))
    check_captioned(caption_image, len(image_ids))  # before any pass, not after the first
    img_off, cap_off = np.cumsum([0, *img_sizes]), np.cumsum([0, *cap_sizes])

    warmup_seconds = None
    if warmup:  # each shard's depth is capped at its size: the smallest shard's sets the queries
        t0 = time.perf_counter()
        engine.bench_captions(topk, warmup_queries(min(topk, *img_sizes)))
        engine.bench_images(topk, warmup_queries(min(topk, *cap_sizes)))
        warmup_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_shard = engine.bench_captions(topk)
    t2i = _merge_candidates(per_shard, img_off)
    t_t2i = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_shard = engine.bench_images(topk)
    i2t = _merge_candidates(per_shard, cap_off)
    t_i2t = time.perf_counter() - t0

    out = {
        "split": engine.manifest["split"],
        "index": str(engine.path),
        "shards": len(metas),
        "engine": type(engine).__name__,
        "images": int(len(image_ids)),
        "captions": int(len(caption_image)),
        "candidates": topk,
        "shard_images": img_sizes,  # each shard's N is capped at its size, in each direction
        "shard_captions": cap_sizes,
        "prototypes": engine.manifest.get("prototypes"),  # None: each image's own code
        "warmup_seconds": warmup_seconds,
        # Every shard has one hash module. A key missing (None) is one that the actors of an older
        # heiindex, still serving, do not report.
        "bits": metas[0].get("bits"),
        # each shard's, as run_bench gives one index's (Index.search_breadth; on Ray, its actor's threads)
        **{key: [m.get(key) for m in metas] for key in ("index_type", "search_breadth", "threads", "device", "dtype")},
    }
    for direction, (cand, scores, dist), seconds in (("t2i", t2i, t_t2i), ("i2t", i2t, t_i2t)):
        out[direction] = candidate_metrics(direction, cand, scores, dist, caption_image, seconds)
    return out


def _merge_candidates(per_shard: list, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shard-local (rows, scores, hamming) per shard -> global rows side by side (-1 kept)."""
    rows = [np.where(ids >= 0, ids + offsets[s], -1) for s, (ids, _, _) in enumerate(per_shard)]
    return (
        np.concatenate(rows, 1),
        np.concatenate([p[1] for p in per_shard], 1),
        np.concatenate([p[2] for p in per_shard], 1),
    )
