"""Exhaustive SCAN scoring: heiindex's batched exact form against SCAN's per-caption loop.

The baseline (``benchmarks/reference.py``) is written from the formula the way SCAN's
evaluation computes it: for each caption, over shards of 128 images, expand the caption, attend
(materialising the attended context vectors), cosine, aggregate. Both run on the same random
features (1,000 images x 36 regions, 5,000 captions with COCO-like lengths, d = 256 by
default) in one process; the baseline scores a subset of the captions and is extrapolated
linearly (its cost is linear in the number of captions), which the output says.

    python benchmarks/scoring.py [--d 1024] [--captions 5000] [--images 1000] [--ref-captions 100]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from reference import l2norm, reference_t2i  # benchmarks/reference.py

from heiindex.attention import AttentionConfig, region_gram, score_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=5000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--ref-captions", type=int, default=100, help="captions the baseline scores (then extrapolated)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    regions = l2norm(torch.randn(args.images, 36, args.d, generator=g), -1)
    lengths = torch.randint(10, 18, (args.captions,), generator=g)  # COCO: ~13 tokens with <start>/<end>
    words = l2norm(torch.randn(args.captions, int(lengths.max()), args.d, generator=g), -1)
    cfg = AttentionConfig("t2i", "clipped_l2norm", "lse", 6.0, 9.0)

    t0 = time.perf_counter()
    fast = score_block(cfg, words, lengths, regions, region_gram(regions))
    fast_s = time.perf_counter() - t0

    n_ref = min(args.ref_captions, args.captions)
    t0 = time.perf_counter()
    ref = reference_t2i(words[:n_ref], lengths[:n_ref], regions)
    ref_s = (time.perf_counter() - t0) * args.captions / n_ref
    err = float(((fast[:n_ref] - ref).abs() / ref.abs().clamp_min(1e-12)).max())
    print(
        json.dumps(
            {
                "images": args.images,
                "captions": args.captions,
                "d": args.d,
                "threads": torch.get_num_threads(),
                "heiindex_exhaustive_seconds": round(fast_s, 2),
                "reference_loop_seconds": round(ref_s, 2),
                "reference_extrapolated": n_ref < args.captions,
                "reference_query_fraction": n_ref / args.captions,
                "speedup": round(ref_s / fast_s, 1),
                "max_relative_difference_fp32": err,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
