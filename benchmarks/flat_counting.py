"""FAISS flat binary search: its heap against its counting search (``use_heap = False``).

``heiindex.hamming.hamming_candidates`` searches an ``IndexBinaryFlat`` by counting where N is at
least 1 / ``COUNTING_SHARE`` of the codes and the counters fit ``COUNTING_BYTES``
(``counting_search``). This times both ways on the same index and queries, alternated in one
process (``--repeats`` rounds, the order flipped every round), checks that they return the same
distances and ids, and prints the ratio heap / counting of the fastest pass of each, and what
heiindex picks.

``--index PATH``: the two searches of ``heiindex bench`` on a built index (its caption codes
search its image index, t2i, and its image codes its caption index, i2t), at ``--topk``.
Otherwise random codes, ``--cases`` of codes x queries, at each of ``--bits`` and ``--topk``:
codes drawn around 64 random centres with each bit flipped with probability 0.15, so that many
items lie at each distance, as trained codes do.

    python benchmarks/flat_counting.py --index data/coco-sim/index/test --topk 100
    python benchmarks/flat_counting.py --cases 1000x5000,5000x1000,100000x200,1000000x20 --bits 64,256 --topk 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from heiindex.hamming import counting_search, make_binary_index, stored_codes  # heiindex first: its OpenMP settings


def clustered_codes(rng: np.random.Generator, n: int, bits: int, centres: np.ndarray) -> np.ndarray:
    flips = np.packbits(rng.random((n, bits)) < 0.15, axis=1)
    return centres[rng.integers(0, len(centres), n)] ^ flips


def compare(index, queries: np.ndarray, topk: int, repeats: int) -> dict:
    """Both ways ``repeats`` times each, alternated; the answers must agree."""
    seconds = {"heap": [], "counting": []}
    answers = {}
    for r in range(repeats):
        for way in ("heap", "counting") if r % 2 == 0 else ("counting", "heap"):
            index.use_heap = way == "heap"
            t0 = time.perf_counter()
            answers[way] = index.search(queries, topk)
            seconds[way].append(time.perf_counter() - t0)
    same = all(np.array_equal(a, b) for a, b in zip(answers["heap"], answers["counting"], strict=True))
    if not same:
        raise SystemExit(f"the two searches disagree at top-{topk} over {index.ntotal} codes")
    return {
        "codes": int(index.ntotal),
        "queries": len(queries),
        "bits": int(index.d),
        "topk": topk,
        "heap_s": seconds["heap"],
        "counting_s": seconds["counting"],
        "ratio_min": min(seconds["heap"]) / min(seconds["counting"]),
        "ratio_median": statistics.median(seconds["heap"]) / statistics.median(seconds["counting"]),
        "heiindex_counts": counting_search(index, topk),
        "same_answer": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", help="a built heiindex index folder: the bench's two searches")
    ap.add_argument("--cases", default="1000x5000,5000x1000,100000x200", help="codes x queries, comma-separated")
    ap.add_argument("--bits", default="64,256")
    ap.add_argument("--topk", default="10,100,1000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="FAISS's OpenMP threads (default: as heiindex leaves them)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    topks = [int(k) for k in args.topk.split(",")]
    rows = []
    if args.index:
        from heiindex.index import Index

        index = Index.open(args.index)
        img, cap = stored_codes(index.image_index), stored_codes(index.caption_index)
        for label, searched, queries in (("t2i", index.image_index, cap), ("i2t", index.caption_index, img)):
            if not isinstance(searched, faiss.IndexBinaryFlat):
                raise SystemExit(f"{args.index}: its {label} search is not over a flat index")
            rows += [{"case": label, **compare(searched, queries, k, args.repeats)} for k in topks]
    else:
        rng = np.random.default_rng(0)
        for case in args.cases.split(","):
            n_codes, n_queries = (int(x) for x in case.split("x"))
            for bits in (int(b) for b in args.bits.split(",")):
                centres = rng.integers(0, 256, (64, bits // 8), dtype=np.uint8)
                flat = make_binary_index(clustered_codes(rng, n_codes, bits, centres), "flat")
                queries = clustered_codes(rng, n_queries, bits, centres)
                rows += [{"case": case, **compare(flat, queries, k, args.repeats)} for k in topks if k <= n_codes]
    print(
        "| case | codes | queries | bits | top-k | heap s (min) | counting s (min) | heap / counting, min | median | heiindex counts |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['codes']:,} | {r['queries']:,} | {r['bits']} | {r['topk']} | {min(r['heap_s']):.3f} | "
            f"{min(r['counting_s']):.3f} | {r['ratio_min']:.2f} | {r['ratio_median']:.2f} | {'yes' if r['heiindex_counts'] else 'no'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
