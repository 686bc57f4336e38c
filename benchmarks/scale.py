"""COCO-5K size, side by side: SCAN's reference loop, heiindex exhaustive, heiindex HEI (N = 100).

One run, both directions, at the size of COCO's 5K test set: 5,000 images x 36 regions and
25,000 captions whose token counts are those of the real COCO 5K captions
(``data/coco-captions/testall_caps.txt``: mean 13.3, longest 52), d = 1024. Features are random
(unit-length) unless a real SCAN precomp folder is given with ``--precomp`` (then they are
encoded with ``--model`` and coded with ``--hash``). With random features the hash codes are
random too: the HEI timings are real, its recall figures are not printed.

Each method runs in its own child process, which reports its wall seconds and its own peak
resident memory (ru_maxrss). The reference and exhaustive runs score a random subset of the
captions against all images and are extrapolated linearly to all 25,000 (their cost is linear
in the number of captions); the output says so (``"extrapolated": true``, ``"query_fraction"``).
The score matrix serves both directions, so its time is the time of both. HEI runs in full:
Hamming top-N for every caption and every image, then re-ranking of all of their candidates.

    python benchmarks/scale.py [--d 1024] [--exhaustive-queries 400] [--reference-queries 20]
        [--device cpu|cuda] [--dtype float32|bfloat16|tf32] [--json FILE]
    python benchmarks/scale.py --precomp DIR [--split testall] [--model DIR] [--hash DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import REPO, checkout  # benchmarks/ is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
CAPTIONS = REPO / "data" / "coco-captions" / "testall_caps.txt"
REGIONS = 36
CAPS_PER_IMAGE = 5


# --------------------------------------------------------------------------------- features


def coco_lengths(n_caps: int):
    """Token counts (with <start> and <end>) of the first n_caps real COCO 5K captions."""
    from heiindex.tokenizer import tokenize

    lines = CAPTIONS.read_text().splitlines()
    if n_caps > len(lines):
        raise SystemExit(f"{CAPTIONS} has {len(lines)} captions, {n_caps} asked for")
    return np.array([len(tokenize(t)) + 2 for t in lines[:n_caps]], dtype=np.int64)


def random_features(args):
    """Unit-length random regions (n, 36, d) and packed words, random codes; seeded."""
    import torch

    from heiindex.packed import PackedWords

    g = torch.Generator().manual_seed(0)
    n_caps = args.images * CAPS_PER_IMAGE
    lengths = torch.from_numpy(coco_lengths(n_caps))
    regions = torch.empty(args.images, REGIONS, args.d)
    for s in range(0, args.images, 500):  # blocks: no full-size temporaries
        x = torch.randn(min(500, args.images - s), REGIONS, args.d, generator=g)
        regions[s : s + len(x)] = x / x.norm(dim=-1, keepdim=True)
    flat = torch.empty(int(lengths.sum()), args.d)
    for s in range(0, len(flat), 50_000):
        x = torch.randn(min(50_000, len(flat) - s), args.d, generator=g)
        flat[s : s + len(x)] = x / x.norm(dim=-1, keepdim=True)
    rng = np.random.default_rng(0)
    img_codes = rng.integers(0, 256, (args.images, args.bits // 8), dtype=np.uint8)
    cap_codes = rng.integers(0, 256, (n_caps, args.bits // 8), dtype=np.uint8)
    caption_image = np.arange(n_caps) // CAPS_PER_IMAGE
    return regions, PackedWords(flat, lengths), lengths, img_codes, cap_codes, caption_image, None


def precomp_features(args):
    """A real SCAN precomp split, ingested to a temporary store, encoded and hashed."""
    import torch

    from heiindex.checkpoint import load_model
    from heiindex.default_data import default_hash_dir, default_model_dir
    from heiindex.encode import encode_split
    from heiindex.hash_folder import load_hash
    from heiindex.ingest import ingest
    from heiindex.store import SplitStore

    matcher = load_model(args.model or default_model_dir())
    hasher = load_hash(args.hash or default_hash_dir(), matcher)
    with tempfile.TemporaryDirectory() as tmp:
        ingest(args.precomp, args.split, tmp, vocab=matcher.vocab)
        enc = encode_split(matcher.model, SplitStore.open(tmp, args.split))
    with torch.no_grad():
        img_codes = hasher.module.image_codes(enc.regions)
        cap_codes = hasher.module.caption_codes(enc.words, enc.lengths)
    return enc.regions, enc.words, enc.lengths, img_codes, cap_codes, enc.caption_image, matcher.model.attention


# --------------------------------------------------------------------------------- stages


def run_stage(args) -> dict:
    """One method, in this (child) process: returns its seconds and this process's peak RSS."""
    import torch

    from heiindex.attention import (
        AttentionConfig,
        region_gram,
        score_block,
        score_caption_candidates,
        score_image_candidates,
    )
    from heiindex.bench import candidate_ranks, warmup_queries
    from heiindex.evaluation import recall
    from heiindex.hamming import TorchBinaryIndex, hamming_candidates, make_binary_index

    if args.gpu_gather_gb:
        from dataclasses import replace

        from heiindex import attention

        attention._POLICIES["cuda"] = replace(attention._POLICIES["cuda"], gather_bytes=args.gpu_gather_gb * 2**30)
        attention._cuda_policy.cache_clear()  # the per-card policy is derived from the patched base
    t_load = time.perf_counter()
    if args.features_file:  # --precomp: ingested, encoded and hashed once by the driver
        feats = torch.load(args.features_file, weights_only=False)
    else:
        feats = random_features(args)
    regions, words, lengths, img_codes, cap_codes, caption_image, att = feats
    att = att or AttentionConfig("t2i", "clipped_l2norm", "lse", 6.0, 9.0)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.dtype == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    regions = regions.to(device, dtype)
    words = words.to(device, dtype)
    lengths = lengths.to(device)
    gram = region_gram(regions)
    load_s = time.perf_counter() - t_load
    n_caps, n_imgs = len(lengths), regions.shape[0]
    rng = np.random.default_rng(1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    out: dict = {"stage": args.stage, "load_seconds": round(load_s, 2)}
    with torch.no_grad():
        if args.stage in ("reference", "exhaustive"):
            n_q = min(n_caps, args.reference_queries if args.stage == "reference" else args.exhaustive_queries)
            rows = torch.from_numpy(np.sort(rng.choice(n_caps, n_q, replace=False))).to(device)
            sub_lengths = lengths[rows]
            sub_words = words.gather(rows, int(sub_lengths.max()))
            if args.stage == "reference":
                from reference import reference_t2i  # benchmarks/reference.py

                def method(w, lens):
                    return reference_t2i(w, lens, regions, att.lambda_softmax, att.lambda_lse)
            else:

                def method(w, lens):
                    return score_block(att, w, lens, regions, gram)

            method(sub_words[:2], sub_lengths[:2])  # warm-up: first-call costs are not the method's
            sync()
            t0 = time.perf_counter()
            scores = method(sub_words, sub_lengths)
            sync()
            measured = time.perf_counter() - t0
            out.update(
                measured_seconds=round(measured, 2),
                seconds=round(measured * n_caps / n_q, 2),
                extrapolated=n_q < n_caps,
                query_fraction=n_q / n_caps,
                queries=n_q,
            )
            if args.stage == "exhaustive" and n_q < n_caps:
                out["checksum"] = float(scores.float().sum())
        else:  # HEI, both directions, in full

            def binary_indexes():
                if device.type == "cuda":
                    return TorchBinaryIndex(img_codes, device), TorchBinaryIndex(cap_codes, device)
                return make_binary_index(img_codes), make_binary_index(cap_codes)

            # Warm-up: the whole path on as many queries a direction as the bench's warm-up
            # (heiindex.bench.warmup_queries), so that first-call costs (on a GPU, loading each
            # kernel: 0.67 s of the coco-sim bench's first pass on an H200) are not HEI's; a 2-pair
            # score_pairs call before 2026-11-28 missed most of them.
            img_index, cap_index = binary_indexes()
            few = torch.arange(min(warmup_queries(args.topk), n_caps, n_imgs), device=device)
            _, c = hamming_candidates(img_index, cap_codes[: len(few)], args.topk)
            few_words = words.select(few)
            score_image_candidates(att, few_words, lengths[few], regions, torch.from_numpy(c).to(device), gram)
            _, c = hamming_candidates(cap_index, img_codes[: len(few)], args.topk)
            score_caption_candidates(att, regions[few], words, lengths, torch.from_numpy(c).to(device), gram[few])
            sync()
            t0 = time.perf_counter()
            img_index, cap_index = binary_indexes()
            _, cand_t2i = hamming_candidates(img_index, cap_codes, args.topk)
            _, cand_i2t = hamming_candidates(cap_index, img_codes, args.topk)
            t_ham = time.perf_counter() - t0
            cand_t2i_t = torch.from_numpy(cand_t2i).to(device)
            cand_i2t_t = torch.from_numpy(cand_i2t).to(device)
            s_t2i = score_image_candidates(att, words, lengths, regions, cand_t2i_t, gram)
            sync()
            t_t2i = time.perf_counter() - t0 - t_ham
            s_i2t = score_caption_candidates(att, regions, words, lengths, cand_i2t_t, gram)
            sync()
            seconds = time.perf_counter() - t0
            out.update(
                seconds=round(seconds, 2),
                hamming_seconds=round(t_ham, 2),
                rerank_t2i_seconds=round(t_t2i, 2),
                rerank_i2t_seconds=round(seconds - t_ham - t_t2i, 2),
                pairs=int(cand_t2i.size + cand_i2t.size),
                extrapolated=False,
            )
            if args.precomp:  # real codes: the recall of HEI means something
                # ranked within the candidates, as the bench ranks them (a ground truth outside
                # them: rank inf, meanr null); a full matrix with -inf for the rest is refused by
                # evaluation's finite-score check since 9abb354
                r_t2i, _ = candidate_ranks("t2i", cand_t2i, s_t2i.float().cpu().numpy(), caption_image)
                r_i2t, _ = candidate_ranks("i2t", cand_i2t, s_i2t.float().cpu().numpy(), caption_image)
                out["hei_recall"] = {"t2i": recall(r_t2i).to_dict(), "i2t": recall(r_i2t).to_dict()}
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


# --------------------------------------------------------------------------------- driver


def child(stage: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", stage]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {__import__('os').cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--exhaustive-queries", type=int, default=400, help="captions exhaustive scores (extrapolated)")
    ap.add_argument("--reference-queries", type=int, default=20, help="captions the reference loop scores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "tf32", "bfloat16"])
    ap.add_argument("--precomp", help="a SCAN precomp folder (real features) instead of random ones")
    ap.add_argument("--split", default="testall")
    ap.add_argument("--model", help="model folder for --precomp (default: the bundled coco-sim model)")
    ap.add_argument("--hash", help="hash folder for --precomp (default: the bundled coco-sim hash module)")
    ap.add_argument("--stages", default="reference,exhaustive,hei")
    ap.add_argument(
        "--gpu-gather-gb",
        type=float,
        help="bytes of gathered features per re-ranking chunk on a GPU, in GiB (default: the library's rule)",
    )
    ap.add_argument("--json", dest="json_file", help="also write the summary here")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--features-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        sys.path.insert(0, str(HERE))
        print(json.dumps(run_stage(args)))
        return

    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        if args.precomp:  # ingest, encode and hash the split once; each stage loads the result
            import torch

            t0 = time.perf_counter()
            torch.save(precomp_features(args), Path(tmp) / "features.pt")
            print(f"ingested, encoded and hashed {args.precomp} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            argv = [*argv, "--features-file", str(Path(tmp) / "features.pt")]
        results = {s: child(s, argv) for s in args.stages.split(",")}
    ref, exh, hei = (results.get(k, {}) for k in ("reference", "exhaustive", "hei"))
    summary = {
        "reference_seconds": ref.get("seconds"),
        "exhaustive_seconds": exh.get("seconds"),
        "hei_seconds": hei.get("seconds"),
        "speedup_vs_reference": _ratio(ref.get("seconds"), exh.get("seconds")),
        "hei_speedup_vs_exhaustive": _ratio(exh.get("seconds"), hei.get("seconds")),
        "peak_rss_gb": max((r["peak_rss_gb"] for r in results.values()), default=None),
        "peak_rss_gb_by_stage": {k: r["peak_rss_gb"] for k, r in results.items()},
        "device": device_name(args.device),
        "dtype": args.dtype,
        "extrapolated": {k: r.get("extrapolated") for k, r in results.items()},
        "query_fraction": {k: r.get("query_fraction") for k, r in results.items() if "query_fraction" in r},
        "features": f"precomp {args.precomp} ({args.split})" if args.precomp else "random, unit length",
        "images": args.images if not args.precomp else None,
        "captions": args.images * CAPS_PER_IMAGE if not args.precomp else None,
        "d": args.d if not args.precomp else None,
        "bits": args.bits if not args.precomp else "from the hash module",
        "topk": args.topk,
        "gpu_gather_gb": args.gpu_gather_gb,
        "stages": results,
        "checkout": checkout(),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_file:
        Path(args.json_file).write_text(text + "\n")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 1) if a and b else None


if __name__ == "__main__":
    main()
