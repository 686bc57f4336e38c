"""Sharded builds on one machine: 1, 2 and 4 shards, in-process vs Ray, query latency and throughput.

Builds the coco-sim test split (1,000 images, 5,000 captions; simulated image features) with the
default model and hash module into 1, 2 and 4 shards under a temporary folder, then times the
same text queries (real COCO captions) one after another against ``ShardedIndex`` (in process)
and ``RayShardedIndex`` (one actor per shard on a local Ray with num_cpus=2, one torch thread per
actor). On 2 cores Ray can only add overhead; the point is its measured cost per query, and that
its answers are the in-process ones (same ids in the same order on every query here; scores
agree to float rounding, since the actors run torch on one thread and this process on two, so
products are summed in another order; with equal thread counts they are identical: tests).

    python benchmarks/shards.py [--queries 200] [--candidates 100] [--shards 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from heiindex import default_data as dd
from heiindex.shards import ShardedIndex, write_shards

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = REPO / "data" / "coco-captions" / "testall_caps.txt"


def timed(index, queries: list[str], k: int, candidates: int) -> tuple[list[float], list]:
    ms, results = [], []
    for text in queries:
        t0 = time.perf_counter()
        results.append(index.search(text, k, candidates))
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms, results


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.median(a)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
        "queries_per_s": round(1e3 * len(a) / float(a.sum()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    import ray

    from heiindex.ray_engine import RayShardedIndex

    root = dd.ensure_coco_sim()
    lines = CAPTIONS.read_text().splitlines()
    queries = lines[:: len(lines) // args.queries][: args.queries]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="heiindex-bench")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in (int(x) for x in args.shards.split(",")):
            out = Path(tmp) / f"shards-{s}"
            t0 = time.perf_counter()
            write_shards(root, "test", dd.default_model_dir(), dd.default_hash_dir(), out, s, index_type="flat")
            build_s = time.perf_counter() - t0
            local = ShardedIndex.open(out)
            timed(local, queries[: args.warmup], args.k, args.candidates)
            ms_local, res_local = timed(local, queries, args.k, args.candidates)
            served = RayShardedIndex(out, threads=1)
            timed(served, queries[: args.warmup], args.k, args.candidates)
            ms_ray, res_ray = timed(served, queries, args.k, args.candidates)
            pairs = list(zip(res_local, res_ray, strict=True))
            same_ids = all([h.id for h in a.results] == [h.id for h in b.results] for a, b in pairs)
            score_diff = max(
                abs(x.score - y.score) for a, b in pairs for x, y in zip(a.results, b.results, strict=True)
            )
            row = {
                "shards": s,
                "build_s": round(build_s, 1),
                "in_process": summary(ms_local),
                "ray": summary(ms_ray),
                "ray_overhead_ms_p50": round(float(np.median(ms_ray) - np.median(ms_local)), 2),
                "ray_ids_equal_in_process": same_ids,
                # Actors run torch on 1 thread, this process on 2: products sum in another order.
                "ray_max_score_difference": score_diff,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            for a in served.actors:
                ray.kill(a)
            del local, served
    ray.shutdown()
    print(f"{len(queries)} text queries, N = {args.candidates}, k = {args.k}, coco-sim test (1,000 images)")
    print(
        "| shards | in-process p50 ms | in-process q/s | Ray p50 ms | Ray q/s | Ray overhead p50 ms "
        "| Ray ids = in-process | max score difference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["in_process"], r["ray"]
        print(
            f"| {r['shards']} | {a['p50_ms']} | {a['queries_per_s']} | {b['p50_ms']} | {b['queries_per_s']} "
            f"| {r['ray_overhead_ms_p50']} | {r['ray_ids_equal_in_process']} | {r['ray_max_score_difference']:.1e} |"
        )


if __name__ == "__main__":
    main()
