"""Do the two re-ranking workers give the right gradients? A check of the bug 0801d32 fixed.

With exactly two torch threads, the pair scorer runs its chunks on two worker threads that write
one output tensor in place. While autograd recorded that, the gradients were sometimes wrong,
silently: autograd's bookkeeping of a tensor written in place from two threads at once is not
thread-safe. Since 0801d32 the chunks run one after another while a graph is recorded.

This script scores random (caption, image) pairs with gradients, on two threads, ``--runs``
times, and compares each run's scores and gradients with one single-threaded run:

- ``library``: as heiindex runs it now (serial while autograd records);
- ``workers``: the chunks forced onto the two workers, as before 0801d32.

    python benchmarks/autograd_workers.py --runs 20

Prints one JSON line per way: the runs whose gradients differ from the one-thread gradients
(beyond 1e-4) and the largest difference seen.
"""

from __future__ import annotations

import heiindex  # noqa: F401  # isort: skip  (first: sets OpenMP defaults before torch loads OpenMP)

import argparse
import json

import torch
from provenance import checkout  # benchmarks/ is on sys.path when a script here runs

from heiindex import attention, omp_threads
from heiindex.attention import AttentionConfig, score_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if omp_threads.thread_local_setter() is None:
        raise SystemExit("no per-thread torch thread count here: the two workers never run")
    torch.manual_seed(a.seed)
    n_caps, n_imgs, length, regions_per_image, d = 300, 40, 12, 36, 32
    lengths = torch.randint(3, length + 1, (n_caps,))
    words, regions = torch.randn(n_caps, length, d), torch.randn(n_imgs, regions_per_image, d)
    caps = torch.arange(n_caps).repeat_interleave(20)  # 6,000 pairs
    imgs = torch.randint(0, n_imgs, (len(caps),))
    weights = torch.linspace(0, 1, len(caps))
    cfg = AttentionConfig()

    def grads(threads: int):
        torch.set_num_threads(threads)
        w, r = words.clone().requires_grad_(True), regions.clone().requires_grad_(True)
        scores = score_pairs(cfg, w, lengths, r, caps, imgs, max_elements=20_000)
        (scores * weights).sum().backward()
        return w.grad, r.grad

    want = grads(1)
    real = attention._run_chunks
    print(json.dumps({"runs": a.runs, "pairs": len(caps), "torch": torch.__version__, "checkout": checkout()}))
    for way in ("library", "workers"):
        if way == "workers":  # as before 0801d32: the workers whether or not autograd records
            attention._run_chunks = lambda fn, chunks, graph: real(fn, chunks, False)
        try:
            diffs = []
            for _ in range(a.runs):
                got = grads(2)
                diffs.append(max(float((g - h).abs().max()) for g, h in zip(got, want, strict=True)))
        finally:
            attention._run_chunks = real
        wrong = [i + 1 for i, diff in enumerate(diffs) if diff > 1e-4]
        print(json.dumps({"way": way, "wrong_runs": wrong, "largest_difference": max(diffs)}))


if __name__ == "__main__":
    main()
