"""Peak resident memory of `heiindex ingest` on a generated precomp split.

Writes a SCAN-format split of N images (36 x 2048 float32: 20,000 images = 5.9 GB) block by
block in one child process, then runs `heiindex ingest` on it in another and reports the peak
RSS of the children (getrusage RUSAGE_CHILDREN, ru_maxrss) next to the size of the feature file.
Both steps run in children of a small parent on purpose: Linux keeps ru_maxrss across exec, so
a child forked from a process that had written the file through a memory map would report the
parent's resident pages.

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
    """Header, then appended blocks: plain writes, no memory map, so this process stays small."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test_ims.npy"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (n, regions, dim),
        }
        np.lib.format.write_array_header_1_0(f, header)
        for s in range(0, n, block):
            f.write(rng.random((min(n, s + block) - s, regions, dim), dtype=np.float32).tobytes())
    lines = (REPO / "data" / "coco-captions" / "testall_caps.txt").read_text().splitlines()
    caps = [lines[i % len(lines)] for i in range(5 * n)]
    (folder / "test_caps.txt").write_text("\n".join(caps) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heiindex-ingest-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    pre, out = args.workdir / "precomp", args.workdir / "store"
    if args.generate_only:
        write_split(pre, args.images, 36, 2048)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--generate-only", "--images", str(args.images), "--workdir", str(args.workdir)],
        check=True,
    )
    ims = pre / "test_ims.npy"
    gen_s = time.perf_counter() - t0
    generate_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
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
    if peak_kb <= generate_peak_kb:  # the generator was the larger child: ingest's own peak is not visible
        print(f"note: the generator's peak ({generate_peak_kb / 1e6:.2f} GB) hides the ingest peak", file=sys.stderr)
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
