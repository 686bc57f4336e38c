"""Running ``heiindex`` commands in-process (click's CliRunner) and reading their results; shared
by the CLI, ingest, train, shard, Ray and Milvus tests."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from heiindex_cli.main import cli


def run(*args, input: str | None = None):
    """``heiindex ARGS`` in this process; ``input``: what it reads as standard input."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def clean_error(result, *details: str) -> None:
    """Exit status 2 (every refusal's, heiindex's and click's) with a one-line ``Error: ...``
    message, not a traceback."""
    assert result.exit_code == 2, f"exit status {result.exit_code}: {result.output}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    assert "Error:" in result.output
    for d in details:
        assert d in result.output, result.output


def as_json(result) -> dict:
    return json.loads(ok(result).stdout)


def json_lines(result) -> list[dict]:
    """The objects a successful command printed one a line (JSON Lines)."""
    return [json.loads(line) for line in ok(result).stdout.splitlines()]


def assert_same_answers(got: list[dict], want: list[dict], rel: float = 1e-6) -> None:
    """Query answers (``query --json`` objects) equal but for the last bits of their scores: a
    batch of queries is scored in other matrix shapes than one query alone, and on some CPUs
    (seen with AVX-512) float32 products of other shapes round differently (6e-8 relative)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "results"} == {k: v for k, v in w.items() if k != "results"}
        assert [{k: v for k, v in r.items() if k != "score"} for r in g["results"]] == [
            {k: v for k, v in r.items() if k != "score"} for r in w["results"]
        ]
        assert [r["score"] for r in g["results"]] == pytest.approx([r["score"] for r in w["results"]], rel=rel)


def recall_row(r1, r5, r10, rsum, *, medr=1.0, meanr=3.0, seconds=None) -> dict:
    """One row of recalls as the evaluate and bench results hold it (``seconds`` only if given)."""
    d = {"r1": r1, "r5": r5, "r10": r10, "medr": medr, "meanr": meanr, "rsum": rsum}
    if seconds is not None:
        d["seconds"] = seconds
    return d


def bench_side(*, candidate_recall=1.0, hei=(), **row) -> dict:
    """One direction (t2i or i2t) of a bench result: ``recall_row(**row)`` for the exhaustive,
    hei and hamming rows, ``hei`` (a dict) overriding fields of the hei row."""
    return {
        "exhaustive": recall_row(**row),
        "hei": recall_row(**{**row, **dict(hei)}),
        "hamming": recall_row(**row),
        "candidate_recall": candidate_recall,
    }


def build(pipe, out, *extra):
    """``heiindex build`` of the test pipeline's test split into ``out``."""
    common = ("--split", "test", "--store", pipe.root, "--model", pipe.model_dir, "--hash", pipe.hash_dir)
    return run("build", *common, "--out", out, *extra)
