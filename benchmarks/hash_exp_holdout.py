"""Which side of the hash codes generalises worse: new captions or new images? (research script)

The codes reach 100% candidate recall@100 on their own training images and about 94-95% t2i on
dev and test, where both the images and the captions are new. This script trains one config of
``hash_exp.py`` with the last of each training image's five captions held out (its rows dropped
from every scored batch), then measures t2i candidate recall@100 against a gallery of 1,000
training images (the first 1,000, the size of dev and test) for:

- held-out captions of those images: new captions, seen images;
- their first captions, seen in training: the codes' fit;
- dev: new captions and new images.

If new captions of seen images stay near 100%, the limit is on the image side; if they fall to
about dev's level, it is the caption side.

    python benchmarks/hash_exp_holdout.py --config base256_r4 --threads 1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from hash_exp import CONFIGS, codes, load_records, load_split, recall_from_codes, train

HELD = 4  # which of an image's five captions is held out


def drop_held_out(records: list[dict]) -> list[dict]:
    """Each record without the rows (caption, its image, their score row and column) of a held-out
    caption (an image's five captions are rows 5i..5i+4 of the encoded train split, as on coco-sim)."""
    kept = []
    for rec in records:
        keep = rec["caps"] % 5 != HELD
        if int(keep.sum()) >= 2:
            kept.append({"caps": rec["caps"][keep], "imgs": rec["imgs"][keep], "scores": rec["scores"][keep][:, keep]})
    return kept


def gallery_recall(model, tr: dict, n_images: int, ordinal: int) -> float:
    """t2i candidate recall@100 of the ``ordinal``-th caption of each of the first ``n_images``
    training images, against those images' codes."""
    caps = torch.arange(n_images) * 5 + ordinal
    sub = {k: tr[k] for k in ("w_mean", "w_max", "words", "mask", "lengths")}
    sub = {k: v[caps] for k, v in sub.items()}
    sub.update({k: tr[k][:n_images] for k in ("regions", "r_mean", "r_max")})
    ic, tc = codes(model, sub)
    return recall_from_codes(ic, tc, torch.arange(n_images))["t2i"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base256_r4")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=1000, help="gallery size (the first training images)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    e = CONFIGS[args.config]
    if args.epochs:
        e = replace(e, epochs=args.epochs)
    tr, dev = load_split("train"), load_split("dev")
    if e.mix:
        raise SystemExit(f"{args.config}: mixed-image configs train through hash_exp.py only")
    records = drop_held_out(load_records(e.rounds))
    model, res = train(e, tr, dev, records, log=lambda m: print(m, flush=True))
    row = {
        "config": args.config,
        "held_out_ordinal": HELD,
        "best_epoch": res["best_epoch"],
        "new_captions_seen_images": gallery_recall(model, tr, args.images, HELD),
        "seen_captions_seen_images": gallery_recall(model, tr, args.images, 0),
        "dev_new_captions_new_images": res["dev"]["t2i"],
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
