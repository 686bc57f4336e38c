"""heiindex.milvus_codes against a real Milvus server (the embedded standalone one the `milvus`
package ships, started here): candidates equal FAISS IndexBinaryFlat's up to ties, queries
equal the FAISS-backed index, and a server that is down is a clear error naming its URI."""

from __future__ import annotations

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from cli_helpers import as_json, build, ok, run

milvus = pytest.importorskip("milvus")
pytest.importorskip("pymilvus")

from heiindex.errors import HeiindexError  # noqa: E402
from heiindex.hamming import hamming_candidates  # noqa: E402
from heiindex.index import Index  # noqa: E402
from heiindex.milvus_codes import MilvusCodes  # noqa: E402

QUERIES = ["a dog on the grass", "a man riding a motorcycle", "two cats"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = milvus.default_server
    srv.set_base_dir(str(tmp_path_factory.mktemp("milvus")))
    srv.config.set("common.gracefulStopTimeout", 1)
    srv.config.set("common.session.ttl", 5)
    srv.start()
    yield f"http://127.0.0.1:{srv.listen_port}"
    srv.stop()


@pytest.fixture(scope="module")
def built(pipe, server, tmp_path_factory):
    out = tmp_path_factory.mktemp("milvus-index") / "test"
    return Index.build(
        pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, index_type="flat", codes="milvus", uri=server
    )


def test_manifest_and_collections(built, server):
    codes = built.manifest["codes"]
    assert codes["store"] == "milvus" and codes["uri"] == server and codes["index_type"] == "BIN_FLAT"
    assert isinstance(built.image_index, MilvusCodes) and isinstance(built.caption_index, MilvusCodes)
    assert (built.image_index.ntotal, built.caption_index.ntotal) == (24, 120)


def test_the_bench_names_milvus_as_what_it_searched(built):
    from heiindex.bench import run_bench

    assert run_bench(built, topk=5, exhaustive=False)["index_type"] == "milvus BIN_FLAT"
    assert run_bench(Index.open(built.path, codes="faiss"), topk=5, exhaustive=False)["index_type"] == "flat"


def test_candidates_equal_faiss_flat_up_to_ties(built, pipe):
    faiss_index = Index.open(built.path, codes="faiss")
    for searched, queries in (
        ((built.image_index, faiss_index.image_index), faiss_index.caption_codes()),
        ((built.caption_index, faiss_index.caption_index), faiss_index.image_codes()),
    ):
        d_m, i_m = hamming_candidates(searched[0], queries, 10)
        d_f, _ = hamming_candidates(searched[1], queries, 10)
        np.testing.assert_array_equal(d_m, d_f)  # same distances, rank by rank
        codes = faiss_index.image_codes() if searched[1] is faiss_index.image_index else faiss_index.caption_codes()
        true = pf.hamming_by_hand(queries, codes)
        np.testing.assert_array_equal(np.take_along_axis(true, i_m, axis=1), d_m)  # ids carry those distances


@pytest.mark.parametrize("text", QUERIES)
def test_queries_equal_the_faiss_backed_index(built, text):
    faiss_index = Index.open(built.path, codes="faiss")
    got, want = built.search(text, 10, 24), faiss_index.search(text, 10, 24)  # all images: no ties left
    assert [(h.id, h.score, h.hamming) for h in got.results] == [(h.id, h.score, h.hamming) for h in want.results]
    got, want = (
        built.search_image(int(built.image_ids[3]), 5, 120),
        faiss_index.search_image(int(built.image_ids[3]), 5, 120),
    )
    assert [(h.id, h.score) for h in got.results] == [(h.id, h.score) for h in want.results]


def test_cli_build_and_query_with_milvus(pipe, server, tmp_path):
    out = tmp_path / "cli-milvus"
    r = ok(build(pipe, out, "--codes", "milvus", "--uri", server, "--milvus-index", "BIN_IVF_FLAT"))
    assert f", codes also in Milvus at {server} (queries search there) -> {out}" in r.output  # it read as FAISS only
    assert Index.open(out).manifest["codes"]["index_type"] == "BIN_IVF_FLAT"
    got = as_json(run("query", "a dog", "--index", out, "--candidates", "24", "--json"))
    assert got == Index.open(out, codes="faiss").search("a dog", 10, 24).to_dict()
    # a BIN_IVF_FLAT collection of 24 codes has 4 lists; it probed 16 (beyond them) and took no --nprobe
    assert Index.open(out).search_breadth()["images"] == {"nlist": 4, "nprobe": 4}
    assert Index.open(out, nprobe=1).search_breadth()["images"] == {"nlist": 4, "nprobe": 1}
    r = run("query", "a dog", "--index", out, "--nprobe", "5")
    assert r.exit_code == 2 and "Error: --nprobe 5 exceeds the 4 lists of the index of the images of" in r.output


def test_a_server_that_is_down_is_a_clear_error(built, pipe, tmp_path, monkeypatch):
    import heiindex.index_write
    from heiindex.bench import run_bench

    down = "http://127.0.0.1:1"
    with pytest.raises(HeiindexError, match="cannot reach the Milvus server at http://127.0.0.1:1") as info:
        Index.open(built.path, codes="milvus", uri=down)
    assert str(info.value).endswith("; the index's FAISS files hold the same codes: `codes` faiss searches them")
    r = run("query", "a dog", "--index", built.path, "--uri", down)  # the way out, by its flag
    assert r.exit_code == 2 and r.output.rstrip().endswith(
        "FAISS files hold the same codes: --codes faiss searches them"
    )
    # bench named a --codes it did not have; it takes both flags now, as query does
    r = run("bench", "--topk", "5", "--index", built.path, "--uri", down)
    assert r.exit_code == 2 and r.output.rstrip().endswith("--codes faiss searches them")
    got = as_json(run("bench", "--topk", "5", "--index", built.path, "--codes", "faiss", "--json"))
    want = run_bench(Index.open(built.path, codes="faiss"), topk=5, exhaustive=False)  # its FAISS files searched
    assert got["index_type"] == "flat" and [got[d]["hei"]["r1"] for d in ("t2i", "i2t")] == [
        want[d]["hei"]["r1"] for d in ("t2i", "i2t")
    ]
    with monkeypatch.context() as m, pytest.raises(HeiindexError, match="cannot reach the Milvus server at"):
        pf.forbid(m, "the split was encoded before the server was tried", (heiindex.index_write, "ImageWriter"))
        Index.build(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "x", codes="milvus", uri=down)
    assert not (tmp_path / "x").exists()  # nothing written half-way
    with pytest.raises(HeiindexError, match="built without Milvus codes"):
        Index.open(pipe.index_dir, codes="milvus", uri=down)


def test_a_rebuild_writes_new_collections_and_drops_the_old_ones(pipe, server, tmp_path, monkeypatch):
    """A rebuild dropped and wrote again the very collections the index it replaces searched (their
    names came from its path and manifest), before its folder was swapped in: Ctrl-C left the old
    index without a Milvus index (a raw MilvusException on every query), and queries failed for
    seconds during any rebuild. The replaced build's collections were never dropped either."""
    from pymilvus import connections, utility

    import heiindex.index_write

    out = tmp_path / "m"
    build = dict(index_type="flat", codes="milvus", uri=server)
    first = Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, **build)["codes"]["collections"]
    second = Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, **build)["codes"]["collections"]
    assert set(first.values()).isdisjoint(second.values())
    connections.connect(alias="t", uri=server)
    assert not any(utility.has_collection(n, using="t") for n in first.values())  # the replaced build's
    assert all(utility.has_collection(n, using="t") for n in second.values())

    def fail(*_a, **_k):
        raise RuntimeError("interrupted after the upload")

    before = set(utility.list_collections(using="t"))
    with monkeypatch.context() as m:  # a build that fails after its upload
        m.setattr(heiindex.index_write, "write_json", fail)
        with pytest.raises(RuntimeError, match="interrupted after the upload"):
            Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, **build)
    assert set(utility.list_collections(using="t")) == before  # its own collections dropped again
    kept = Index.open(out)  # the index there still searches its own collections
    assert kept.manifest["codes"]["collections"] == second and len(kept.search("a dog", 5, 10).results) == 5
    connections.disconnect("t")


def test_milvus_ties_come_in_faiss_order():
    """Milvus returned equal distances in its own order (captions 3008, 369, 2979 of one image);
    FAISS lists them by row, the order re-ranking keeps for a tie."""
    from heiindex.milvus_codes import _in_faiss_order

    dist = np.array([[3, 1, 1, 2, 2**31 - 1], [0, 0, 0, 5, 5]], dtype=np.int32)
    ids = np.array([[9, 3008, 369, 7, -1], [2979, 369, 3008, 4, 1]], dtype=np.int64)
    d, i = _in_faiss_order(dist, ids)
    assert d.tolist() == [[1, 1, 2, 3, 2**31 - 1], [0, 0, 0, 5, 5]]
    assert i.tolist() == [[369, 3008, 7, 9, -1], [369, 2979, 3008, 1, 4]]


def test_a_sharded_rebuild_drops_the_replaced_builds_collections(pipe, server, tmp_path):
    """write_shards replaced an index whose codes were in Milvus and left its collections there,
    recorded nowhere any more."""
    from pymilvus import connections, utility

    from heiindex.shards import write_shards

    out = tmp_path / "m"
    built = Index.write(
        pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, index_type="flat", codes="milvus", uri=server
    )
    write_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, 2, index_type="flat")
    connections.connect(alias="s", uri=server)
    assert not any(utility.has_collection(n, using="s") for n in built["codes"]["collections"].values())
    connections.disconnect("s")
