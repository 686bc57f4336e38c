"""heiindex.hamming: FAISS binary indexes (flat, IVF, HNSW) over packed codes."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch

from heiindex.errors import DataError, UnusedSettingWarning
from heiindex.hamming import (
    COUNTING_BYTES,
    COUNTING_SHARE,
    INDEX_TYPES,
    TorchBinaryIndex,
    counting_search,
    hamming_candidates,
    load_binary_index,
    make_binary_index,
    save_binary_index,
    search_breadth,
    set_search_breadth,
    stored_codes,
)
from heiindex.settings import SettingError

N, BYTES = 300, 8  # 300 random 64-bit codes: any two differ in about 32 bits


@pytest.fixture(scope="module")
def easy():
    """Codes, and queries that are codes 0, 10, ... 290 with one or two bits flipped."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (N, BYTES), dtype=np.uint8)
    rows = np.arange(0, N, 10)
    queries = codes[rows].copy()
    queries[:, 0] ^= 0b0000_0100  # one bit
    queries[1::2, 5] ^= 0b1000_0000  # and a second one in every other query
    return codes, queries, rows


def _check_nearest(index, codes, queries, rows, n=5):
    dist, ids = hamming_candidates(index, queries, n)
    assert dist.shape == ids.shape == (len(queries), n)
    np.testing.assert_array_equal(ids[:, 0], rows)  # the true nearest comes first
    np.testing.assert_array_equal(dist[:, 0], np.where(np.arange(len(rows)) % 2, 2, 1))
    valid = ids >= 0
    by_hand = pf.hamming_by_hand(queries, codes)
    for q in range(len(queries)):
        np.testing.assert_array_equal(dist[q][valid[q]], by_hand[q, ids[q][valid[q]]])
        assert list(dist[q][valid[q]]) == sorted(dist[q][valid[q]])


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_every_index_type_finds_the_true_nearest(easy, kind):
    codes, queries, rows = easy
    index = make_binary_index(codes, kind)
    assert index.ntotal == N and index.d == 64
    _check_nearest(index, codes, queries, rows)


def test_flat_is_exact(easy):
    codes, queries, _ = easy
    dist, ids = hamming_candidates(make_binary_index(codes, "flat"), queries, N)
    by_hand = pf.hamming_by_hand(queries, codes)
    for q in range(len(queries)):
        assert sorted(ids[q]) == list(range(N))
        np.testing.assert_array_equal(dist[q], np.sort(by_hand[q]))


@pytest.mark.parametrize("n_bytes", [1, 2, 3, 4, 8, 16, 24, 32])
def test_flat_counting_search_answers_as_the_heap_does(n_bytes):
    """Flat search takes FAISS's counting search where n is a large share of the codes: the same
    distances and ids as its heap, in its order (distance, then id), ties at the cut included."""
    rng = np.random.default_rng(n_bytes)
    # 400 codes that differ in their first byte only: many items at each distance, so the n-th
    # and the (n + 1)-th are often tied and the cut must keep the lower ids
    codes = np.zeros((400, n_bytes), dtype=np.uint8)
    codes[:, 0] = rng.integers(0, 256, 400)
    queries = np.concatenate([codes[:3], rng.integers(0, 256, (40, n_bytes), dtype=np.uint8)])
    index = make_binary_index(codes, "flat")
    by_hand = pf.hamming_by_hand(queries, codes)
    for n in (2, 37, 100, 400):
        assert counting_search(index, n)  # at least 1/COUNTING_SHARE of 400 codes, a few MB
        dist, ids = hamming_candidates(index, queries, n)
        assert index.use_heap is False
        order = np.lexsort((np.broadcast_to(np.arange(400), by_hand.shape), by_hand), axis=1)[:, :n]
        np.testing.assert_array_equal(ids, order)  # distance, then id
        np.testing.assert_array_equal(dist, np.take_along_axis(by_hand, order, 1))
        index.use_heap = True
        heap = index.search(queries, n)
        np.testing.assert_array_equal(dist, heap[0])
        np.testing.assert_array_equal(ids, heap[1])


def test_the_way_a_flat_index_is_searched_is_set_and_read_under_its_lock():
    """FAISS reads use_heap for every batch of 32 queries with the GIL released: another thread
    setting it meanwhile made a search that chose the heap (its counters above COUNTING_BYTES)
    count. The flag is set and the search made under the index's lock."""
    from heiindex.hamming import flat_search_lock

    seen = []

    class Probe(faiss.IndexBinaryFlat):
        def search(self, x, k):
            seen.append((self.use_heap, flat_search_lock(self).locked()))
            return super().search(x, k)

    index = Probe(64)
    index.add(np.zeros((COUNTING_SHARE * 10, 8), dtype=np.uint8))
    hamming_candidates(index, np.zeros((1, 8), dtype=np.uint8), 9)
    hamming_candidates(index, np.zeros((1, 8), dtype=np.uint8), 10)
    assert seen == [(True, True), (False, True)]
    assert not flat_search_lock(index).locked()


def test_flat_search_keeps_the_heap_for_a_few_of_many_codes_or_a_large_n():
    index = make_binary_index(np.zeros((COUNTING_SHARE * 10, 32), dtype=np.uint8), "flat")  # 2,000 256-bit codes
    assert counting_search(index, 10) and not counting_search(index, 9)  # n: at least 1/200 of the codes
    hamming_candidates(index, np.zeros((1, 32), dtype=np.uint8), 9)
    assert index.use_heap is True
    # counting holds 32 queries x 257 distances x n ids of 8 bytes
    most = COUNTING_BYTES // (32 * 257 * 8)
    assert most == 1020
    index = make_binary_index(np.zeros((1500, 32), dtype=np.uint8), "flat")
    assert counting_search(index, most) and not counting_search(index, most + 1)


def test_ivf_lists_and_probes(easy):
    codes, queries, rows = easy
    index = make_binary_index(codes, "ivf", nlist=10, nprobe=10)
    assert isinstance(index, faiss.IndexBinaryIVF)
    assert index.nlist == 10 and index.nprobe == 10
    _check_nearest(index, codes, queries, rows)
    assert make_binary_index(codes, "ivf").nlist == 17  # default: round(sqrt(300))
    assert make_binary_index(codes[:20], "ivf", nlist=4, nprobe=8).nprobe == 4  # never more than nlist
    with pytest.raises(ValueError, match="nlist 400 exceeds the number of codes 300"):
        make_binary_index(codes, "ivf", nlist=400)


def test_too_few_codes_per_list_warn_once_in_python_and_train_the_same_lists(easy, capfd):
    """FAISS printed its own "WARNING clustering 1000 points to 32 centroids" line on standard
    error, in the middle of a build's progress bars; now one ``SparseListsWarning`` says it,
    naming the codes and the --nlist that would do, and the lists are trained as before."""
    import warnings

    from heiindex.errors import SparseListsWarning

    codes = easy[0]  # 300 codes: 39 per list is FAISS's rule, so up to 7 lists
    with pytest.warns(SparseListsWarning) as caught:
        index = make_binary_index(codes, "ivf", nlist=10, name="images of test")
    assert [str(w.message) for w in caught] == [
        "IVF index of 300 images of test in 10 lists: 30.0 per list, fewer than the 39 FAISS advises for "
        "training their centroids, so queries may miss more candidates than they need to. "
        "`nlist` 7 or less, or `index_type` flat, avoids it"
    ]
    assert "WARNING" not in capfd.readouterr().err
    quantizer = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    plain = faiss.IndexBinaryIVF(quantizer, codes.shape[1] * 8, 10)  # FAISS's own settings: it prints
    plain.train(codes)
    assert "WARNING clustering 300 points to 10 centroids" in capfd.readouterr().err
    np.testing.assert_array_equal(stored_codes(index.quantizer), stored_codes(plain.quantizer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_binary_index(codes, "ivf", nlist=7).nlist == 7  # 42.9 per list: nothing to say
    with pytest.warns(
        SparseListsWarning,
        match=r"IVF index of 20 codes in 1 list: 20\.0 per list, .* to\. `index_type` flat avoids it$",
    ):
        make_binary_index(codes[:20], "ivf", nlist=1)  # no --nlist would do
    with pytest.warns(
        SparseListsWarning,
        match=r"IVF index of 60 codes in 2 lists: .* to\. `nlist` 1, or `index_type` flat, avoids it$",
    ):
        make_binary_index(codes[:60], "ivf", nlist=2)


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_save_load_round_trip(easy, tmp_path, kind):
    codes, queries, rows = easy
    index = make_binary_index(codes, kind, nlist=10, nprobe=10)
    save_binary_index(index, tmp_path / "x.faiss")
    back = load_binary_index(tmp_path / "x.faiss")
    assert back.ntotal == N and type(back) is type(index)
    d1, i1 = hamming_candidates(index, queries, 7)
    d2, i2 = hamming_candidates(back, queries, 7)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, i2)
    _check_nearest(back, codes, queries, rows)


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(DataError, match="binary index file missing"):
        load_binary_index(tmp_path / "none.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index at all" * 10)
    with pytest.raises(DataError, match="not a FAISS binary index") as e:
        load_binary_index(tmp_path / "junk.faiss")
    assert e.value.path == tmp_path / "junk.faiss"


def test_more_candidates_than_items_is_an_error(easy):
    codes, queries, _ = easy
    index = make_binary_index(codes[:12])
    dist, ids = hamming_candidates(index, queries, 12)
    assert sorted(ids[0]) == list(range(12))
    with pytest.raises(ValueError, match="asked for 13 candidates, but the index holds only 12 items"):
        hamming_candidates(index, queries, 13)


def test_unknown_index_type(easy):
    # a SettingError, so a HeiindexError as every refusal is (it was a plain ValueError)
    with pytest.raises(
        SettingError, match=r"^`index_type` must be one of \('flat', 'ivf', 'hnsw'\), got 'lsh'; or 'auto'"
    ):
        make_binary_index(easy[0], "lsh")


def test_code_length_follows_the_bytes():
    codes = np.zeros((3, 4), dtype=np.uint8)
    codes[1, 3] = 0xFF
    index = make_binary_index(codes)
    assert index.d == 32
    dist, ids = hamming_candidates(index, codes[1:2], 3)
    assert (int(ids[0, 0]), int(dist[0, 0])) == (1, 0)
    assert sorted(dist[0, 1:].tolist()) == [8, 8]


@pytest.mark.parametrize(
    "codes, detail",
    [
        (np.zeros((3, 2), dtype=np.int64), "got int64 of shape (3, 2)"),  # would wrap 256 to 0, not refuse
        (np.zeros((3, 2), dtype=np.float32), "got float32 of shape (3, 2)"),
        (np.zeros(8, dtype=np.uint8), "got uint8 of shape (8,)"),
        (np.zeros((3, 0), dtype=np.uint8), "got uint8 of shape (3, 0)"),
    ],
)
def test_codes_must_be_packed_bytes(codes, detail):
    for make in (make_binary_index, TorchBinaryIndex):
        with pytest.raises(
            ValueError, match=r"codes must be packed bits, an \(n, k/8\) uint8 array .*" + re.escape(detail)
        ):
            make(codes)


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_query_codes_and_counts_are_checked_before_the_search(easy, kind):
    codes, queries, _ = easy
    index = make_binary_index(codes) if kind == "flat" else TorchBinaryIndex(codes)
    with pytest.raises(ValueError, match="query codes are 32-bit, the index holds 64-bit codes"):
        hamming_candidates(index, queries[:, :4], 5)
    with pytest.raises(ValueError, match="query codes must be packed bits"):
        hamming_candidates(index, queries.astype(np.int64), 5)
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="candidates must be a whole number, at least 1, got"):
            hamming_candidates(index, queries, n)
    dist, ids = hamming_candidates(index, queries, np.int64(5))  # a numpy count is a count (FAISS needs int)
    np.testing.assert_array_equal(dist, hamming_candidates(index, queries, 5)[0])
    dist, ids = index.search(queries[:0], 5)  # no queries: empty answers
    assert dist.shape == ids.shape == (0, 5)


def test_numpy_index_settings_are_whole_numbers(easy):
    """FAISS takes no numpy integer: nlist and nprobe from numpy arrive as ints."""
    index = make_binary_index(easy[0], "ivf", nlist=np.int64(4), nprobe=np.int32(2))
    assert (index.nlist, index.nprobe) == (4, 2)


@pytest.mark.parametrize("hnsw_m, ef_search, detail", [(0, 16, "hnsw_m"), (1, 16, "hnsw_m"), (16, 0, "ef_search")])
def test_hnsw_settings_faiss_crashes_on_are_refused(easy, hnsw_m, ef_search, detail):
    with pytest.raises(ValueError, match=f"{detail} must be a whole number, at least"):
        make_binary_index(easy[0], "hnsw", hnsw_m=hnsw_m, ef_search=ef_search)  # FAISS: abort, hang or -1s


# ----------------------------------------------------------------------------- torch search


def _assert_answers_as_flat(codes, queries, ns, block=1 << 20) -> None:
    """TorchBinaryIndex over ``codes`` gives FAISS flat's distances and ids, order included."""
    index, flat = TorchBinaryIndex(codes, block=block), make_binary_index(codes, "flat")
    for n in ns:
        got, want = index.search(queries, n), flat.search(queries, n)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("block", [1 << 20, 64, 7])  # one block, and several merged (7: under half of 25)
def test_torch_index_answers_as_faiss_flat_ties_included(easy, block):
    """Ties were ordered differently from FAISS (4,126 of 5,000 coco-sim caption queries got
    another 100-candidate set), so a GPU without faiss-gpu answered otherwise than the CPU; and
    blocks fewer than half the candidates asked for failed ("selected index k out of range")."""
    codes, queries, rows = easy
    rng = np.random.default_rng(1)
    all_queries = np.concatenate([queries, rng.integers(0, 256, (40, BYTES), dtype=np.uint8)])
    few_bits = rng.integers(0, 256, (300, 1), dtype=np.uint8)  # 8 bits over 300 codes: ties everywhere
    index = TorchBinaryIndex(codes, block=block)
    assert index.ntotal == N and index.d == BYTES * 8
    _check_nearest(index, codes, queries, rows)
    _assert_answers_as_flat(codes, all_queries, (1, 25), block)
    _assert_answers_as_flat(few_bits, few_bits[:20], (5, 100, 300), block)


def test_torch_index_pads_as_faiss_where_it_holds_fewer_codes_than_asked_for():
    """Slots beyond the codes held: id -1 and the largest int32 distance, as FAISS; an empty
    index failed ("cannot reshape tensor of 0 elements")."""
    codes = np.arange(3, dtype=np.uint8)[:, None]
    for held in (codes, codes[:0]):
        _assert_answers_as_flat(held, codes[:2], (5,))


def test_torch_index_rejects_bad_codes_and_too_many_candidates():
    with pytest.raises(ValueError, match="codes must be"):
        TorchBinaryIndex(np.zeros(8, dtype=np.uint8))
    index = TorchBinaryIndex(np.zeros((3, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="only 3 items"):
        hamming_candidates(index, np.zeros((1, 2), dtype=np.uint8), 4)


def test_torch_index_returns_every_item_when_asked_for_all():
    codes = np.arange(10, dtype=np.uint8)[:, None]
    dist, ids = TorchBinaryIndex(codes).search(codes[:2], 10)
    assert dist.shape == ids.shape == (2, 10)
    assert sorted(ids[0].tolist()) == sorted(ids[1].tolist()) == list(range(10))
    np.testing.assert_array_equal(dist[0], np.sort(pf.hamming_by_hand(codes[:1], codes)[0]))


def test_index_settings_reach_faiss():
    """ef_search is HNSW's search breadth (FAISS's default 16 would cut candidate recall beyond
    16); nlist may equal the number of codes; the IVF default is the rounded square root."""
    from heiindex.hamming import resolve_index_kind

    codes = np.arange(8, dtype=np.uint8)[:, None]
    assert make_binary_index(codes, "hnsw", ef_search=200).hnsw.efSearch == 200
    assert make_binary_index(codes, "hnsw").hnsw.efSearch == 128
    assert make_binary_index(codes, "ivf", nlist=8).nlist == 8
    assert [resolve_index_kind("ivf", n)["nlist"] for n in (13, 12, 1)] == [4, 3, 1]  # sqrt 3.61, 3.46, 1


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_stored_codes_are_the_added_codes(easy, kind):
    from heiindex.hamming import index_on_device, stored_codes

    codes, _, _ = easy
    index = make_binary_index(codes, kind, nlist=4)
    np.testing.assert_array_equal(stored_codes(index), codes)
    assert index_on_device(index, "cpu") is index  # CPU keeps the FAISS index as it is


def test_auto_is_flat_up_to_the_threshold_and_ivf_above():
    from heiindex.hamming import AUTO_FLAT_MAX, AUTO_NLIST, AUTO_NPROBE, resolve_index_kind

    assert resolve_index_kind("auto", AUTO_FLAT_MAX) == {"type": "flat", "nlist": None, "nprobe": None}
    above = {"type": "ivf", "nlist": AUTO_NLIST, "nprobe": AUTO_NPROBE}
    assert resolve_index_kind("auto", AUTO_FLAT_MAX + 1) == above
    assert resolve_index_kind("auto", AUTO_FLAT_MAX + 1, nlist=64, nprobe=4)["nlist"] == 64
    assert resolve_index_kind("ivf", 10_000) == {"type": "ivf", "nlist": 100, "nprobe": 8}
    assert resolve_index_kind("hnsw", 10)["type"] == "hnsw"
    with pytest.raises(SettingError, match="`index_type` must be one of"):
        resolve_index_kind("lsh", 10)


def test_auto_index_below_the_threshold_is_flat(easy):
    codes, queries, rows = easy
    index = make_binary_index(codes, "auto")
    assert isinstance(index, faiss.IndexBinaryFlat)
    _check_nearest(index, codes, queries, rows)


def test_auto_index_above_the_threshold_is_ivf(monkeypatch, easy):
    import heiindex.hamming as hamming

    codes, _, _ = easy
    monkeypatch.setattr(hamming, "AUTO_FLAT_MAX", 100)
    monkeypatch.setattr(hamming, "AUTO_NLIST", 4)
    index = make_binary_index(codes, "auto")
    assert isinstance(index, faiss.IndexBinaryIVF) and index.nlist == 4 and index.nprobe == 4


@pf.needs_cuda
def test_torch_index_on_cuda_matches_faiss_flat_up_to_ties(easy):
    """float16 +-1 products on the GPU: the distances FAISS finds, exactly (small integers)."""
    from heiindex.hamming import TorchBinaryIndex, index_on_device

    codes, queries, rows = easy
    more = np.random.default_rng(2).integers(0, 256, (40, BYTES), dtype=np.uint8)
    all_queries = np.concatenate([queries, more])
    flat = make_binary_index(codes, "flat")
    d_faiss, _ = hamming_candidates(flat, all_queries, 25)
    on_gpu = index_on_device(flat, "cuda")
    if not hasattr(faiss, "GpuIndexBinaryFlat"):  # faiss-cpu: the torch search, in float16
        assert isinstance(on_gpu, TorchBinaryIndex) and on_gpu.dtype == torch.float16
    for index in (on_gpu, TorchBinaryIndex(codes, "cuda", block=64)):
        _check_nearest(index, codes, queries, rows)
        d_gpu, i_gpu = hamming_candidates(index, all_queries, 25)
        np.testing.assert_array_equal(d_gpu, d_faiss)
        np.testing.assert_array_equal(np.take_along_axis(pf.hamming_by_hand(all_queries, codes), i_gpu, axis=1), d_gpu)


def test_search_breadth_of_each_kind_and_its_checks():
    codes = np.random.default_rng(3).integers(0, 256, (400, 8), dtype=np.uint8)
    ivf, hnsw = make_binary_index(codes, "ivf", nlist=10, nprobe=2), make_binary_index(codes, "hnsw")
    exact = [make_binary_index(codes, "flat"), TorchBinaryIndex(codes)]
    assert [search_breadth(i) for i in (ivf, hnsw, *exact)] == [{"nlist": 10, "nprobe": 2}, {"ef_search": 128}, {}, {}]
    set_search_breadth({"a": ivf, "b": hnsw}, nprobe=10, ef_search=400)
    assert (search_breadth(ivf), search_breadth(hnsw)) == ({"nlist": 10, "nprobe": 10}, {"ef_search": 400})
    # with nprobe = nlist, IVF answers as the flat index does (distances; ids may tie)
    d_ivf, _ = ivf.search(codes[:5], 30)
    d_flat, _ = exact[0].search(codes[:5], 30)
    np.testing.assert_array_equal(d_ivf, d_flat)
    for bad in (0, True, 2.0, -1):  # checked before any is set
        with pytest.raises(SettingError, match=r"^nprobe must be a whole number"):
            set_search_breadth({"a": ivf}, nprobe=bad)
    with pytest.raises(SettingError, match=r"^ef_search must be at most 2,147,483,647, got 2,147,483,648$"):
        set_search_breadth({"b": hnsw}, ef_search=2**31)  # FAISS's C int overflowed: a raw OverflowError
    with pytest.raises(SettingError, match=r"^nprobe 11 exceeds the 10 lists of the index of the a$"):
        set_search_breadth({"a": ivf, "b": hnsw}, nprobe=11, ef_search=7)
    assert (search_breadth(ivf), search_breadth(hnsw)) == ({"nlist": 10, "nprobe": 10}, {"ef_search": 400})
    with pytest.warns(UnusedSettingWarning, match=r"^`ef_search` 9 not used: the index searches exactly \(flat\)"):
        set_search_breadth({"flat": exact[0], "gpu-like": exact[1]}, ef_search=9)


def test_an_ivf_probes_no_more_lists_than_it_has():
    """The manifest recorded nprobe 8 where the index searched its 3 lists (min dropped)."""
    from heiindex.hamming import resolve_index_kind

    assert resolve_index_kind("ivf", 10) == {"type": "ivf", "nlist": 3, "nprobe": 3}
