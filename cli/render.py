"""Rendering library results as rich tables and JSON (the CLI's tables; main.py keeps the few
one-line summaries its commands print after them)."""

from __future__ import annotations

import json
import math
import os
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from heiindex.errors import counted, name_some, shown

# markup off: queries, captions and paths are printed as they are ("a dog [/b]" raised rich's
# MarkupError, and "[sic]" vanished); the tables below hold them as Text for any console too.
# Width: a terminal's own (or COLUMNS), so that tables fit it; 160 where output goes to a file or
# a pipe (rich's 80 there wrapped every caption).
console = Console(soft_wrap=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160, markup=False)


def echo_json(data, line: bool = False) -> None:
    """``data`` as indented JSON, or as one line (``line``: JSON Lines, one object a query)."""
    print(json.dumps(data, indent=None if line else 2, default=float))


def print_json_result(result, k: int, line: bool = False) -> None:
    """One query's result as JSON on standard output; where fewer than the ``k`` asked for came
    back, the ``shortfall`` line on standard error (the JSON stays as documented)."""
    echo_json(result.to_dict(), line)
    if note := shortfall(result, k):
        print(f"Warning: query {result.query!r}: {note}", file=sys.stderr)


def print_result(result, image_query: bool, k: int) -> None:
    """One query's hits as a table, the query's unknown words if any, and the ``shortfall`` line
    where fewer than the ``k`` asked for came back."""
    console.print(search_table(result, image_query))
    if result.unknown_words:
        print(f"unknown words (mapped to <unk>): {name_some([shown(w) for w in result.unknown_words], limit=20)}")
    if note := shortfall(result, k):
        print(note)


def shortfall(result, k: int) -> str | None:
    """Why ``result`` holds fewer than ``k`` hits, or None where it holds them all. Only an
    approximate index's search comes back short (the counts asked for are checked against the
    index's size before any search)."""
    if len(result.results) >= k:
        return None
    return (
        f"{len(result.results)} of the {counted(k, 'result')} asked for: the index's approximate search returned fewer "
        "candidates (a larger --nprobe probes more of IVF's lists, a larger --ef-search widens HNSW's "
        "graph search; an index built with --index flat searches every item)"
    )


def items_counted(images: int, captions: int) -> str:
    """A set's images and captions, as titles and summary lines say them: "1,000 images, 5,000 captions"."""
    return f"{counted(images, 'image')}, {counted(captions, 'caption')}"


def found_count(found: list[int | None], expected: int) -> str | None:
    """How many candidates the search found, where fewer than ``expected`` (N, or N from each
    shard capped at its size, summed): for one query, or on average over ``found`` (cut, not
    rounded, to one decimal, so that a shortfall never reads as all of them); None where every
    query found them all, or no count is known."""
    known = [f for f in found if f is not None]
    if not known or min(known) >= expected:
        return None
    if len(found) == 1:
        return f"{known[0]:,} of {expected:,} found"
    return f"{math.floor(sum(known) / len(known) * 10) / 10:,.1f} of {expected:,} found on average"


def found_depth(depth: str, found: list[int | None], expected: int) -> str:
    """``depth`` ("Hamming top-N", "... from each shard") as a query's last line gives it,
    followed by ``found_count`` where the search came back short."""
    note = found_count(found, expected)
    return depth if note is None else f"{depth}: {note}"


def warn_found(depth: str, found: list[int | None], expected: int) -> None:
    """With ``--json``, where the search came back short, ``found_depth`` in a ``Warning:`` line
    on standard error (the JSON keeps its documented shape)."""
    if found_count(found, expected) is not None:
        print(
            f"Warning: {found_depth(depth, found, expected)}; only those were re-ranked "
            "(an approximate index: a larger --nprobe or --ef-search searches more widely)",
            file=sys.stderr,
        )


def search_table(result, image_query: bool) -> Table:
    title = f"query image {result.query}" if image_query else f"query: {result.query!r}"
    table = Table(title=Text(title))
    for col in ("rank", "id", "score", "hamming"):
        table.add_column(col, justify="right")
    table.add_column("caption" if image_query else "captions of the image")
    for h in result.results:
        text = h.text if image_query else "\n".join(h.captions or [])
        table.add_row(str(h.rank), str(h.id), f"{h.score:.4f}", str(h.hamming), Text(text))
    return table


def recall_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    """R@K rows; a seconds column where any row has its own time (evaluate's rows share one)."""
    timed = any("seconds" in r for _, r in rows)
    table = Table(title=title)
    table.add_column("method")
    for col in ("R@1", "R@5", "R@10", "medr", "meanr", "rsum", *(("seconds",) if timed else ())):
        table.add_column(col, justify="right")
    for name, r in rows:
        table.add_row(
            name,
            f"{r['r1']:.1f}",
            f"{r['r5']:.1f}",
            f"{r['r10']:.1f}",
            _medr(r["medr"]),
            "-" if r["meanr"] is None else f"{r['meanr']:.1f}",
            f"{r['rsum']:.1f}",
            *((_seconds(r),) if timed else ()),
        )
    return _fitted(table)


def _medr(medr: float | None) -> str:
    """A median rank: whole as it is; COCO 1K's mean over folds can fall between (1.5, not 2)."""
    if medr is None:
        return "-"
    return f"{medr:.0f}" if float(medr).is_integer() else f"{medr:.1f}"


def verify_table(path, checks) -> Table:
    table = Table(title=Text(f"verify {path}"))
    for col in ("file", "status", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(Text(str(c.path)), c.status, Text(c.detail))
    return table


def _seconds(r: dict) -> str:
    """A stage's seconds; "-" where it has none of its own (the sharded bench times HEI and
    Hamming ranking together)."""
    return "-" if r.get("seconds") is None else f"{r['seconds']:.2f}"


def percent(fraction: float) -> str:
    """A fraction as a percentage to one decimal, except that one short of the whole never reads
    100.0% (0.9998 of 5,000 captions, one missed, printed 100.0% beside "some ground truth is
    outside the N candidates"): it gets the decimals that tell it from 100."""
    text = f"{100 * fraction:.1f}"
    digits = 1
    while fraction < 1 and text == "100.0" + "0" * (digits - 1) and digits < 6:
        digits += 1
        text = f"{100 * fraction:.{digits}f}"
    return text + "%"


def bench_tables(proto_name: str, res: dict) -> list[Table]:
    from heiindex.search import per_shard_depth  # imports torch: not before a command needs it

    tables = []
    for direction, label in (("t2i", "text-to-image"), ("i2t", "image-to-text")):
        d = res[direction]
        rows = [(k, d[k]) for k in ("exhaustive", "hei", "hamming") if k in d]
        depth = f"N = {res['candidates']}"
        if "shards" in res:  # each shard's N, capped at its size
            held = res["shard_images" if direction == "t2i" else "shard_captions"]
            depth += per_shard_depth(res["candidates"], held, "images" if direction == "t2i" else "captions")
        t = recall_table(
            f"{proto_name}: {label} ({items_counted(res['images'], res['captions'])}, {depth})",
            rows,
        )
        # a sharded build's: every shard's candidates, merged (N from each, at most its size)
        slots = d["candidate_slots"] if "shards" in res else res["candidates"]
        extra = f"candidate recall@{slots}: {percent(d['candidate_recall'])}"
        if "speedup" in d:
            # cut, not rounded, to two decimals: rounding printed 4.96 as "5.0x" (one decimal), on
            # the wrong side of a 5x target; the JSON keeps every digit
            extra += f"   HEI speed-up over exhaustive: {math.floor(d['speedup'] * 100 + 1e-9) / 100:.2f}x"
        if "versus_exhaustive" in d:
            v = d["versus_exhaustive"]
            lost, gained = (" / ".join(f"{v[s][k]:.1f}" for k in ("r1", "r5", "r10")) for s in ("lost", "gained"))
            extra += (  # two lines, so that the caption does not widen the table
                f"\nqueries HEI loses against exhaustive at R@1/5/10: {lost}%"
                f"\n(ground truth not a candidate); and gains: {gained}%"
            )
        if "candidates_found" in d and d["candidates_found"] < d["candidate_slots"]:
            extra += (
                f"\n(an approximate index: {d['candidates_found']:.1f} of {d['candidate_slots']} candidate slots "
                "found on average, and re-ranked; --nprobe or --ef-search searches more widely)"
            )
        if "seconds_each" in d["hei"]:
            passes = len(d["hei"]["seconds_each"])
            extra += f"\n(HEI and exhaustive seconds: the median of {passes} passes, alternated; Hamming: one pass)"
        if d["hei"]["meanr"] is None:
            extra += "\n(mean rank '-': some ground truth is outside the N candidates)"
        if "shards" in res:
            extra += "\n(Hamming: the merged candidates ranked by distance, searched in HEI's time)"
        t.caption = extra
        tables.append(_fitted(t))
    if res.get("sweep"):
        t = Table(title=f"{proto_name}: recall versus N")
        for col in ("N", "t2i R@1", "t2i rsum", "t2i cand. recall", "i2t R@1", "i2t rsum", "i2t cand. recall"):
            t.add_column(col, justify="right")
        for row in res["sweep"]:
            a, b = row["t2i"], row["i2t"]
            t.add_row(
                str(row["candidates"]),
                f"{a['r1']:.1f}",
                f"{a['rsum']:.1f}",
                percent(a["candidate_recall"]),
                f"{b['r1']:.1f}",
                f"{b['rsum']:.1f}",
                percent(b["candidate_recall"]),
            )
        tables.append(_fitted(t))
    return tables


def _fitted(table: Table) -> Table:
    """``table`` at least as wide as its title and each line of its caption: rich wraps both to
    the table's width, which cut the bench's titles mid-phrase."""
    lines = [table.title or "", *(table.caption or "").splitlines()]
    table.min_width = max(len(line) for line in lines) + 2  # the caption's centring keeps a margin
    return table
