"""Mixed training images scored by the matcher, for function matching (research script).

The hash codes fit their 4,000 training images perfectly and generalise to about 94-95% t2i
candidate recall@100 (``benchmarks/RESULTS.md``, hash function study). Distillation usually
generalises better when the student matches the teacher on many more inputs than the training
set holds. The frozen matcher can score any set of regions, so this script makes new images by
mixing two training images' regions and lets the matcher score them against the captions of
the same batch.

For every record of ``hash_exp_cache.py``'s rounds (128 captions, their images, the matcher's
(images, captions) scores) it draws a partner for each image (another image of the batch, by a
random permutation) and a share alpha ~ U(0, 1); each of the 36 region slots then takes the
image's own region with probability alpha, else the partner's region in that slot. It stores
the partner, the region mask and the matcher's scores of the mixed images against the batch's
captions in ``CACHE/mix{r}.pt``, aligned with ``round{r}.pt``; ``hash_exp.py``'s ``mix*``
configs read them.

    python benchmarks/hash_exp_mix.py --rounds 4
"""

from __future__ import annotations

import argparse
import time

import torch
from hash_exp import CACHE, mixed_regions  # benchmarks/ is on sys.path when this script runs

from heiindex.checkpoint import load_model
from heiindex.default_data import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    model = load_model(default_model_dir()).model.eval()
    tr = torch.load(CACHE / "train.pt")
    words, lengths, regions = tr["words"], tr["lengths"], tr["regions"]
    for r in range(args.rounds):
        p = CACHE / f"mix{r}.pt"
        if p.exists():
            continue
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(r)  # seed 0's: the file names carry no seed
        out = []
        with torch.no_grad():
            for rec in torch.load(CACHE / f"round{r}.pt"):
                ci, ii = rec["caps"], rec["imgs"]
                n = len(ii)
                partner = ii[torch.randperm(n, generator=gen)]
                alpha = torch.rand(n, 1, generator=gen)
                mask = torch.rand(n, regions.shape[1], generator=gen) < alpha
                lens = lengths[ci]
                sc = model.score(words[ci, : int(lens.max())], lens, mixed_regions(regions, ii, partner, mask))
                out.append({"partner": partner, "mask": mask, "scores": sc.T.contiguous()})  # (images, captions)
        torch.save(out, p)
        print(f"mix round {r}: {len(out)} batches in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
