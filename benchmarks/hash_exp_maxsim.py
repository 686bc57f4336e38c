"""Binary late interaction (MaxSim) as a first stage: a research check for benchmarks/hash_exp.py.

Parameter-free: every region embedding and every real-word embedding of the frozen matcher,
rotated by one random orthogonal matrix and cut to its first ``b`` coordinates (above 256 bits:
``b`` Gaussian random projections), becomes a ``b``-bit code (sign). Score of (caption, image) = mean over the caption's words of the best
Hamming similarity (b - 2 * Hamming distance) over the image's 36 region codes; candidate
recall@100 both directions (i2t ranks captions by the same score). ``--faiss``: the candidate
generation a product would run, ColBERT-style: each word code fetches its k' nearest region
codes from a FAISS binary flat index over all region codes; the union of their images is ranked
by exact MaxSim and cut to 100 (t2i).

    python benchmarks/hash_exp_maxsim.py --split dev --bits 64,128,256 [--faiss 32,128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from hash_exp import CACHE, MODELS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="dev")
    ap.add_argument("--bits", default="256")
    ap.add_argument("--faiss", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--cascade",
        default="",
        help="saved hash_exp module names (comma-separated): each one's single-code Hamming top-M, "
        "re-ranked by binary MaxSim to 100",
    )
    ap.add_argument("--m", default="200,300,500")
    ap.add_argument("--models", type=Path, default=MODELS, help="where hash_exp.py --save put them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = torch.load(f"{CACHE}/{args.split}.pt")
    R, W, lens, ci = d["regions"], d["words"], d["lengths"], d["caption_image"]
    nI, nC, nR = R.shape[0], W.shape[0], R.shape[1]
    L = int(lens.max())
    W = W[:, :L]
    mask = torch.arange(L)[None] < lens[:, None]
    Q, _ = torch.linalg.qr(torch.randn(256, 256))
    G = torch.randn(256, 1024)  # above 256 bits: plain Gaussian projections (SimHash)

    def maxsim(wc: torch.Tensor, rc: torch.Tensor, cand=None) -> torch.Tensor:
        flat = rc.reshape(-1, rc.shape[-1])
        S = torch.empty(nC, nI)
        for s in range(0, nC, 250):
            c = torch.einsum("cld,xd->clx", wc[s : s + 250], flat).view(-1, L, nI, nR).amax(-1)
            m = mask[s : s + 250]
            S[s : s + 250] = c.masked_fill(~m[..., None], 0).sum(1) / m.sum(1, keepdim=True)
        return S

    def recall(S: torch.Tensor, pessimistic: bool = False) -> tuple[float, float]:
        """Optimistic: only strictly better items rank ahead of the ground truth; pessimistic:
        every other item with an equal score ranks ahead too (for i2t even the image's other
        captions, so that bound is looser than any tie-break). Binary MaxSim scores tie often, so
        the figure for any tie-break (FAISS: by id) lies between the two."""
        gt = S[torch.arange(nC), ci]
        ahead = (S >= gt[:, None]).sum(1) - 1 if pessimistic else (S > gt[:, None]).sum(1)
        t2i = float((ahead < 100).float().mean())
        ST = S.T.contiguous()
        own = ST[ci, torch.arange(nC)]

        def count(s):
            rows, g = ST[ci[s : s + 500]], own[s : s + 500, None]
            return (rows >= g).sum(1) - 1 if pessimistic else (rows > g).sum(1)

        rr = torch.cat([count(s) for s in range(0, nC, 500)])
        best = torch.full((nI,), 10**9).scatter_reduce(0, ci, rr, reduce="amin")
        return 100 * t2i, 100 * float((best < 100).float().mean())

    for b in (int(x) for x in args.bits.split(",")):
        t0 = time.perf_counter()
        P = Q[:, :b] if b <= 256 else G[:, :b]
        wc = torch.sign(W @ P)
        rc = torch.sign(R @ P)
        S = maxsim(wc, rc)
        t2i, i2t = recall(S)
        t2i_p, i2t_p = recall(S, pessimistic=True)
        print(
            f"{args.split} binary MaxSim {b} bits: t2i {t2i:.1f} i2t {i2t:.1f} with ties counted optimistically, "
            f"{t2i_p:.1f} / {i2t_p:.1f} pessimistically ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        for name in filter(None, args.cascade.split(",")):
            cascade(args, name, S, ci)
        if args.faiss:

            def pack(x):
                return np.packbits((x > 0).numpy().astype(np.uint8), axis=-1, bitorder="little")

            index = faiss.IndexBinaryFlat(b)
            index.add(np.ascontiguousarray(pack(rc.reshape(-1, b))))
            wflat = pack(wc[mask])  # real words only
            owner = torch.repeat_interleave(torch.arange(nC), lens)
            for kp in (int(x) for x in args.faiss.split(",")):
                t1 = time.perf_counter()
                _, ids = index.search(np.ascontiguousarray(wflat), kp)
                t_search = time.perf_counter() - t1
                img = torch.from_numpy(ids // nR)
                cand = torch.zeros(nC, nI, dtype=torch.bool)
                cand[owner[:, None].expand_as(img), img] = True
                Sc = S.masked_fill(~cand, -1e9)
                gt = Sc[torch.arange(nC), ci]
                hit = cand[torch.arange(nC), ci] & ((Sc > gt[:, None]).sum(1) < 100)
                print(
                    f"  faiss k'={kp}: union {float(cand.sum(1).float().mean()):.0f} images/caption (of {nI}), "
                    f"t2i recall@100 {100 * float(hit.float().mean()):.1f} (ties optimistic), search {t_search:.1f} s "
                    f"for {len(wflat)} word codes",
                    flush=True,
                )


def cascade(args, name: str, S: torch.Tensor, ci: torch.Tensor) -> None:
    """Hash top-M (exact Hamming, ties by row id) -> MaxSim top-100 inside the M, both directions."""
    from hash_exp import codes, load_module, load_split

    split = load_split(args.split)
    model = load_module(name, args.models)
    ic, tc = codes(model, split)
    b = ic.shape[-1]
    dist = (b - torch.einsum("ikb,jlb->jikl", ic, tc).flatten(2).amax(-1)) / 2  # (captions, images)
    nC, nI = dist.shape
    # id tie-break: add a tiny increasing offset
    dist_t = dist + torch.arange(nI)[None, :] * 1e-6
    dist_i = dist.T + torch.arange(nC)[None, :] * 1e-7
    for M in (int(x) for x in args.m.split(",")):
        top = dist_t.topk(min(M, nI), dim=1, largest=False).indices
        cand = torch.zeros(nC, nI, dtype=torch.bool).scatter_(1, top, True)
        Sc = S.masked_fill(~cand, -1e9)
        gt = Sc[torch.arange(nC), ci]
        t2i = cand[torch.arange(nC), ci] & ((Sc > gt[:, None]).sum(1) < 100)
        ctop = dist_i.topk(min(M, nC), dim=1, largest=False).indices  # (images, M)
        ccand = torch.zeros(nI, nC, dtype=torch.bool).scatter_(1, ctop, True)
        ST = S.T.masked_fill(~ccand, -1e9)
        own = ST[ci, torch.arange(nC)]
        rr = torch.cat([(ST[ci[s : s + 500]] > own[s : s + 500, None]).sum(1) for s in range(0, nC, 500)])
        ok = ccand[ci, torch.arange(nC)] & (rr < 100)
        i2t = torch.zeros(nI, dtype=torch.bool).scatter_reduce(0, ci, ok, reduce="amax")
        print(
            f"  cascade {name} Hamming top-{M} -> MaxSim top-100 (ties optimistic): t2i {100 * float(t2i.float().mean()):.1f} "
            f"i2t {100 * float(i2t.float().mean()):.1f} (hash top-{M} alone t2i "
            f"{100 * float(cand[torch.arange(nC), ci].float().mean()):.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
