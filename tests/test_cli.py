"""The click commands through ``CliRunner``: build, query (table, --json, --image), bench (--json,
--sweep with a PNG), train-hash, evaluate, and one-line errors for bad input.

(``heiindex train`` is exercised in ``test_train.py``.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pipeline_fixtures as pf
import pytest
import torch
from cli_helpers import (  # tests/ is on sys.path (pytest rootdir-relative import)
    as_json,
    assert_same_answers,
    bench_side,
    build,
    clean_error,
    json_lines,
    ok,
    recall_row,
    run,
)
from rich.console import Console

from heiindex import default_data
from heiindex.builds import open_index
from heiindex.checkpoint import load_model
from heiindex.encode import encode_split
from heiindex.errors import UnusedSettingWarning
from heiindex.hash_folder import load_hash
from heiindex.index import Index
from heiindex.scoring import evaluate_exhaustive
from heiindex.settings import SettingError
from heiindex.store import SplitStore

# -- build ------------------------------------------------------------------------------------


def test_build(pipe, tmp_path):
    marker = default_data.coco_sim_dir() / "index" / "LAST"
    before = marker.read_text() if marker.exists() else None
    out = tmp_path / "idx"
    r = ok(build(pipe, out))
    assert f"built test: 24 images, 120 captions, {pf.BITS}-bit codes, auto: flat index -> {out}" in r.output
    built, ref = Index.open(out), Index.open(pipe.index_dir)
    assert built.manifest["matcher"] == ref.manifest["matcher"] and built.manifest["hash"] == ref.manifest["hash"]
    np.testing.assert_array_equal(built.image_codes(), ref.image_codes())
    assert built.search("a dog", 5, 10).to_dict() == ref.search("a dog", 5, 10).to_dict()
    # an explicit --store never touches the default data's "last built" marker
    assert (marker.read_text() if marker.exists() else None) == before


def test_a_build_whose_features_encode_to_inf_is_refused_and_keeps_the_old_index(pipe, tmp_path):
    """Finite features near float32's largest (3e38) encode to inf: the build exited 0 and
    replaced a good index with one every query refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "index"
    ok(build(pipe, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    root = pf.copy_store(pipe, tmp_path)
    path = root / "test" / "images.parquet"
    table = pq.read_table(path)
    feats = table.column("features").combine_chunks()
    values = feats.flatten().to_numpy().copy()
    width = feats.type.list_size
    values[3 * width : 4 * width] = 3e38  # the fourth image
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), width)
    pq.write_table(table.set_column(table.schema.get_field_index("features"), "features", column), path)
    pf.record_again(path)
    image_id = int(table.column("image_id")[3].as_py())
    common = ("--split", "test", "--model", pipe.model_dir, "--hash", pipe.hash_dir)
    r = run("build", "--store", root, *common, "--out", out)
    clean_error(
        r,
        f"{path}: image_id {image_id}: the matcher encodes its features to NaN or infinite values",
        "nothing was written",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good index stands


def test_build_ivf(pipe, tmp_path, capfd):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error: still a line, and the build goes on
        r = ok(build(pipe, tmp_path / "ivf", "--index", "ivf", "--nlist", "3", "--nprobe", "3"))
    assert "ivf index" in r.output
    # 24 images in 3 lists is fewer than FAISS's 39 per list (120 captions too): said once each, in a line
    assert r.output.count("Warning: IVF index of 24 images of test in 3 lists: 8.0 per list, fewer than the 39") == 1
    assert "Warning: IVF index of 120 captions of test in 3 lists: 40.0" not in r.output
    assert "SparseListsWarning" not in r.output
    assert "WARNING clustering" not in capfd.readouterr().err  # FAISS writes its own line to file descriptor 2
    ivf = {"type": "ivf", "nlist": 3, "nprobe": 3}
    assert Index.open(tmp_path / "ivf").manifest["index"] == {**ivf, "images": ivf, "captions": ivf}


def test_lists_given_to_an_auto_index_that_builds_flat_are_said_unused(pipe, tmp_path):
    """--index auto (the default) builds flat indexes below 2M codes: --nlist was recorded and used
    for nothing, without a word."""
    r = ok(build(pipe, tmp_path / "a", "--nlist", "4", "--nprobe", "2"))
    assert r.output.count("Warning: --nlist 4 and --nprobe 2 not used: --index auto built flat indexes") == 1
    assert Index.open(tmp_path / "a").manifest["index"]["images"]["type"] == "flat"
    r = ok(build(pipe, tmp_path / "s", "--nlist", "4", "--shards", "2"))  # once, not once a shard
    assert r.output.count("Warning: --nlist 4 not used: --index auto built flat indexes (exact;") == 1
    for extra in ((), ("--index", "ivf", "--nlist", "4")):
        assert "not used" not in ok(build(pipe, tmp_path / f"b{len(extra)}", *extra)).output


def test_a_query_that_comes_back_short_says_so(pipe, tmp_path):
    """An IVF index probing one list of 8 finds fewer than 20 of 24 images; the table was just
    shorter than --k, with nothing said."""
    ok(build(pipe, tmp_path / "ivf", "--index", "ivf", "--nlist", "8", "--nprobe", "1"))
    found = Index.open(tmp_path / "ivf").search("a dog", k=20, candidates=20).results
    assert 0 < len(found) < 20
    r = ok(run("query", "a dog", "--index", tmp_path / "ivf", "--k", "20", "--candidates", "20"))
    note = f"{len(found)} of the 20 results asked for: the index's approximate search returned fewer candidates"
    assert note in r.stdout and "a larger --nprobe probes more of IVF's lists" in r.stdout
    # --json keeps its documented shape on standard output and says it on standard error (it said nothing)
    r = ok(run("query", "a dog", "--index", tmp_path / "ivf", "--k", "20", "--candidates", "20", "--json"))
    assert len(json.loads(r.stdout)["results"]) == len(found)
    assert r.stderr.startswith(f"Warning: query 'a dog': {note}") and r.stderr.count("\n") == 1
    with_file = ("--file", "-", "--k", "20", "--candidates", "20", "--json")
    r = ok(run("query", "--index", tmp_path / "ivf", *with_file, input="a dog\na cat\n"))
    assert [len(json.loads(line)["results"]) for line in r.stdout.splitlines()][0] == len(found)
    assert f"Warning: query 'a dog': {note}" in r.stderr
    for extra in ((), ("--json",)):
        r = ok(run("query", "a dog", "--index", pipe.index_dir, "--k", "20", "--candidates", "20", *extra))
        assert "results asked for" not in r.output  # flat: all 20
    # the bench says how many of its N candidates the search found (it reported N = 20 and said nothing)
    d = as_json(run("bench", "--index", tmp_path / "ivf", "--topk", "20", "--json"))["t2i"]
    assert d["candidate_slots"] == 20 and 0 < d["candidates_found"] < 20
    table = ok(run("bench", "--index", tmp_path / "ivf", "--topk", "20")).output
    assert f"(an approximate index: {d['candidates_found']:.1f} of 20 candidate slots found on average" in table
    assert "an approximate index" not in ok(run("bench", "--index", pipe.index_dir, "--topk", "20")).output


def test_the_query_footer_says_how_many_candidates_an_approximate_search_found(pipe, tmp_path):
    """An IVF search that found its 2 results but fewer than its 20 candidates: the footer said
    "Hamming top-20" all the same (only a result count short of --k was said)."""
    ok(build(pipe, tmp_path / "ivf", "--index", "ivf", "--nlist", "4", "--nprobe", "1"))
    ivf = Index.open(tmp_path / "ivf")
    res = ivf.search("a dog", k=2, candidates=20)
    assert len(res.results) == 2 and 2 <= res.candidates < 20
    one = ("--index", tmp_path / "ivf", "--k", "2", "--candidates", "20")
    r = ok(run("query", "a dog", *one))
    assert f"ms (Hamming top-20: {res.candidates} of 20 found, re-ranked by the matcher)" in r.output
    assert "results asked for" not in r.output  # both came back
    # --json keeps its shape and says it on standard error
    r = ok(run("query", "a dog", *one, "--json"))
    assert json.loads(r.stdout) == res.to_dict()
    assert r.stderr == f"Warning: Hamming top-20: {res.candidates} of 20 found; only those were re-ranked " + (
        "(an approximate index: a larger --nprobe or --ef-search searches more widely)\n"
    )
    texts = ["a dog", "two cats", "a red bus"]
    found = [x.candidates for x in ivf.search_many(texts, k=2, candidates=20)]
    mean = f"{int(sum(found) / 3 * 10) / 10:.1f}"  # cut, not rounded
    r = ok(run("query", "--file", "-", *one, input="\n".join(texts)))
    assert f"(Hamming top-20: {mean} of 20 found on average, re-ranked by the matcher, in batches)" in r.output
    r = ok(run("query", "--file", "-", *one, "--json", input="\n".join(texts)))  # one line for them all
    assert r.stderr.startswith(f"Warning: Hamming top-20: {mean} of 20 found on average;") and r.stderr.count("\n") == 1
    image = int(ivf.image_ids[0])  # an image query's count is its caption search's
    got = ivf.search_image(image, k=2, candidates=60).candidates
    r = ok(run("query", "--image", str(image), "--index", tmp_path / "ivf", "--k", "2", "--candidates", "60"))
    assert got < 60 and f"(Hamming top-60: {got} of 60 found, re-ranked" in r.output
    # a flat index finds every candidate, in either direction, and says nothing more
    flat = Index.open(pipe.index_dir)
    assert flat.search("a dog", k=3, candidates=20).candidates == 20
    assert flat.search_image(int(flat.image_ids[0]), k=2, candidates=30).candidates == 30
    r = ok(run("query", "a dog", "--index", pipe.index_dir, "--k", "2", "--candidates", "20", "--json"))
    assert "found" not in r.output and r.stderr == ""
    # a sharded IVF build: the shards' found candidates against N from each, capped at its size (12 images)
    ok(build(pipe, tmp_path / "s", "--shards", "2", "--index", "ivf", "--nlist", "3", "--nprobe", "1"))
    got = open_index(tmp_path / "s").search("a dog", k=2, candidates=15).candidates
    r = ok(run("query", "a dog", "--index", tmp_path / "s", "--k", "2", "--candidates", "15"))
    assert got < 24 and f"at most its size (12 images): {got} of 24 found, re-ranked" in r.output


def test_nprobe_at_query_time_searches_more_lists_without_a_rebuild(pipe, tmp_path):
    """--nprobe was a build setting only: an IVF index that came back short had to be rebuilt.
    query and bench now take it (and --ef-search for HNSW) for the searches they make."""
    ok(build(pipe, tmp_path / "ivf", "--index", "ivf", "--nlist", "8", "--nprobe", "1"))
    flat = Index.open(pipe.index_dir).search("a dog", k=20, candidates=20)
    every = ("--k", "20", "--candidates", "20", "--json")
    d = as_json(run("query", "a dog", "--index", tmp_path / "ivf", "--nprobe", "8", *every))
    assert [(h["id"], h["hamming"]) for h in d["results"]] == [(h.id, h.hamming) for h in flat.results]
    # the bench finds every slot, and says what it probed; the build's own setting stays as recorded
    b = as_json(run("bench", "--index", tmp_path / "ivf", "--topk", "20", "--nprobe", "8", "--json"))
    assert b["t2i"]["candidates_found"] == b["i2t"]["candidates_found"] == 20
    assert b["search_breadth"] == {"images": {"nlist": 8, "nprobe": 8}, "captions": {"nlist": 8, "nprobe": 8}}
    assert Index.open(tmp_path / "ivf").search_breadth()["images"] == {"nlist": 8, "nprobe": 1}
    assert as_json(run("bench", "--index", pipe.index_dir, "--topk", "5", "--json"))["search_breadth"] == {
        "images": {},
        "captions": {},
    }
    # beyond the index's lists: refused by the flag, naming the index; given to a flat index: said unused
    r = run("query", "a dog", "--index", tmp_path / "ivf", "--nprobe", "9")
    assert r.exit_code == 2
    assert f"Error: --nprobe 9 exceeds the 8 lists of the index of the images of {tmp_path / 'ivf'}" in r.output
    r = ok(run("query", "a dog", "--index", pipe.index_dir, "--nprobe", "4", "--ef-search", "64"))
    assert "Warning: --nprobe 4 and --ef-search 64 not used: the index searches exactly (flat)" in r.output
    for flag in ("--nprobe", "--ef-search"):  # before the index is looked for: not "no such folder"
        r = run("bench", "--index", tmp_path / "nowhere", flag, "0")
        assert r.exit_code == 2 and f"Error: {flag} must be a whole number, at least 1, got 0" in r.output
        r = run("query", "a dog", "--index", tmp_path / "nowhere", flag, "100000000000")  # FAISS's C int: a traceback
        assert r.exit_code == 2 and f"Error: {flag} must be at most 2,147,483,647, got 100,000,000,000" in r.output
    with pytest.raises(SettingError, match="^ef_search must be"):
        Index.open(tmp_path / "nowhere", ef_search=0)


def test_ef_search_sets_hnsw_search_breadth(pipe, tmp_path):
    ok(build(pipe, tmp_path / "hnsw", "--index", "hnsw"))
    assert Index.open(tmp_path / "hnsw").search_breadth() == {
        "images": {"ef_search": 128},
        "captions": {"ef_search": 128},
    }
    index = Index.open(tmp_path / "hnsw", ef_search=300)
    assert index.search_breadth() == {"images": {"ef_search": 300}, "captions": {"ef_search": 300}}
    want = Index.open(pipe.index_dir).search("a dog", k=5, candidates=24)
    assert [h.id for h in index.search("a dog", k=5, candidates=24).results] == [h.id for h in want.results]
    with pytest.warns(UnusedSettingWarning, match="^`nprobe` 2 not used") as seen:
        index.set_search_breadth(nprobe=2)
    assert seen[0].filename == __file__  # the caller's line, not the library's
    r = ok(run("query", "a dog", "--index", tmp_path / "hnsw", "--nprobe", "2", "--ef-search", "40"))
    assert "Warning: --nprobe 2 not used: the index searches an HNSW graph" in r.output  # --ef-search 40 was used


# -- query ------------------------------------------------------------------------------------


def test_query_json_has_the_documented_keys_and_the_library_result(pipe):
    d = as_json(
        run("query", "a man riding a motorcycle", "--index", pipe.index_dir, "--k", "4", "--candidates", "12", "--json")
    )
    assert set(d) == {"query", "unknown_words", "results"}
    assert d["query"] == "a man riding a motorcycle" and d["unknown_words"] == []
    assert len(d["results"]) == 4
    for i, h in enumerate(d["results"]):
        assert set(h) == {"rank", "id", "score", "hamming", "captions"}
        assert h["rank"] == i + 1 and len(h["captions"]) == 5
    assert d == Index.open(pipe.index_dir).search("a man riding a motorcycle", 4, 12).to_dict()


def test_query_table(pipe):
    want = Index.open(pipe.index_dir).search("a man riding a motorcycle", 3, 12)
    r = ok(run("query", "a man riding a motorcycle", "--index", pipe.index_dir, "--k", "3", "--candidates", "12"))
    assert "query: 'a man riding a motorcycle'" in r.output
    for col in ("rank", "id", "score", "hamming", "captions of the image"):
        assert col in r.output
    for h in want.results:
        assert f"{h.score:.4f}" in r.output
    assert "ms (Hamming top-12, re-ranked by the matcher)" in r.output
    assert "unknown words" not in r.output


def test_query_and_caption_text_is_printed_as_it_is_not_as_markup(pipe):
    """rich read "[/b]" in a query as a closing tag (a raw MarkupError traceback) and dropped
    "[sic]"; captions went the same way, and so did paths in verify's table."""
    from heiindex_cli.render import search_table, verify_table

    from heiindex.index import Hit, SearchResult
    from heiindex.verify import FileCheck

    r = ok(run("query", "a dog [/b] on [sic] grass", "--index", pipe.index_dir, "--k", "2", "--candidates", "10"))
    assert "query: 'a dog [/b] on [sic] grass'" in r.output
    table = search_table(SearchResult("q [b]", [Hit(1, 7, 0.5, 3, captions=["a [red]cat[/red] [/i]"])]), False)
    out = _text(table)  # a console with markup on, as any caller's may be
    assert "query: 'q [b]'" in out and "a [red]cat[/red] [/i]" in out
    out = _text(verify_table("/x/[v]", [FileCheck(Path("/x/[v]/a.parquet"), "ok", "size [1]")]))
    assert "verify /x/[v]" in out and "/x/[v]/a.parquet" in out and "size [1]" in out


def test_query_reports_unknown_words(pipe):
    d = as_json(run("query", "a dog xyzzyq", "--index", pipe.index_dir, "--candidates", "10", "--json"))
    assert d["unknown_words"] == ["xyzzyq"]
    r = ok(run("query", "a dog xyzzyq", "--index", pipe.index_dir, "--candidates", "10"))
    assert "unknown words (mapped to <unk>): xyzzyq" in r.output


def test_query_image(pipe):
    d = as_json(run("query", "--image", "5", "--index", pipe.index_dir, "--k", "3", "--candidates", "20", "--json"))
    assert set(d) == {"query", "unknown_words", "results"}
    assert d["query"] == 5 and d["unknown_words"] == []
    assert [set(h) for h in d["results"]] == [{"rank", "id", "score", "hamming", "text"}] * 3
    assert d == Index.open(pipe.index_dir).search_image(5, 3, 20).to_dict()
    r = ok(run("query", "--image", "5", "--index", pipe.index_dir, "--k", "3", "--candidates", "20"))
    assert "query image 5" in r.output and d["results"][0]["text"][:30] in r.output


QUERY_LINES = ["a man riding a motorcycle", "a dog xyzzyq", "two people on a beach"]


def test_query_file_prints_one_json_object_a_line_as_the_library_answers(pipe, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERY_LINES) + "\n")
    got = json_lines(
        run("query", "--file", queries, "--index", pipe.index_dir, "--k", "4", "--candidates", "12", "--json")
    )
    index = Index.open(pipe.index_dir)
    assert got == [res.to_dict() for res in index.search_many(QUERY_LINES, 4, 12)]
    assert [d["query"] for d in got] == QUERY_LINES and got[1]["unknown_words"] == ["xyzzyq"]
    for d, text in zip(got, QUERY_LINES, strict=True):  # and as one query at a time
        assert [h["id"] for h in d["results"]] == [h.id for h in index.search(text, 4, 12).results]


def test_query_file_from_standard_input_as_tables(pipe):
    r = ok(
        run(
            *("query", "--file", "-", "--index", pipe.index_dir, "--k", "2", "--candidates", "12"),
            input="\ufeff" + "\r\n".join(QUERY_LINES),  # a byte-order mark and Windows line ends
        )
    )
    index = Index.open(pipe.index_dir)
    for text in QUERY_LINES:
        assert f"query: {text!r}" in r.output
        assert f"{index.search(text, 2, 12).results[0].score:.4f}" in r.output
    assert "unknown words (mapped to <unk>): xyzzyq" in r.output
    assert (
        "3 queries in " in r.output and "ms a query (Hamming top-12, re-ranked by the matcher, in batches)" in r.output
    )


def test_query_several_images_prints_one_json_object_a_line(pipe):
    image_args = ("--image", "5", "--image", "0", "--index", pipe.index_dir, "--k", "3", "--candidates", "20")
    got = json_lines(run("query", *image_args, "--json"))
    assert got == [res.to_dict() for res in Index.open(pipe.index_dir).search_images([5, 0], 3, 20)]
    r = ok(run("query", *image_args))
    assert "query image 5" in r.output and "query image 0" in r.output and "2 queries in " in r.output
    r = run("query", "--image", "5", "--image", "77", "--index", pipe.index_dir, "--candidates", "5", "--k", "3")
    clean_error(r, "1 of 2 image ids are not in this index (ids 0..23); nothing was searched: 77")
    r = run("query", "--image", str(2**63), "--index", pipe.index_dir, "--candidates", "5", "--k", "3")
    clean_error(r, f"an image id is a whole number of 64 bits, got {2**63}")


def test_query_file_footer_gives_the_search_time_not_the_printing(pipe, monkeypatch):
    """Three queries in one batch the search clock says took 3 s: 1000 ms a query, whatever the
    tables took to print."""
    import heiindex.index

    monkeypatch.setattr(heiindex.index, "time", pf.fake_clock(0, 3))
    r = ok(
        run(
            "query",
            "--file",
            "-",
            "--index",
            pipe.index_dir,
            "--k",
            "2",
            "--candidates",
            "5",
            input="a dog\ntwo cats\na red bus\n",
        )
    )
    assert "the search 1000.0 ms a query (Hamming top-5" in r.output


def test_query_file_lines_end_at_line_ends_only(pipe, tmp_path):
    """A form feed or U+2028 inside a line is part of the query, not a line end: "line N" must
    stay the file's line N."""
    queries = tmp_path / "queries.txt"
    queries.write_text("a dog\fon grass\ntwo\u2028cats\r\n", encoding="utf-8")
    got = json_lines(
        run("query", "--file", queries, "--index", pipe.index_dir, "--k", "2", "--candidates", "5", "--json")
    )
    assert [d["query"] for d in got] == ["a dog\fon grass", "two\u2028cats"]


def test_query_file_leaves_out_blank_lines_at_its_end(pipe, tmp_path):
    """An editor's final blank line refused the whole file ("line 3: the query is empty")."""
    queries = tmp_path / "queries.txt"
    queries.write_bytes(b"a dog\ntwo cats\n\n \r\n")
    args = ("--index", pipe.index_dir, "--k", "2", "--candidates", "5", "--json")
    got = json_lines(run("query", "--file", queries, *args))
    assert [d["query"] for d in got] == ["a dog", "two cats"]
    assert_same_answers(got, [as_json(run("query", text, *args)) for text in ("a dog", "two cats")])


@pytest.mark.parametrize(
    "content, detail",
    [
        (b"a dog\n\ntwo cats\n", "QUERIES line 2: the query is empty"),
        (b"a dog\nxyzzyq qwplk\n", "QUERIES line 2: no word of the query is in the model's vocabulary: xyzzyq, qwplk"),
        (b"", "QUERIES holds no queries: give one query per line"),
        (b"a dog\n\xff\xfe\n", "QUERIES line 2: bytes are not valid UTF-8 (invalid start byte)"),
        (b"\n", "QUERIES holds no queries: give one query per line"),  # blank lines at the end are left out
        (b"  \n\t\r\n", "QUERIES holds no queries: give one query per line"),
        (b"xyzzyq qwplk", "QUERIES line 1: no word of the query is in the model's vocabulary: xyzzyq, qwplk"),
        (  # a batch is padded to its longest query: one line of 3,000 words took 4.5 GB
            b"a dog\n" + b"dog " * 3000 + b"\n",
            "QUERIES line 2: the query has 3,000 words; a query may have at most 128 (a caption's length)",
        ),
        (  # old Mac line ends: searched as one query, "a dog\rtwo cats"
            b"a dog\rtwo cats\r",
            "QUERIES line 1: holds a carriage return (\\r) inside the line: old Mac line ends?",
        ),
        (b"\xff\xfea\x00 \x00d\x00o\x00g\x00", "QUERIES is UTF-16 (its byte-order mark says so); save it as UTF-8"),
    ],
    ids=[
        "blank_line",
        "all_unknown",
        "empty_file",
        "not_utf8",
        "one_blank_line",
        "blank_lines",
        "one_unknown_line",
        "too_long",
        "old_mac_line_ends",
        "utf16",
    ],
)
def test_query_file_errors_name_the_file_and_line(pipe, tmp_path, content, detail):
    queries = tmp_path / "queries.txt"
    queries.write_bytes(content)
    r = run("query", "--file", queries, "--index", pipe.index_dir, "--candidates", "5", "--k", "3", "--json")
    clean_error(r, detail.replace("QUERIES", str(queries)))
    assert r.stdout.count("{") == 0  # nothing printed before the refusal


# -- bench ------------------------------------------------------------------------------------


def test_bench_json(pipe):
    d = as_json(run("bench", "--index", pipe.index_dir, "--topk", "24", "--json"))
    assert {"split", "index", "bits", "index_type", "threads", "warmup_seconds", "full", "t2i", "i2t"} <= set(d)
    for direction in ("t2i", "i2t"):
        assert set(d[direction]) == {
            "exhaustive",
            "hei",
            "hamming",
            "candidate_recall",
            "speedup",
            "candidate_slots",
            "candidates_found",
            "versus_exhaustive",
        }
        for method in ("exhaustive", "hei", "hamming"):
            assert {"r1", "r5", "r10", "rsum", "seconds"} <= set(d[direction][method])
    for k in ("r1", "r5", "r10", "medr", "meanr", "rsum"):
        assert d["t2i"]["hei"][k] == d["t2i"]["exhaustive"][k]
    assert "plot" not in d
    v = as_json(run("bench", "--index", pipe.index_dir, "--topk", "5", "--json"))["t2i"]["versus_exhaustive"]
    table = ok(run("bench", "--index", pipe.index_dir, "--topk", "5")).output
    lost, gained = (" / ".join(f"{v[s][k]:.1f}" for k in ("r1", "r5", "r10")) for s in ("lost", "gained"))
    assert f"queries HEI loses against exhaustive at R@1/5/10: {lost}%" in table
    assert f"(ground truth not a candidate); and gains: {gained}%" in table


def test_bench_takes_the_models_of_an_index_whose_recorded_folders_moved(pipe, tmp_path):
    """The refusal told `bench` to give --model DIR, an option only `query` had."""
    moved = pf.index_with_moved_models(pipe, tmp_path)
    clean_error(
        run("bench", "--index", moved, "--topk", "5"),
        "which are not there",
        "give the matcher folder as --model and the hash module folder as --hash",
    )
    given = as_json(
        run("bench", "--index", moved, "--topk", "5", "--model", pipe.model_dir, "--hash", pipe.hash_dir, "--json")
    )
    recorded = as_json(run("bench", "--index", pipe.index_dir, "--topk", "5", "--json"))
    for direction in ("t2i", "i2t"):
        assert given[direction]["candidate_recall"] == recorded[direction]["candidate_recall"]
        assert given[direction]["hei"]["rsum"] == recorded[direction]["hei"]["rsum"]


def test_bench_sweep_writes_a_png(pipe, tmp_path):
    png = tmp_path / "sweep.png"
    d = as_json(
        run("bench", "--index", pipe.index_dir, "--topk", "10", "--sweep", "1,5,10,24", "--plot", png, "--json")
    )
    assert d["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert [row["candidates"] for row in d["full"]["sweep"]] == [1, 5, 10, 24]
    assert not (pipe.index_dir / "bench_sweep.png").exists()
    before = png.stat().st_ino  # an earlier plot is replaced by a new file swapped in whole
    as_json(run("bench", "--index", pipe.index_dir, "--topk", "10", "--sweep", "1,24", "--plot", png, "--json"))
    assert png.stat().st_ino != before and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.png"]  # no scratch file left


def test_bench_sweep_of_the_1k_folds_is_tabled_and_plotted(pipe, tmp_path, monkeypatch):
    """--protocol 1k --sweep ended in a KeyError traceback: the folds ran no sweep."""
    import heiindex.bench

    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    png = tmp_path / "folds.png"
    args = ("bench", "--index", pipe.index_dir, "--topk", "5", "--sweep", "3,12", "--protocol", "1k", "--plot", png)
    d = as_json(run(*args, "--json"))
    assert [row["candidates"] for row in d["1k"]["sweep"]] == [3, 12] and d["plot"] == str(png)
    text = ok(run(*args)).output
    assert "recall versus N" in text and "COCO 1K (mean of 2 folds)" in text  # the folds run, not always 5
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 24)])
    assert "COCO 1K (one fold)" in ok(run("bench", "--index", pipe.index_dir, "--topk", "5", "--protocol", "1k")).output


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("10,abc", "--sweep '10,abc': 'abc' is not a whole number (expected N values such as 10,20,50,100)"),
        ("5,", "--sweep '5,': '' is not a whole number"),
        ("", "--sweep '': '' is not a whole number"),  # was ignored: a bench without the sweep asked for
        ("0,5", "--sweep 0 must lie in [1, 24] for this index"),
        ("100,2,50,10", "--sweep values 50, 100 must lie in [1, 24] for this index"),  # was 50 alone, then 100
    ],
)
def test_bench_bad_sweep(pipe, sweep, message):
    r = run("bench", "--index", pipe.index_dir, "--topk", "5", "--sweep", sweep)
    clean_error(r, message)


def test_bench_names_a_bad_topk_and_sweep_in_one_message(pipe):
    """The README's example on the 24-image test index named --topk 100 first, then the sweep."""
    r = run("bench", "--index", pipe.index_dir, "--topk", "100", "--sweep", "10,20,50,100,200")
    clean_error(r, "--topk 100 and --sweep values 50, 100, 200 must lie in [1, 24] for this index")


def test_bench_bad_plot_path(pipe, tmp_path, monkeypatch):
    """A plot path matplotlib would rename (no suffix: it adds .png, and the output named the
    path asked for) or refuse (another suffix, a missing folder) is refused before the bench."""
    import heiindex.bench

    pf.forbid(monkeypatch, "the bench ran", (heiindex.bench, "run_bench"))
    notes = tmp_path / "notes.png"  # the user's file, named .png: not overwritten
    notes.write_text("my notes")
    fifo = tmp_path / "fifo.png"  # reading its first bytes for the PNG signature waited for ever
    os.mkfifo(fifo)
    # held open with 8 bytes in it, so that a reader gets them at once: a regression then fails
    # on its message instead of hanging the suite
    held = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    os.write(held, b"notapng!")
    for plot, message in (
        (tmp_path / "plot", "the plot is a PNG; give a path ending in .png"),
        (tmp_path / "plot.txt", "the plot is a PNG; give a path ending in .png"),
        (tmp_path / "nodir" / "p.png", f"no folder {tmp_path / 'nodir'} to write it in"),
        (notes / "p.png", f"{notes} is not a folder; give a path in a folder"),  # said "no folder ... to write it in"
        (Path("/proc/p.png"), "cannot be written in /proc"),
        (notes, "exists and is not a PNG; the plot would replace it (choose another path)"),
        (fifo, "is not a regular file; give a file path ending in .png"),
        # inside an output, a plot blocked its next write ("holds what an index does not write")
        (pipe.index_dir / "mine.png", f"lies inside {pipe.index_dir}, an index: the plot there would leave"),
        (pipe.root / "test" / "p.png", f"lies inside {pipe.root / 'test'}, a store split: the plot there"),
    ):
        r = run("bench", "--index", pipe.index_dir, "--topk", "5", "--sweep", "5", "--plot", plot)
        clean_error(r, f"--plot {plot}: {message}")
    r = run("bench", "--index", pipe.index_dir, "--topk", "5", "--plot", tmp_path / "p.png")
    clean_error(r, "--plot draws the --sweep table; give --sweep too")
    os.close(held)
    fifo.unlink()
    assert list(tmp_path.iterdir()) == [notes] and notes.read_text() == "my notes"
    # Without --plot, the default path in the index folder is checked before the bench too (a
    # read-only shared index threw the results away after the whole bench).
    index = tmp_path / "index"
    shutil.copytree(pipe.index_dir, index)
    (index / "bench_sweep.png").write_text("not a plot")
    r = run("bench", "--index", index, "--topk", "5", "--sweep", "5")
    want = f"the default sweep plot (give --plot PATH for another) {index / 'bench_sweep.png'}: exists and is not a PNG"
    clean_error(r, want)


def test_bench_sweep_without_matplotlib_is_refused_before_the_bench(pipe, monkeypatch):
    """An install without the plot extra: told at once, not after the whole bench has run."""
    import heiindex.bench

    pf.forbid(monkeypatch, "the bench ran", (heiindex.bench, "run_bench"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then fails
    r = run("bench", "--index", pipe.index_dir, "--topk", "5", "--sweep", "5")
    clean_error(r, "Error: the sweep plot needs matplotlib, which cannot be imported (", "pip install 'heiindex[plot]'")


def test_bench_tables(pipe, tmp_path):
    r = ok(run("bench", "--index", pipe.index_dir, "--topk", "5", "--sweep", "5,24", "--plot", tmp_path / "s.png"))
    for text in (
        "test (all images): text-to-image (24 images, 120 captions, N = 5)",
        "image-to-text",
        "exhaustive",
        "hei",
        "hamming",
        "candidate recall@5",
        "HEI speed-up over exhaustive:",
        "(mean rank '-': some ground truth is outside the N candidates)",
        "recall versus N",
        "before timing: an untimed warm-up pass of each stage, ",
        "sweep plot:",
    ):
        assert text in r.output, text
    assert r.output.index("before timing:") < r.output.index("text-to-image")  # said first, as it ran
    r = ok(run("bench", "--index", pipe.index_dir, "--topk", "5", "--no-warmup"))
    assert "HEI speed-up over exhaustive:" in r.output and "warm-up" not in r.output


# -- train-hash and evaluate ------------------------------------------------------------------


def test_train_hash(pipe, tmp_path):
    out = tmp_path / "h16"
    r = ok(
        run(
            "train-hash",
            "--model",
            pipe.model_dir,
            "--store",
            pipe.root,
            "--out",
            out,
            "--bits",
            "16",
            "--epochs",
            "3",
            "--rounds",
            "1",
            "--val-candidates",
            "5",
        )
    )
    assert "best epoch" in r.output and f"hash module in {out}" in r.output
    matcher = load_model(pipe.model_dir)
    h = load_hash(out, matcher)
    assert h.module.config.bits == 16 and h.module.config.embed_size == pf.EMBED_SIZE
    assert h.info["matcher_sha256"] == matcher.checksum
    assert h.info["train"]["epochs"] == 3 and h.info["train"]["rounds"] == 1
    assert 1 <= h.info["best_epoch"] <= 3
    rec = h.info["dev_candidate_recall"]
    assert rec["n"] == 5
    assert f"dev candidate recall@5 t2i {100 * rec['t2i']:.1f}% i2t {100 * rec['i2t']:.1f}%" in r.output


def test_train_hash_fits_its_default_depth_to_a_small_dev_split(pipe, tmp_path):
    """The default --val-candidates 100 was refused on a dev split of 100 images or fewer, which
    the user had not asked for; a value given is still refused there."""
    common = ("train-hash", "--model", pipe.model_dir, "--store", pipe.root, "--bits", "16", "--epochs", "1")
    r = ok(run(*common, "--rounds", "1", "--out", tmp_path / "h"))
    assert "validating by candidate recall@2: a tenth of the 24 images of the dev split (the default, 100," in r.output
    assert "dev candidate recall@2 " in r.output
    assert json.loads((tmp_path / "h" / "config.json").read_text())["info"]["train"]["val_candidates"] == 2
    r = run(*common, "--val-candidates", "100", "--out", tmp_path / "g")
    clean_error(r, "--val-candidates 100 must be below the 24 images of the dev split")


def test_evaluate(pipe):
    m = load_model(pipe.model_dir)
    want = evaluate_exhaustive(m.model, encode_split(m.model, SplitStore.open(pipe.root, "test")))
    d = as_json(run("evaluate", "--model", pipe.model_dir, "--store", pipe.root, "--split", "test", "--json"))
    assert set(d) == {"split", "images", "captions", "models", "full", "t2i", "i2t", "rsum", "seconds"}
    assert (d["split"], d["images"], d["captions"], d["models"]) == ("test", 24, 120, 1)
    assert d["t2i"] == want.t2i.to_dict() and d["i2t"] == want.i2t.to_dict()
    assert d["rsum"] == round(want.rsum, 10) == d["full"]["rsum"]  # not 447.59999999999997
    r = ok(run("evaluate", "--model", pipe.model_dir, "--store", pipe.root, "--split", "test"))
    assert "test (all images): exhaustive (24 images, 120 captions)" in r.output
    assert f"test (all images) rsum {want.rsum:.1f}" in r.output
    r = run("evaluate", "--model", pipe.model_dir, "--store", pipe.root, "--split", "test", "--protocol", "1k")
    clean_error(r, "COCO 1K (--protocol 1k) needs whole folds of 1000 images; this split has 24")
    assert "seconds" not in r.output  # the one time is in the footer: no empty column


# -- errors -----------------------------------------------------------------------------------


def test_query_without_an_index(tmp_path):
    r = run("query", "a dog", "--index", tmp_path / "none")
    clean_error(r, f"Error: {tmp_path / 'none'}: no such folder; give a folder `heiindex build` wrote, or build it")
    (tmp_path / "empty").mkdir()
    r = run("query", "a dog", "--index", tmp_path / "empty")
    clean_error(r, f"Error: {tmp_path / 'empty' / 'manifest.json'}: no index here; run `heiindex build` first")


def test_bench_without_an_index(tmp_path):
    r = run("bench", "--index", tmp_path / "none", "--topk", "5")
    clean_error(r, "none: no such folder")


def test_a_missing_index_is_told_before_torch_and_faiss_are_imported(tmp_path):
    """Importing the matcher's and FAISS's modules took ~3.5 s of a 4 s wait to hear that the
    folder named holds no index; the top-level manifest is now read first."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from heiindex_cli.main import cli\n"
        f"for args in (['query', 'a dog'], ['bench']):\n"
        f"    r = CliRunner().invoke(cli, args + ['--index', {str(tmp_path / 'none')!r}])\n"
        "    assert r.exit_code == 2 and 'no such folder' in r.output, r.output\n"
        "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr  # a warning on stderr is not the point


def test_query_with_another_model(pipe):
    r = run("query", "a dog", "--index", pipe.index_dir, "--model", pipe.other_model_dir, "--candidates", "10")
    clean_error(r, "rebuild the index with this matcher")


def test_a_build_of_another_store_needs_its_own_out(pipe, tmp_path, monkeypatch):
    """--store without --out wrote over the default data's index (data/coco-sim/index/test), which
    query and bench without --index then served with the other store's items."""
    from heiindex import default_data

    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path / "data"))
    r = run("build", "--split", "test", "--store", pipe.root, "--model", pipe.model_dir, "--hash", pipe.hash_dir)
    clean_error(
        r,
        f"--store {pipe.root} needs --out, an index folder: without it the index would replace the default data's, "
        f"{default_data.default_index_dir('test')}",
    )
    assert not (tmp_path / "data").exists()


def test_build_refuses_an_out_it_would_destroy(pipe, tmp_path):
    """--out naming the input store, one of its splits, a file or an unrelated folder replaced it
    without a word (the store's vocab and every split deleted); now each is refused and kept."""
    before = sorted(p.name for p in pipe.root.iterdir())
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    a_file = tmp_path / "test_caps.txt"
    a_file.write_text("a caption\n")
    for out, message in (
        (pipe.root, "exists and holds what an index does not write (dev, test, train, vocab.json)"),
        (pipe.root / "test", "exists and holds what an index does not write (captions.parquet, images.parquet)"),
        (notes, "exists and holds what an index does not write (notes.txt)"),
        (a_file, "exists and is not a folder; an index is written as a folder"),
    ):
        r = build(pipe, out)
        clean_error(r, str(out), message)
    assert sorted(p.name for p in pipe.root.iterdir()) == before
    assert (notes / "notes.txt").read_text() == "keep" and a_file.read_text() == "a caption\n"
    # an index folder is replaced by a rebuild, sharded or not, and so is the sweep plot beside it
    out = tmp_path / "index"
    ok(build(pipe, out))
    (out / "bench_sweep.png").write_bytes(b"png")
    ok(build(pipe, out, "--shards", "2"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000", "shard-001"]
    ok(build(pipe, out))


def test_outputs_inside_another_output_are_refused_before_any_work(pipe, tmp_path, monkeypatch):
    """An index built inside another index, or inside the store split it read, was written (and
    became the last build); the outer folder then could not be built or ingested again ("holds
    what an index does not write (sub)"). train-hash, train and ingest wrote there too."""
    import heiindex.index_write
    import heiindex.ingest
    import heiindex.train_hash

    for module, name in ((heiindex.index_write, "ImageWriter"), (heiindex.train_hash, "collect_batches")):
        pf.forbid(monkeypatch, f"{name} ran", (module, name))
    pf.forbid(monkeypatch, "the vocabulary was resolved", (heiindex.ingest, "resolve_vocab"))
    inside = [
        (pipe.index_dir, "an index"),
        (pipe.root / "test", "a store split"),
        (pipe.model_dir, "a model"),
        (pipe.hash_dir, "a hash module"),
    ]
    models = ("--store", pipe.root, "--model", pipe.model_dir)
    for folder, what in inside:
        for args, kind in (
            (("build", *models, "--hash", pipe.hash_dir, "--out", folder / "sub"), "an index"),
            (("train-hash", *models, "--out", folder / "sub", "--epochs", "1"), "a hash module"),
            (("train", "--store", pipe.root, "--out", folder / "sub", "--epochs", "1"), "a training run"),
            (("ingest", "--precomp", pipe.precomp, "--split", "dev", "--out", folder / "sub"), "a store split"),
        ):
            r = run(*args)
            clean_error(r, f"lies inside {folder}, {what}: {kind} there would leave that folder holding")
            assert not (folder / "sub").exists()
    # a config.json or manifest.json of another tool is no output of heiindex's
    (tmp_path / "config.json").write_text('{"kind": "webapp"}')
    (tmp_path / "manifest.json").write_text('{"name": "x"}')
    from heiindex.outputs import check_not_inside_output

    check_not_inside_output(tmp_path / "sub", "an index")


def test_a_store_the_model_cannot_encode_is_refused(pipe, tmp_path_factory, tmp_path, monkeypatch):
    """evaluate and train-hash ran on a store tokenised with another vocabulary (numbers from
    the wrong words); build refused it. All three now refuse it, before any work."""
    import pipeline_fixtures

    import heiindex.encode
    import heiindex.index_write
    import heiindex.train_hash

    for module, name in (
        (heiindex.train_hash, "collect_batches"),
        (heiindex.encode, "encode_images"),  # evaluate's first work after encode_split's check
        (heiindex.index_write, "ImageWriter"),
    ):
        pf.forbid(monkeypatch, f"{name} ran", (module, name))

    wide = pipeline_fixtures.get_wide_store(tmp_path_factory)  # its own vocabulary, 2048-d features
    for args in (
        ("evaluate", "--split", "dev"),
        ("train-hash", "--out", tmp_path / "h", "--epochs", "1"),
        ("build", "--split", "dev", "--hash", pipe.hash_dir, "--out", tmp_path / "i"),
    ):
        r = run(*args, "--store", wide, "--model", pipe.model_dir)
        clean_error(r, "was tokenised with another vocabulary than model")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_hash_refuses_a_model_folder_as_out(pipe):
    r = run("train-hash", "--store", pipe.root, "--model", pipe.model_dir, "--out", pipe.model_dir, "--epochs", "1")
    clean_error(r, "exists and holds what a hash module does not write (model.safetensors, vocab.json)")
    assert (pipe.model_dir / "model.safetensors").exists()


def test_build_over_an_index_it_cannot_all_remove_warns_in_one_line(pipe, tmp_path, monkeypatch):
    """The new index is written and the command succeeds; the old one's remains are named."""
    import warnings

    import heiindex.atomic as atomic

    out = tmp_path / "idx"
    ok(build(pipe, out))
    monkeypatch.setattr(atomic, "remove", lambda path: None)  # nothing of the old index goes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error: still a line, not a traceback
        r = ok(build(pipe, out))
    (left,) = atomic.leftovers(out)
    assert (
        f"Warning: {out} was written, but what it replaced could not all be deleted: the rest is in {left}\n"
        in r.output
    )
    assert "LeftoverWarning" not in r.output and Index.open(out).n_images == 24
    listed = as_json(run("verify", out, "--json"))["files"]
    assert {"path": str(left), "status": "leftover"}.items() <= listed[-1].items()


def test_build_with_a_hash_module_of_another_model(pipe, tmp_path):
    r = run(
        "build",
        "--split",
        "test",
        "--store",
        pipe.root,
        "--model",
        pipe.other_model_dir,
        "--hash",
        pipe.hash_dir,
        "--out",
        tmp_path / "x",
    )
    clean_error(r, "was trained next to")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, detail",
    [
        (["a dog", "--candidates", "100"], "--candidates 100 is larger than the 24 images in this index"),
        (["--image", "0", "--candidates", "500"], "--candidates 500 is larger than the 120 captions in this index"),
        (["a dog", "--candidates", "5", "--k", "6"], "--k 6 is larger than --candidates 5"),
        (["", "--candidates", "5", "--k", "3"], "the query is empty"),
        (["   ", "--candidates", "5", "--k", "3"], "the query is empty"),
        (
            ["xyzzyq qwplk", "--candidates", "5", "--k", "3"],
            "no word of the query is in the model's vocabulary: xyzzyq, qwplk",
        ),
        (["--image", "77", "--candidates", "5", "--k", "3"], "image id 77 is not in this index"),
        (["a dog", "--k", "0"], "--k must be at least 1, got 0"),
        (["a dog", "--uri", "http://127.0.0.1:1"], "--uri names a Milvus server, but the codes of"),
    ],
    ids=[
        "candidates_images",
        "candidates_captions",
        "k",
        "empty",
        "blank",
        "all_unknown",
        "unknown_image",
        "k_zero",
        "uri_without_milvus",
    ],
)
def test_query_errors(pipe, args, detail):
    r = run("query", *args, "--index", pipe.index_dir)
    clean_error(r, detail)


@pytest.mark.parametrize(
    "command, args, detail",
    [
        ("query", ["a dog", "--address", "auto"], "--address is for --engine ray"),
        ("query", ["a dog", "--threads", "2"], "--threads is for --engine ray"),
        ("bench", ["--threads", "2"], "--threads is for --engine ray"),
        ("query", ["a dog", "--engine", "ray", "--dtype", "bfloat16"], "--dtype: not used with --engine ray"),
        ("bench", ["--engine", "ray", "--device", "cuda"], "--device: not used with --engine ray"),
        ("query", ["a dog", "--engine", "ray", "--codes", "faiss"], "--codes: not used with --engine ray"),
        ("query", ["a dog", "--engine", "ray", "--nprobe", "2"], "--nprobe: not used with --engine ray"),
        ("bench", ["--engine", "ray", "--ef-search", "64"], "--ef-search: not used with --engine ray"),
    ],
)
def test_options_that_would_go_unused_are_refused(pipe, monkeypatch, command, args, detail):
    """They were accepted and did nothing; refused before any index is opened or Ray started."""
    import heiindex.index
    import heiindex.ray_engine

    pf.forbid(monkeypatch, "opened", (heiindex.index.Index, "open"))
    pf.forbid(monkeypatch, "Ray started", (heiindex.ray_engine, "RayShardedIndex"))
    r = run(command, *args, "--index", pipe.index_dir)
    clean_error(r, detail)


def test_build_refuses_a_milvus_uri_without_milvus_codes(pipe, tmp_path):
    for extra in ((), ("--shards", "2")):
        r = build(pipe, tmp_path / "x", "--uri", "http://127.0.0.1:19530", *extra)
        clean_error(r, "--uri names the Milvus server of --codes milvus")
        assert not (tmp_path / "x").exists()


def test_query_needs_text_or_image_or_file(pipe, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("a dog\n")
    for args in ([], ["a dog", "--image", "1"], ["a dog", "--file", queries], ["--image", "1", "--file", queries]):
        r = run("query", *args, "--index", pipe.index_dir)
        clean_error(r, "give a TEXT query, --image ID or --file FILE (one of them)")


def test_bench_topk_too_large(pipe):
    r = run("bench", "--index", pipe.index_dir, "--topk", "25")
    clean_error(r, "--topk 25 must lie in [1, 24]")


def test_query_and_bench_take_device_and_dtype(pipe):
    d = as_json(run("query", "a dog", "--index", pipe.index_dir, "--candidates", "12", "--dtype", "bfloat16", "--json"))
    want = Index.open(pipe.index_dir, dtype="bfloat16").search("a dog", 10, 12).to_dict()
    assert d == want
    b = as_json(
        run("bench", "--index", pipe.index_dir, "--topk", "5", "--device", "cpu", "--dtype", "bfloat16", "--json")
    )
    assert b["device"] == "cpu" and b["dtype"] == "bfloat16"


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "", "meta"])
def test_a_device_torch_does_not_run_on_is_a_clear_error(pipe, tmp_path, device, monkeypatch):
    """These were RuntimeError tracebacks from torch.device (or, for "meta", a failure later);
    build checks the device before it resolves (on a fresh clone: generates) the default data."""
    import heiindex.default_data

    pf.forbid(monkeypatch, "the data was resolved first", (heiindex.default_data, "ensure_coco_sim"))
    for cmd in (["query", "a dog"], ["bench", "--topk", "5"], ["build", "--split", "test", "--out", tmp_path / "i"]):
        index = [] if cmd[0] == "build" else ["--index", pipe.index_dir]
        r = run(*cmd, *index, "--device", device)
        clean_error(r, f"Error: --device must be cpu, cuda or cuda:N, got {device!r}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(pipe):
    for cmd in (["query", "a dog"], ["bench"]):
        r = run(*cmd, "--index", pipe.index_dir, "--device", "cuda")
        clean_error(r, "Error: --device 'cuda' asked for, but torch sees no CUDA device")


@pf.needs_cuda
def test_query_and_bench_on_cuda(pipe, tmp_path):
    d = as_json(run("query", "a dog", "--index", pipe.index_dir, "--candidates", "12", "--device", "cuda", "--json"))
    assert d == Index.open(pipe.index_dir, device="cuda").search("a dog", 10, 12).to_dict()
    b = as_json(run("bench", "--index", pipe.index_dir, "--topk", "5", "--device", "cuda", "--json"))
    assert b["device"].startswith("cuda") and b["t2i"]["hei"]["seconds"] > 0
    out = tmp_path / "built-on-cuda"
    ok(build(pipe, out, "--device", "cuda"))
    # A GPU encoding may round the last bits differently and so flip a code bit that sits near
    # zero; with all 24 images as candidates the codes cannot change the answer or its scores.
    got = {
        h["id"]: h["score"]
        for h in as_json(run("query", "a dog", "--index", out, "--candidates", "24", "--json"))["results"]
    }
    want = {
        h["id"]: h["score"]
        for h in as_json(run("query", "a dog", "--index", pipe.index_dir, "--candidates", "24", "--json"))["results"]
    }
    assert got.keys() == want.keys()
    for i in got:
        assert abs(got[i] - want[i]) <= 1e-5 * max(1.0, abs(want[i]))


def test_train_hash_defaults_are_the_library_defaults():
    """The CLI writes its defaults out (it imports torch only when a command runs): they must
    stay those of HashTrainConfig / HashConfig, which made the committed module."""
    from heiindex_cli.main import cli

    from heiindex.hashing import HashConfig
    from heiindex.train_hash import HashTrainConfig

    params = {p.name: p.default for p in cli.commands["train-hash"].params}
    lib = HashTrainConfig()
    assert (params["epochs"], params["rounds"], params["lr"], params["rank_weight"], params["seed"]) == (
        lib.epochs,
        lib.rounds,
        lib.lr,
        lib.rank_weight,
        lib.seed,
    )
    assert (params["bits"], params["pooling"]) == (HashConfig().bits, HashConfig().pooling)
    assert params["val_candidates"] == lib.val_candidates


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`heiindex bench --json | head` printed "Error: Broken pipe"; a command whose reader has gone
    now exits 1 with nothing on stderr."""
    code = (
        "from heiindex_cli.main import handle_errors\n"
        "@handle_errors\n"
        "def command():\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "command()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (1, "")


def _interrupted_write(tmp_path, body: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run, in a new process with the CLI's signal handlers installed (any command installs
    them), ``body`` inside an ``atomic_dir`` block (``tmp``) replacing ``tmp_path / "out"``,
    which holds a.txt "old"."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    code = (
        "import os, signal, sys, time\n"
        "from heiindex_cli.main import cli\n"
        "from heiindex.outputs import atomic_dir\n"
        "try:\n"
        "    cli.main(['verify', sys.argv[1] + '-none'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "with atomic_dir(sys.argv[1], 'a test output', ('*.txt',)) as tmp:\n"
        "    (tmp / 'a.txt').write_text('new')\n" + body
    )
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    return done, target


def test_sigterm_ends_a_command_with_its_output_removed(tmp_path):
    """`kill PID`, `docker stop` or a job scheduler's limit left the output's scratch folder for
    the next run to clear; any command now exits 143 as Ctrl-C would, writing nothing."""
    done, target = _interrupted_write(tmp_path, "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n")
    assert done.returncode == 143, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "a.txt").read_text() == "old"
    assert [p.name for p in target.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", -2)])  # -2: an uncaught KeyboardInterrupt
def test_an_interrupt_swallowed_on_the_way_still_writes_nothing(tmp_path, signame, status):
    """pyarrow's lazy pandas import swallows the exception a signal handler raises: a build
    interrupted there went on, replaced its output and exited 0 (a review's find)."""
    body = (
        "    try:\n"
        f"        os.kill(os.getpid(), signal.{signame})\n"
        "        time.sleep(30)\n"
        "    except BaseException:\n"
        "        pass  # swallowed, as the import machinery did\n"
    )
    done, target = _interrupted_write(tmp_path, body)
    assert done.returncode == status, done.stderr
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_verify_exits_2_where_a_recorded_file_is_missing(pipe, tmp_path):
    root = pf.copy_store(pipe, tmp_path)
    (root / "test" / "captions.parquet").unlink()
    r = run("verify", root / "test")
    clean_error(r, "1 missing of 3 listed: files that differ from what their manifests record or are not there")


def test_query_and_bench_counts_are_left_to_the_library():
    """bench's --topk, query's --candidates and --k default to None: the library's defaults (100
    and 10, capped at what the index holds: heiindex.search.default_counts, run_bench)."""
    from heiindex_cli.main import cli

    def default(cmd, name):
        return next(p.default for p in cli.commands[cmd].params if p.name == name)

    assert default("bench", "topk") is None
    assert default("query", "candidates") is None and default("query", "k") is None


def test_query_defaults_fit_an_index_under_100_images(pipe):
    """`query "a dog"` on a first small index was refused: "--candidates 100 is larger than the 20
    images in this index", an option the user never gave."""
    n = pipe.n_test_images
    assert n < 100
    r = ok(run("query", "a dog", "--index", pipe.index_dir))
    assert f"(Hamming top-{n}, re-ranked by the matcher)" in r.output
    hits = as_json(run("query", "a dog", "--index", pipe.index_dir, "--json"))["results"]
    every = as_json(run("query", "a dog", "--index", pipe.index_dir, "--candidates", n, "--k", 10, "--json"))
    assert hits == every["results"] and len(hits) == 10
    clean_error(
        run("query", "a dog", "--index", pipe.index_dir, "--candidates", n + 1), f"--candidates {n + 1} is larger"
    )
    assert Index.open(pipe.index_dir).search("a dog").to_dict()["results"] == hits


def _text(*tables) -> str:
    c = Console(record=True, width=220)
    for t in tables:
        c.print(t)
    return c.export_text()


def _row_cells(table, starts: str) -> list[str]:
    """The cells of the first row of ``table`` whose first cell starts with ``starts``."""
    for line in _text(table).splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if cells and cells[0].startswith(starts):
            return cells
    raise AssertionError(f"no row starting {starts!r}")


def test_four_hits_of_five_asked_for_are_said(capsys):
    from heiindex_cli.render import print_result

    from heiindex.index import Hit, SearchResult

    hits = [Hit(i + 1, i, 1.0, 0, captions=["c"]) for i in range(4)]
    print_result(SearchResult("q", hits), False, 5)
    assert "4 of the 5 results asked for" in capsys.readouterr().out


def test_recall_table_columns():
    from heiindex_cli.render import recall_table

    cells = _row_cells(recall_table("t", [("hei", recall_row(11.0, 22.0, 33.0, 66.0, seconds=1.234))]), "hei")
    assert cells == ["hei", "11.0", "22.0", "33.0", "1", "3.0", "66.0", "1.23"]
    for medr, shown in ((1.5, "1.5"), (2.5, "2.5"), (None, "-")):  # COCO 1K's mean median ranks (not "2")
        assert (
            _row_cells(recall_table("t", [("hei", recall_row(11.0, 22.0, 33.0, 66.0, medr=medr))]), "hei")[4] == shown
        )


def test_a_text_query_lists_every_caption_of_an_image():
    from heiindex_cli.render import search_table

    from heiindex.index import Hit, SearchResult

    out = _text(search_table(SearchResult("q", [Hit(1, 7, 0.5, 3, captions=["first cap", "second cap"])]), False))
    assert "first cap" in out and "second cap" in out


def test_bench_tables_show_each_figure_in_its_column():
    from heiindex_cli.render import bench_tables

    def side(rsum):
        return bench_side(r1=1, r5=2, r10=3, rsum=rsum, hei={"meanr": None}, candidate_recall=0.987)

    res = {
        "images": 10,
        "captions": 50,
        "candidates": 5,
        "t2i": side(6.0),
        "i2t": side(7.0),
        "sweep": [
            {
                "candidates": 5,
                "t2i": {"r1": 1.0, "rsum": 6.0, "candidate_recall": 0.5},
                "i2t": {"r1": 2.0, "rsum": 7.0, "candidate_recall": 0.25},
            }
        ],
    }
    tables = bench_tables("p", res)
    assert tables[0].caption.startswith("candidate recall@5: 98.7%")
    assert "(mean rank '-': some ground truth is outside the N candidates)" in tables[0].caption
    assert _row_cells(tables[2], "5") == ["5", "1.0", "6.0", "50.0%", "2.0", "7.0", "25.0%"]
    assert "median" not in tables[0].caption
    for speedup, shown in ((4.958, "4.95x"), (4.9999, "4.99x"), (5.0, "5.00x"), (21.942, "21.94x")):
        res["t2i"]["speedup"] = speedup  # 4.958 printed "5.0x" with one decimal, rounded
        assert f"HEI speed-up over exhaustive: {shown}" in bench_tables("p", res)[0].caption
    res["t2i"]["hei"]["seconds_each"] = [1.0, 2.0, 3.0]  # --repeats 3
    caption = bench_tables("p", res)[0].caption
    assert "(HEI and exhaustive seconds: the median of 3 passes, alternated; Hamming: one pass)" in caption


def test_tables_fit_the_terminal_width_and_an_ascii_terminal(pipe):
    """Tables were 160 columns wide whatever the terminal (rows wrapped on an 80-column one), and
    an ASCII-only standard output ended a query naming a caption's "é" in a codec error."""
    env = {**os.environ, "COLUMNS": "70", "PYTHONIOENCODING": "ascii"}
    args = ["-m", "heiindex_cli.main", "query", "a dog café", "--index", str(pipe.index_dir), "--k", "2"]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "caf\\xe9" in done.stdout  # rich measured it as one column: its lines are 3 longer
    assert max(len(line.replace("\\xe9", "é")) for line in done.stdout.splitlines()) <= 70
