"""Database image codes from the training captions the matcher likes for them (research script).

The hash study found the codes' t2i loss on the image side: new captions of training images find
their images 98% of the time, new images only 94-95% (``hash_exp_holdout.py``). Caption codes
generalise; image codes do not. At build time the database images are known and the frozen
matcher can score them against the training captions, so each database image can take, beside
its own hash output, a prototype made of the caption side's outputs for the training captions
the matcher ranks highest for it:

    code_i = sign(alpha * u(img_i) + (1 - alpha) * u(sum_c w_c tanh(txt_c)))

over its top-K training captions c (``w`` uniform, or a softmax of the matcher's scores at
temperature ``--tau``), where ``u`` scales a vector to unit norm and ``img_i`` / ``txt_c`` are
the committed module's pre-sign outputs. The split's own captions are never used: they only
measure candidate recall@100 (run on dev to choose K and alpha, on test once). Needs
``hash_exp_cache.py``'s encoded splits; scores every database image against every training
caption (20M pairs on coco-sim, 68-72 s on 2 cores here), cached in the cache.

    python benchmarks/hash_exp_proto.py --split dev --k 5,10,20,50 --alpha 1,0.7,0.5,0.3,0
"""

from __future__ import annotations

import argparse
import time

import torch
from hash_exp import CACHE, load_split, recall_from_codes

from heiindex.checkpoint import load_model
from heiindex.default_data import default_hash_dir, default_model_dir
from heiindex.hash_folder import load_hash
from heiindex.prototypes import unit


@torch.no_grad()
def train_caption_scores(split: str, db: dict, tr: dict) -> torch.Tensor:
    """(database images, training captions) matcher scores, cached as ``CACHE/proto-{split}.pt``."""
    path = CACHE / f"proto-{split}.pt"
    if path.exists():
        return torch.load(path)
    matcher = load_model(default_model_dir()).model.eval()
    t0, n, out = time.perf_counter(), tr["words"].shape[0], []
    for s in range(0, n, 2000):
        lens = tr["lengths"][s : s + 2000]
        out.append(matcher.score(tr["words"][s : s + 2000, : int(lens.max())], lens, db["regions"]).T)
    scores = torch.cat(out, dim=1).contiguous()
    torch.save(scores, path)
    print(f"scored {scores.shape[0]} images x {n} training captions in {time.perf_counter() - t0:.0f} s", flush=True)
    return scores


def caption_outputs(mod, split: dict) -> torch.Tensor:
    """The hash module's pre-sign caption outputs (n, bits) of an encoded split, 2,500 at a time."""
    n = split["words"].shape[0]
    return torch.cat(
        [
            mod.text_hash(mod.pool_captions(split["words"][s : s + 2500], split["lengths"][s : s + 2500]))
            for s in range(0, n, 2500)
        ]
    )


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--k", default="5,10,20,50")
    ap.add_argument("--alpha", default="1,0.7,0.5,0.3,0")
    ap.add_argument("--tau", type=float, default=0.0, help="softmax temperature on the scores (0: uniform weights)")
    ap.add_argument(
        "--preselect",
        type=int,
        default=0,
        help="the matcher ranks only each image's M nearest training captions by Hamming distance (0: all)",
    )
    ap.add_argument(
        "--multi",
        action="store_true",
        help="K + 1 codes per image instead: its own, and its own mixed with each top-K caption's output "
        "(an image's distance is its nearest code's)",
    )
    args = ap.parse_args()
    if args.multi and args.tau:
        ap.error("--tau weights a prototype; --multi mixes each caption's output on its own (give one)")
    if args.preselect and max(int(v) for v in args.k.split(",")) > args.preselect:
        ap.error(f"--k must be at most --preselect {args.preselect}: the top k are chosen among the preselected")
    tr, db = load_split("train"), load_split(args.split)
    scores = train_caption_scores(args.split, db, tr)
    mod = load_hash(default_hash_dir()).module.eval()
    img = mod.image_hash(mod.pool_images(db["regions"]))  # (images, bits) pre-sign
    txt_tr = torch.tanh(caption_outputs(mod, tr))
    txt_db = caption_outputs(mod, db)
    cap_codes = torch.where(txt_db > 0, 1.0, -1.0)[:, None]
    if args.preselect:  # what a build would score: each image's M Hamming-nearest training captions
        near = (torch.where(img > 0, 1.0, -1.0) @ torch.where(txt_tr > 0, 1.0, -1.0).T).topk(args.preselect, dim=1)
        scores = torch.full_like(scores, float("-inf")).scatter_(1, near.indices, scores.gather(1, near.indices))
    for k in (int(v) for v in args.k.split(",")):
        top, idx = scores.topk(k, dim=1)
        w = torch.softmax(top / args.tau, dim=1) if args.tau else torch.full_like(top, 1 / k)
        proto = (w[..., None] * txt_tr[idx]).sum(1)
        for alpha in (float(v) for v in args.alpha.split(",")):
            if args.multi:
                mixed = torch.cat([unit(img)[:, None], alpha * unit(img)[:, None] + (1 - alpha) * unit(txt_tr[idx])], 1)
            else:
                mixed = (alpha * unit(img) + (1 - alpha) * unit(proto))[:, None]
            img_codes = torch.where(mixed > 0, 1.0, -1.0)
            r = recall_from_codes(img_codes, cap_codes, db["caption_image"])
            print(f"{args.split} K {k} alpha {alpha}: t2i {100 * r['t2i']:.1f} i2t {100 * r['i2t']:.1f}", flush=True)


if __name__ == "__main__":
    main()
