"""How HEI re-ranking and exhaustive scoring scale with CPU threads, on one built index.

Re-ranking runs its chunks one after another on torch's threads, or with exactly two threads on
two single-threaded workers (``attention._for_each``). This
script times, in one process, the bench's HEI pass (both directions, N candidates, the whole
split) that way and with thread pools swapped in, and the exhaustive pass, so that the ratios
come from one run on one machine:

    python benchmarks/threads.py --index data/coco-sim/index/test --threads 16,8,4,2,1

Configurations (``--configs``, comma-separated, each run at every ``--threads`` count T):
``library`` (as the library is), ``serial`` (one chunk at a time on T threads),
``workers:W`` (W chunks at once, each worker on T // W torch threads, set for itself alone
through ``heiindex.omp_threads``; ``workers:all``, one worker per thread, was the library's way
from ef4d83d to 5b4693e, with counts set as ``torch-set:T`` sets them), ``torch-set:W`` (the same, each worker setting its count with
``torch.set_num_threads``, as the library's workers did before c10a763; ``heiindex.omp_threads``
says why they no longer do), ``exhaustive`` (every pair, at the ``--exhaustive-threads`` counts;
since 0801d32 its chunks of captions take the same workers as re-ranking's with two threads) and
``exhaustive-serial`` (its chunks one at a time on torch's threads, as before). For the HEI
rows, ``concurrency`` is the time summed inside the chunks over the wall time: how many chunks
ran at once, on average. At the end come the ratios, per thread count: each configuration's time
over ``library``'s, and the exhaustive time over ``library``'s HEI time.

heiindex is imported first, as the CLI does, so that its OpenMP defaults (``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT``: see ``heiindex/__init__.py``) reach torch's and faiss's runtimes; set either
variable to measure another policy.
"""

from __future__ import annotations

import heiindex  # noqa: F401  # isort: skip  (first: sets OpenMP defaults before torch loads OpenMP)

import argparse
import json
import os
import threading
import time

import numpy as np
import torch
from provenance import checkout  # benchmarks/ is on sys.path when a script here runs

from heiindex import attention, omp_threads
from heiindex.bench import _hei, _Sub
from heiindex.index import Index
from heiindex.scoring import exhaustive_scores

_FOR_EACH = attention._for_each
_SET_WORKER_THREADS = omp_threads.set_worker_threads


def _serial(fn, chunks):
    """One chunk at a time on torch's threads."""
    for sel in chunks:
        fn(sel)


def _pool(workers: int):
    """A ``_for_each`` that runs ``workers`` chunks at once, each on torch threads // workers."""

    def for_each(fn, chunks):
        threads = torch.get_num_threads()
        w = min(workers, threads, len(chunks))
        if w <= 1:
            _serial(fn, chunks)
        else:
            attention._pool_map(fn, chunks, workers=w, threads_each=threads // w)

    return for_each


def _torch_set_pool(workers: int):
    """``_pool``, each worker setting its count with ``torch.set_num_threads``, as the library's
    workers did before c10a763 (which also sets the process default: the caller's count is set
    again after)."""
    pool = _pool(workers)

    def for_each(fn, chunks):
        threads = torch.get_num_threads()
        try:
            omp_threads.set_worker_threads = torch.set_num_threads  # the pool's initializer, for this call
            pool(fn, chunks)
        finally:
            omp_threads.set_worker_threads = _SET_WORKER_THREADS
            torch.set_num_threads(threads)

    return for_each


def _hei_row(index: Index, sub: _Sub, topk: int, for_each) -> dict:
    stats = {"inside": 0.0, "chunks": 0}
    lock = threading.Lock()  # workers add to the sums

    def timed_for_each(fn, chunks):
        def timed(sel):
            t0 = time.perf_counter()
            fn(sel)
            with lock:
                stats["inside"] += time.perf_counter() - t0
                stats["chunks"] += 1

        for_each(timed, chunks)

    attention._for_each = timed_for_each
    try:
        h = _hei(index, sub, np.arange(index.n_images), np.arange(len(index.caption_image)), topk, True)
    finally:
        attention._for_each = _FOR_EACH
    t2i, i2t = h["t2i"]["seconds"], h["i2t"]["seconds"]
    return {
        "t2i": round(t2i, 3),
        "i2t": round(i2t, 3),
        "chunks": stats["chunks"],
        "concurrency": round(stats["inside"] / max(t2i + i2t, 1e-9), 2),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Per thread count: each HEI configuration's mean time (t2i + i2t, over its passes) as a
    multiple of ``library``'s, and the exhaustive pass's time over ``library``'s HEI time (the
    bench's speed-up, both directions together). Only counts that have a ``library`` row."""
    totals: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        seconds = row["seconds"] if row["config"].startswith("exhaustive") else row["t2i"] + row["i2t"]
        totals.setdefault((row["threads"], row["config"]), []).append(seconds)
    out = []
    for (t, config), values in sorted(totals.items()):
        base = totals.get((t, "library"))
        if base is None or config == "library":
            continue
        mean, lib = sum(values) / len(values), sum(base) / len(base)
        key = f"{config.replace('-', '_')}_over_library_hei" if config.startswith("exhaustive") else "time_vs_library"
        out.append({"threads": t, "config": config, key: round(mean / lib, 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--threads", default="16,8,4,2,1")
    ap.add_argument("--configs", default="library,serial,workers:all,workers:2,exhaustive")
    ap.add_argument(
        "--exhaustive-threads", default="", help="thread counts for the exhaustive pass (default: the first)"
    )
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--no-warmup", action="store_true", help="time the first pass too, as a fresh `bench` does")
    ap.add_argument("--budget", type=float, default=1e9, help="start no new configuration after this many seconds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    start = time.perf_counter()
    index = Index.open(a.index)
    sub = _Sub(index, np.arange(index.n_images), np.arange(len(index.caption_image)))
    threads = [int(t) for t in a.threads.split(",")]
    ex_threads = [int(t) for t in a.exhaustive_threads.split(",")] if a.exhaustive_threads else threads[:1]
    meta = {
        "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "torch": torch.__version__,
        "index": a.index,
        "topk": a.topk,
        "warmup": not a.no_warmup,
        "checkout": checkout(),
    }
    print(json.dumps(meta), flush=True)
    if not a.no_warmup:
        _hei_row(index, sub, min(a.topk, 20), _FOR_EACH)
    rows = []
    plan = [(c, t) for c in a.configs.split(",") for t in (ex_threads if c.startswith("exhaustive") else threads)]
    for config, t in plan:
        if time.perf_counter() - start > a.budget:
            print("budget spent", flush=True)  # once: every later row would start after it too
            break
        torch.set_num_threads(t)
        row = {"config": config, "threads": t}
        if config in ("exhaustive", "exhaustive-serial"):
            attention._for_each = _FOR_EACH if config == "exhaustive" else _serial
            try:
                t0 = time.perf_counter()
                exhaustive_scores(index.model, sub)
                row["seconds"] = round(time.perf_counter() - t0, 3)
            finally:
                attention._for_each = _FOR_EACH
        else:
            name, _, arg = config.partition(":")
            if name == "library" and not arg:
                for_each = _FOR_EACH
            elif name == "serial" and not arg:
                for_each = _serial
            elif name == "workers" and (arg == "all" or arg.isdigit()):
                if omp_threads.thread_local_setter() is None:
                    raise SystemExit(f"{config}: no per-thread torch thread count on this install (torch-set:W runs)")
                for_each = _pool(t if arg == "all" else int(arg))
            elif name == "torch-set" and arg.isdigit():
                for_each = _torch_set_pool(int(arg))
            else:
                raise SystemExit(f"unknown configuration {config!r}")
            row.update(_hei_row(index, sub, a.topk, for_each))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:  # after every row, so that a run stopped at its time limit keeps what it measured
            with open(a.json, "w") as f:
                json.dump({**meta, "rows": rows, "ratios": ratios(rows)}, f, indent=1)
    for r in ratios(rows):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
