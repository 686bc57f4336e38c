"""Peak resident memory of `heiindex ingest` on a generated precomp split.

Writes a SCAN-format split of N images (36 x 2048 float32: 20,000 images = 5.9 GB) block by
block, then runs `heiindex ingest` on it in a child process and reports the child's peak RSS
(getrusage of the waited-for child, ru_maxrss) next to the size of the feature file.

    python benchmarks/ingest_memory.py --images 20000 --workdir /tmp/heiindex-ingest-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_split(folder: Path, n: int, regions: int, dim: int, block: int = 500) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test_ims.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, regions, dim))
    rng = np.random.default_rng(0)
    for s in range(0, n, block):
        e = min(n, s + block)
        out[s:e] = rng.random((e - s, regions, dim), dtype=np.float32)
        out.flush()
    del out
    lines = (REPO / "data" / "coco-captions" / "testall_caps.txt").read_text().splitlines()
    caps = [lines[i % len(lines)] for i in range(5 * n)]
    (folder / "test_caps.txt").write_text("\n".join(caps) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heiindex-ingest-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    pre, out = args.workdir / "precomp", args.workdir / "store"
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    ims = write_split(pre, args.images, 36, 2048)
    gen_s = time.perf_counter() - t0
    cmd = [
        sys.executable,
        "-m",
        "heiindex_cli.main",
        "ingest",
        "--precomp",
        str(pre),
        "--split",
        "test",
        "--out",
        str(out),
        "--vocab",
        str(REPO / "data" / "coco-captions" / "coco_precomp_vocab.json"),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    ingest_s = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = {
        "images": args.images,
        "feature_file_gb": round(ims.stat().st_size / 1e9, 2),
        "ingest_seconds": round(ingest_s, 1),
        "generate_seconds": round(gen_s, 1),
        "peak_rss_gb": round(peak_kb / 1e6, 3),
        "peak_rss_over_file": round(peak_kb * 1e3 / ims.stat().st_size, 3),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
