"""Recall at depth N of exhaustive attention on a built index: how often the matcher itself
ranks the ground truth within the top N (the ceiling any first stage is judged against).

    python benchmarks/matcher_depth.py [INDEX_DIR]
"""

import sys

import numpy as np

from heiindex.bench import _Sub
from heiindex.evaluation import i2t_ranks, t2i_ranks
from heiindex.index import Index
from heiindex.scoring import exhaustive_scores

ix = Index.open(sys.argv[1] if len(sys.argv) > 1 else "data/coco-sim/index/test")
rows = np.arange(ix.n_images)
caps = np.arange(ix.n_captions)
S = exhaustive_scores(ix.model, _Sub(ix, rows, caps))
t = t2i_ranks(S, ix.caption_image)
i = i2t_ranks(S.T, ix.caption_image)
for n in (50, 100, 200):
    print(n, "exhaustive t2i R@N", (t <= n).mean(), "i2t R@N", (i <= n).mean())
