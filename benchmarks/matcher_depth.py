"""Recall at depth N of exhaustive attention on a built index: how often the matcher itself
ranks the ground truth within its top N (the ceiling any first stage is judged against).

    python benchmarks/matcher_depth.py [INDEX_DIR] [--depths 50,100,200]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from heiindex.bench import _Sub
from heiindex.evaluation import i2t_ranks, t2i_ranks
from heiindex.index import Index
from heiindex.scoring import exhaustive_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", nargs="?", default="data/coco-sim/index/test")
    ap.add_argument("--depths", default="50,100,200")
    args = ap.parse_args()
    ix = Index.open(args.index)
    scores = exhaustive_scores(ix.model, _Sub(ix, np.arange(ix.n_images), np.arange(ix.n_captions)))
    t2i = t2i_ranks(scores, ix.caption_image)
    i2t = i2t_ranks(scores.T, ix.caption_image)
    out = {
        int(n): {"t2i": float((t2i <= int(n)).mean()), "i2t": float((i2t <= int(n)).mean())}
        for n in args.depths.split(",")
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
