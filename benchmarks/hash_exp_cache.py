"""Cache for the hash experiments (benchmarks/hash_exp.py): encoded splits and scored batches.

Encodes train/dev/test with the frozen matcher once (regions (n, 36, d), words (n, L, d)) and
scores ``--rounds`` passes of shuffled 128-caption training batches (caption indices into the
encoded train split, their images, the (images, captions) matcher score matrix), as
``collect_batches`` does, but with uniformly shuffled batches and the whole encoded regions and
words kept, so that any pooling / region-level model can train on the same records. Written to ``--out`` (default ``$HASH_EXP_CACHE``, else /tmp/hash-exp-cache),
where ``benchmarks/hash_exp*.py`` read it.

    python benchmarks/hash_exp_cache.py --rounds 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from hash_exp import CACHE  # benchmarks/ is on sys.path when this script runs

from heiindex.checkpoint import load_model
from heiindex.default_data import default_model_dir, ensure_coco_sim
from heiindex.encode import encode_split
from heiindex.store import SplitStore


def save_split(enc, path: Path) -> None:
    torch.save(
        {
            "regions": enc.regions.contiguous(),
            "words": enc.words.padded(),
            "lengths": enc.lengths.clone(),
            "caption_image": torch.from_numpy(enc.caption_image),
        },
        path,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CACHE, help="default: $HASH_EXP_CACHE or /tmp/hash-exp-cache")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(default_model_dir()).model.eval()
    root = ensure_coco_sim()
    for split in ("dev", "test", "train"):
        p = args.out / f"{split}.pt"
        if not p.exists():
            t0 = time.perf_counter()
            save_split(encode_split(model, SplitStore.open(root, split)), p)
            print(f"encoded {split} in {time.perf_counter() - t0:.0f} s", flush=True)
    tr = torch.load(args.out / "train.pt")
    words, lengths, cap_img, regions = tr["words"], tr["lengths"], tr["caption_image"], tr["regions"]
    n = len(lengths)
    for r in range(args.rounds):
        p = args.out / f"round{r}.pt"
        if p.exists():
            continue
        t0 = time.perf_counter()
        rng = np.random.default_rng([args.seed, 1000 + r])
        perm = torch.from_numpy(rng.permutation(n))
        recs = []
        with torch.no_grad():
            for s in range(0, n, args.batch_size):
                ci = perm[s : s + args.batch_size]
                if len(ci) < 2:
                    continue
                lens = lengths[ci]
                w = words[ci, : int(lens.max())]
                ii = cap_img[ci]
                sc = model.score(w, lens, regions[ii]).T.contiguous()  # (images, captions)
                recs.append({"caps": ci.clone(), "imgs": ii.clone(), "scores": sc})
        torch.save(recs, p)
        print(f"round {r}: {len(recs)} batches in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
