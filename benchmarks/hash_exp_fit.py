"""Database image codes fitted to the matcher's ranking of training captions (research script).

The hash study found the t2i loss on the image side: new captions of training images find their
images 98% of the time, new images only 94-95% (``hash_exp_holdout.py``). Caption codes
generalise; the image side does not. At build time the database images are known, and the
frozen matcher can score them against the training captions. Here each database image's code is
a free vector, fitted so that the training captions, used as stand-in queries with their fixed
binary codes, rank the database images as the matcher ranks them:

    loss = t2i_w * mean_c KL(softmax_i(S[i, c] / tau_s) || softmax_i(B_c . tanh(V_i) / (bits * tau_h)))
         + i2t_w * the same per image over the training captions

``S`` is the matcher's (images, training captions) score matrix (``hash_exp_proto.py``'s cache),
``B_c`` a training caption's sign code under the committed module, ``V`` starts at the module's
pre-sign image outputs. The image code is sign(V). The split's own captions are never used but
to measure candidate recall@100 after the fit (run on dev to choose, on test once).

    python benchmarks/hash_exp_fit.py --split dev --tau-s 0.02 --tau-h 0.05 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch
from hash_exp import load_split, recall_from_codes
from hash_exp_proto import caption_outputs, train_caption_scores

from heiindex.default_data import default_hash_dir
from heiindex.hash_folder import load_hash


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0, -1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--tau-s", type=float, default=0.02, help="temperature on the matcher's scores")
    ap.add_argument("--tau-h", type=float, default=0.05, help="temperature on the code similarity (in [-1, 1])")
    ap.add_argument("--t2i-w", type=float, default=1.0)
    ap.add_argument("--i2t-w", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4000, help="training captions per step")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr, db = load_split("train"), load_split(args.split)
    with torch.no_grad():
        scores = train_caption_scores(args.split, db, tr)  # (images, training captions)
        mod = load_hash(default_hash_dir()).module.eval()
        img = mod.image_hash(mod.pool_images(db["regions"]))
        b_tr = sign(caption_outputs(mod, tr))
        cap_codes = sign(caption_outputs(mod, db))[:, None]
    bits = img.shape[1]
    r = recall_from_codes(sign(img)[:, None], cap_codes, db["caption_image"])
    print(f"{args.split} own codes: t2i {100 * r['t2i']:.1f} i2t {100 * r['i2t']:.1f}", flush=True)
    v = img.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n_cap = b_tr.shape[0]
    target_t2i = torch.log_softmax(scores / args.tau_s, dim=0)  # per caption, over the images
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        caps = torch.randperm(n_cap, generator=gen)[: args.batch]
        sim = torch.tanh(v) @ b_tr[caps].T / (bits * args.tau_h)  # (images, batch)
        loss = torch.zeros(())
        if args.t2i_w:
            t = target_t2i[:, caps]
            loss = loss + args.t2i_w * (t.exp() * (t - torch.log_softmax(sim, 0))).sum(0).mean()
        if args.i2t_w:
            t = torch.log_softmax(scores[:, caps] / args.tau_s, dim=1)
            loss = loss + args.i2t_w * (t.exp() * (t - torch.log_softmax(sim, 1))).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                r = recall_from_codes(sign(v)[:, None], cap_codes, db["caption_image"])
                flips = float((sign(v) != sign(img)).float().sum(1).mean())
            print(
                f"{args.split} step {step}: loss {loss.item():.4f} t2i {100 * r['t2i']:.1f} "
                f"i2t {100 * r['i2t']:.1f} (bits changed per image {flips:.1f}; "
                f"{time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
