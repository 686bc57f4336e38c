"""How HEI's speed-up over exhaustive scoring spreads over kept ``heiindex bench --repeats R --json``
outputs, pass by pass: what a single bench would have printed, against the median of R that
``--repeats`` reports. A bench with ``--repeats`` alternates the stages and keeps every pass's
seconds (``"seconds_each"``), so pass i's exhaustive and HEI seconds come from the same stretch of
time, as one plain ``heiindex bench`` would time them.

    python benchmarks/speedup_spread.py benchmarks/results/default-query/bench-repeats3-*.json

Prints one JSON line per direction: how many files and passes; for the single passes and for
the files' reported speed-ups (median exhaustive seconds over median HEI seconds) how many are
under ``--target`` (5x, the HEI issue's), and the lowest, median and highest. Reads only the files given; a file without ``seconds_each`` (a bench without
``--repeats``) is refused by name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def passes(bench: dict, direction: str, name: str) -> list[float]:
    """The speed-up of each timed pass of ``direction``: exhaustive seconds over HEI seconds."""
    if direction not in bench:
        raise SystemExit(f"{name}: no {direction!r} figures at its top level (a bench of the whole split is needed)")
    d = bench[direction]
    if "exhaustive" not in d:
        raise SystemExit(
            f"{name}: {direction} has no exhaustive figures (a sharded bench, or run_bench(exhaustive=False))"
        )
    try:
        ex, hei = d["exhaustive"]["seconds_each"], d["hei"]["seconds_each"]
    except KeyError:
        raise SystemExit(
            f'{name}: {direction} has no per-pass seconds ("seconds_each"): not a bench run with --repeats'
        ) from None
    return [e / h for e, h in zip(ex, hei, strict=True)]


def spread(values: list[float], target: float) -> dict:
    return {
        "under_target": sum(v < target for v in values),
        "lowest": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "highest": round(max(values), 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="bench JSON files written with --repeats")
    p.add_argument("--target", type=float, default=5.0, help="speed-up to count passes under (default 5)")
    args = p.parse_args(argv)
    benches = {str(f.resolve()): json.loads(f.read_text()) for f in args.files}  # each file once
    for direction in ("t2i", "i2t"):
        each = [passes(b, direction, name) for name, b in benches.items()]
        flat = [v for run in each for v in run]
        reported = [b[direction]["speedup"] for b in benches.values()]  # median seconds over median seconds
        print(
            json.dumps(
                {
                    "direction": direction,
                    "files": len(each),
                    "passes": len(flat),
                    "target": args.target,
                    "single_pass": spread(flat, args.target),
                    "reported": spread(reported, args.target),
                }
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
