"""Peak resident memory of building and opening an index at COCO-5K size, this code against another.

A generated precomp split of 5,000 images (36 x 2048 random float32 regions) with the 25,000
real COCO 5K captions (``data/coco-captions/testall_caps.txt``, mean 13.3 tokens, longest 52) is
ingested once. A matcher with random weights at ``--d`` (default 1024, SCAN's size) and a hash
module bound to it are saved; their outputs are meaningless, their shapes and costs are real.
Then, for this checkout and for each ``--compare`` revision (checked out with ``git worktree``
and imported first on ``PYTHONPATH``), one child process runs ``Index.write`` on the split and
another ``Index.open`` on what it wrote; each reports its wall seconds and its own peak RSS
(``ru_maxrss``, after the imports, which are counted too). Ratios are this checkout's figures
over each compared revision's, from the same run.

``--bank-images N`` also ingests a ``train`` split of N images (random features as the test
split's; only its captions are used: 5 N, COCO 5K's repeated) and measures a third step, ``Index.write``
with prototype image codes described by those captions (``heiindex.prototypes``), this checkout
only: what the captions cost beside a plain build (their tokens, codes and tanh outputs are
kept; their words are encoded a block at a time).

    python benchmarks/build_memory.py [--images 5000] [--d 1024] [--compare e01e4fc] [--json FILE]
    python benchmarks/build_memory.py --images 1000 --d 256 --bank-images 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import REPO, checkout  # benchmarks/ is on sys.path when a script here runs

VOCAB = REPO / "data" / "coco-captions" / "coco_precomp_vocab.json"


def prepare(work: Path, images: int, d: int, bank_images: int = 0) -> None:
    """Precomp split -> store; a random matcher and a hash module bound to it (in a child process)."""
    import torch
    from ingest_memory import write_split  # benchmarks/ is on sys.path when this script runs

    from heiindex.checkpoint import load_model, save_model
    from heiindex.hash_folder import save_hash
    from heiindex.hashing import HashConfig, HashModule
    from heiindex.ingest import ingest
    from heiindex.model import ScanConfig, ScanModel
    from heiindex.vocab import Vocab

    write_split(work / "precomp", images, 36, 2048)
    ingest(work / "precomp", "test", work / "store", vocab=VOCAB)
    shutil.rmtree(work / "precomp")
    if bank_images:  # the describing split: its captions matter, its images do not
        write_split(work / "precomp", bank_images, 36, 2048)
        for kind in ("ims.npy", "caps.txt"):
            (work / "precomp" / f"test_{kind}").rename(work / "precomp" / f"train_{kind}")
        ingest(work / "precomp", "train", work / "store", vocab=VOCAB)
        shutil.rmtree(work / "precomp")
    torch.manual_seed(0)
    vocab = Vocab.load(VOCAB)
    save_model(ScanModel(ScanConfig(vocab_size=len(vocab), embed_size=d)), vocab, work / "model")
    matcher = load_model(work / "model")
    save_hash(  # mean pooling, as RESULTS' figures were measured
        HashModule(HashConfig(bits=256, embed_size=d, pooling="mean")),
        work / "hash",
        {"matcher_sha256": matcher.checksum},
    )
    print(json.dumps({"captions": 5 * images, "d": d, "bank_captions": 5 * bank_images}))


def child(step: str, work: Path, out: Path) -> None:
    """One measured step in this process; prints {"seconds", "peak_rss_gb", ...} as JSON."""
    import heiindex
    from heiindex.index import Index

    t0 = time.perf_counter()
    if step in ("write", "write-proto"):
        options = {}
        if step == "write-proto":  # a revision before bab23a4 (--compare) has neither the module nor the keyword
            from heiindex.prototypes import PrototypeConfig

            options["prototypes"] = PrototypeConfig(split="train")
        Index.write(work / "store", "test", work / "model", work / "hash", out, **options)
        extra = {}
    else:
        index = Index.open(out)
        extra = {
            "words_gb": round(index.words.flat.numel() * 4 / 1e9, 3),
            "regions_gb": round(index.regions.numel() * 4 / 1e9, 3),
            "padded_words_gb": round(index.words.shape[0] * index.words.shape[1] * index.words.shape[2] * 4 / 1e9, 3),
        }
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "package": str(Path(heiindex.__file__).parent),
                "seconds": round(seconds, 1),
                "peak_rss_gb": round(peak / 1e9, 3),
                **extra,
            }
        )
    )


def run_child(args: list[str], pythonpath: Path | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath or REPO)  # this checkout's package, or a compared tree's
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"child {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--compare", action="append", default=[], help="a git revision to measure beside this checkout")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--bank-images", type=int, default=0, help="also measure a prototype build (see above)")
    ap.add_argument("--child", choices=["prepare", "write", "write-proto", "open"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bank_images < 0:
        ap.error(f"--bank-images must be 0 (no prototype build) or more, got {args.bank_images}")
    if args.child == "prepare":
        return prepare(args.workdir, args.images, args.d, args.bank_images)
    if args.child:
        return child(args.child, args.workdir, args.out)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="heiindex-build-bench-"))
    trees: dict[str, Path | None] = {"this checkout": None}
    try:
        t0 = time.perf_counter()
        setup = run_child(
            ["--child", "prepare", "--workdir", str(work), "--images", str(args.images), "--d", str(args.d)]
            + ["--bank-images", str(args.bank_images)],
            None,
        )
        print(f"prepared {args.images} images, d = {args.d} in {time.perf_counter() - t0:.0f} s", flush=True)
        for rev in args.compare:
            tree = work / f"tree-{rev}"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True
            )
            trees[rev] = tree
        results = {}
        for name, tree in trees.items():
            out = work / f"index-{name.replace(' ', '-')}"
            base = ["--workdir", str(work), "--out", str(out)]
            results[name] = {
                "write": run_child(["--child", "write", *base], tree),
                "open": run_child(["--child", "open", *base], tree),
            }
            if args.bank_images and tree is None:
                shutil.rmtree(out)
                results[name]["write-proto"] = run_child(["--child", "write-proto", *base], tree)
            print(name, json.dumps(results[name]), flush=True)
            shutil.rmtree(out)
        mine = results["this checkout"]
        ratios = {
            rev: {
                step: round(mine[step]["peak_rss_gb"] / results[rev][step]["peak_rss_gb"], 3)
                for step in ("write", "open")
            }
            for rev in args.compare
        }
        report = {
            "images": args.images,
            **setup,
            "this_checkout": checkout(REPO / "heiindex"),
            "results": results,
            "peak_rss_ratio_this_over": ratios,
        }
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        for tree in trees.values():
            if tree is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
