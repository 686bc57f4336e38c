"""heiindex.ray_engine against a real local Ray instance: item-for-item equality with the
in-process sharded index, explicit threads per actor, and a shard actor that dies mid-query."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import pipeline_fixtures as pf  # noqa: E402
from cli_helpers import as_json, clean_error, ok, run  # noqa: E402

from heiindex.errors import DataError, HeiindexError  # noqa: E402
from heiindex.ray_engine import RayShardedIndex  # noqa: E402
from heiindex.shards import build_shards  # noqa: E402

QUERIES = ["a dog on the grass", "a man riding a motorcycle", "two cats"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="heiindex-tests")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sharded(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-shards") / "test"
    return build_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, 3, index_type="flat")


@pytest.fixture(scope="module")
def served(local_ray, sharded):
    return RayShardedIndex(sharded.path, threads=1)


def _items(result):
    return [(h.rank, h.id, h.score, h.hamming, h.captions, h.text) for h in result.results]


def test_one_actor_per_shard_with_explicit_threads(served):
    assert len(served.actors) == 3
    assert [i["n_images"] for i in served.infos] == [8, 8, 8]
    assert all(i["threads"] == 1 for i in served.infos)
    assert len({i["pid"] for i in served.infos}) == 3  # separate processes


@pytest.mark.parametrize("text", QUERIES)
@pytest.mark.parametrize("candidates", [4, 8])
def test_text_queries_equal_in_process_item_for_item(served, sharded, text, candidates):
    got, want = served.search(text, 10, candidates), sharded.search(text, 10, candidates)
    assert _items(got) == _items(want)
    assert got.unknown_words == want.unknown_words
    assert got.candidates == want.candidates == 3 * candidates  # the shards' counts, sent back with their hits


@pytest.mark.parametrize("image_id", [0, 11, 23])
def test_image_queries_equal_in_process_item_for_item(served, sharded, image_id):
    image_id = int(sharded.shards[image_id // 8].image_ids[image_id % 8])
    assert _items(served.search_image(image_id, 5, 10)) == _items(sharded.search_image(image_id, 5, 10))


def test_search_many_equals_in_process_item_for_item(served, sharded):
    texts = [*QUERIES, "a dog xyzzyq"]
    got = list(served.search_many(texts, 5, 4, batch=2))
    want = list(sharded.search_many(texts, 5, 4, batch=2))
    assert [r.query for r in got] == texts
    assert [_items(r) for r in got] == [_items(r) for r in want]
    assert [r.unknown_words for r in got] == [r.unknown_words for r in want] and got[-1].unknown_words == ["xyzzyq"]


def test_search_many_refuses_bad_queries_before_any_shard_searches(served):
    with pytest.raises(HeiindexError) as err:
        served.search_many(["a dog", "", "xyzzyq"], 5, 4, where=lambda i: f"q.txt line {i + 1}")
    assert str(err.value) == (
        "2 of 3 queries refused (nothing was searched): q.txt line 2: the query is empty; "
        "q.txt line 3: no word of the query is in the model's vocabulary: xyzzyq"
    )


def test_search_many_refuses_at_the_call_in_one_batch_or_several(served):
    """As in process: a bad text is refused by the call itself, before any result; over several
    batches (a bad third text, batch=1) before the first batch is searched."""
    with pytest.raises(HeiindexError, match="query 2: the query is empty"):
        served.search_many(["a dog", ""], 5, 4)  # not iterated
    with pytest.raises(HeiindexError, match="1 of 3 queries refused .*query 3: the query is empty"):
        served.search_many(["a dog", "two cats", ""], 5, 4, batch=1)


@pytest.mark.parametrize("batch", [4, 256], ids=["batches", "one-batch"])
def test_search_images_equals_in_process_item_for_item(served, sharded, batch):
    """In batches the features are fetched per batch; in one batch they come with the lookup."""
    ids = [int(i) for s in sharded.shards for i in s.image_ids[[5, 0]]]  # two of each shard
    ids = ids[::2] + ids[1::2]  # the shards interleaved
    got = list(served.search_images(ids, 5, 10, batch=batch))
    want = list(sharded.search_images(ids, 5, 10, batch=batch))
    assert [r.query for r in got] == ids
    assert [_items(r) for r in got] == [_items(r) for r in want]
    assert [r.candidates for r in got] == [r.candidates for r in want] == [30] * len(ids)  # 10 from each shard
    with pytest.raises(
        HeiindexError, match=r"^1 of 2 image ids are not in this index \(ids 0..23\); nothing was searched: 10000$"
    ):
        served.search_images([ids[0], 10_000], 5, 10)


def test_errors_are_the_in_process_ones(served, monkeypatch):
    with pytest.raises(HeiindexError, match=r"^image id 10000 is not in this index \(ids 0..23\)$"):
        served.search_image(10_000)
    # actors an older heiindex started report no span: refused all the same, without one
    monkeypatch.setattr(served, "infos", [{k: v for k, v in i.items() if k != "image_span"} for i in served.infos])
    with pytest.raises(HeiindexError, match=r"^image id 10000 is not in this index$"):
        served.search_image(10_000)
    assert len(served.search_image(0, 3, 4).results) == 3  # and known ids are searched
    with pytest.raises(HeiindexError, match="larger than the 24 images"):
        served.search("a dog", 5, 25)
    # refused by the actors themselves (one batch): their message alone, as in process
    for texts, sharded_texts in ((["  "], "the query is empty"), (["a dog", ""], "query 2: the query is empty")):
        with pytest.raises(HeiindexError) as err:
            list(served.search_many(texts, 5, 4))
        assert str(err.value).endswith(sharded_texts) and "Traceback" not in str(err.value)
    with pytest.raises(HeiindexError) as err:
        served.search("xyzzyq", 5, 4)
    assert str(err.value) == "no word of the query is in the model's vocabulary: xyzzyq"


def test_a_shard_that_dies_mid_query_is_a_clear_error_then_restarts(served, sharded):
    served.actors[1].crash.remote()  # queued before the query's task: the actor dies under it
    with pytest.raises(HeiindexError, match=r"shard 1 \(.*shard-001\) failed during the query: its actor died"):
        served.search("a dog on the grass", 10, 8)
    deadline = time.monotonic() + 60
    while True:  # Ray restarts the actor, which reloads its shard from its files
        try:
            got = served.search("a dog on the grass", 10, 8)
            break
        except HeiindexError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert _items(got) == _items(sharded.search("a dog on the grass", 10, 8))


def test_a_dead_shard_in_an_image_lookup_is_named_by_its_own_number(served, sharded):
    """Only the shards holding a batch's images are asked for features: the error still names the
    shard that died, not its place among those asked."""
    ids = [int(i) for i in sharded.shards[2].image_ids[:2]]
    results = served.search_images(ids, 5, 10, batch=1)  # shards asked which ids they hold; fetched per batch
    served.actors[2].crash.remote()  # dies before the feature request queued behind it
    with pytest.raises(HeiindexError, match=r"shard 2 \(.*shard-002\) failed during the image lookup"):
        list(results)
    deadline = time.monotonic() + 60
    while True:  # let Ray restart it before the next test
        try:
            got = list(served.search_images(ids, 5, 10))
            break
        except HeiindexError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert [_items(r) for r in got] == [_items(r) for r in sharded.search_images(ids, 5, 10)]


def test_cli_query_with_the_ray_engine(served, sharded, pipe):
    got = as_json(run("query", "a dog", "--index", sharded.path, "--engine", "ray", "--candidates", "6", "--json"))
    assert got == sharded.search("a dog", 10, 6).to_dict()
    r = run("query", "a dog", "--index", pipe.index_dir, "--engine", "ray")
    clean_error(r, "is not a sharded build")


def test_cli_serve_then_stop(local_ray, sharded, tmp_path, monkeypatch):
    import shutil

    from heiindex import ray_engine

    waited = []  # stop_served waits for the killed actors' names (on local Ray here they go at once)
    real_wait = ray_engine._wait_unnamed
    monkeypatch.setattr(ray_engine, "_wait_unnamed", lambda r, names: waited.append(list(names)) or real_wait(r, names))

    copy = tmp_path / "served"
    shutil.copytree(sharded.path, copy)
    r = ok(run("serve", "--index", copy))
    assert r.output.count("shard ") >= 3 and f"serving {copy.resolve()} on Ray" in r.output
    names = [line.split()[3] for line in r.output.splitlines() if line.startswith("shard ")]
    assert len(names) == 3  # one actor per shard
    assert all(ray.get_actor(n, namespace="heiindex") for n in names)
    r = run("serve", "--index", copy, "--stop")
    assert r.exit_code == 0 and "stopped 3 shard actors" in r.output
    assert waited == [names]
    for n in names:  # gone when --stop returns: a serve right after it starts new actors
        with pytest.raises(ValueError):
            ray.get_actor(n, namespace="heiindex")
    ok(run("serve", "--index", copy))
    assert "stopped 3 shard actors" in ok(run("serve", "--index", copy, "--stop")).output


def test_actors_of_an_earlier_build_are_refused_and_all_stopped(local_ray, sharded, pipe, tmp_path):
    """Actors `serve` left running answered from the build they had opened after the folder was
    rebuilt (into 2 shards: a third of the images missing, without a word), and --stop then ended
    only the 2 shards the new build records, leaving the old third one running."""
    import shutil

    from heiindex.shards import write_shards

    copy = tmp_path / "served"
    shutil.copytree(sharded.path, copy)
    ok(run("serve", "--index", copy))
    write_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, copy, 2, index_type="flat")
    stale = f"the Ray actors serving shards 0, 1 of {copy.resolve()} opened an earlier build of it: stop them"
    with pytest.raises(HeiindexError, match=re.escape(stale)) as err:
        RayShardedIndex(copy)
    # the command and the Python function that stop them
    assert f"(heiindex serve --stop --index {copy.resolve()}; from Python, heiindex.ray_engine.stop_served(" in str(
        err.value
    )
    clean_error(run("query", "a dog", "--index", copy, "--engine", "ray"), stale)
    assert "stopped 3 shard actors" in ok(run("serve", "--index", copy, "--stop")).output
    fresh = RayShardedIndex(copy)  # new actors, of the build now there
    assert [i["n_images"] for i in fresh.infos] == [12, 12]
    for actor in fresh.actors:
        ray.kill(actor)


def test_bench_on_ray_equals_in_process(served, sharded):
    from heiindex.bench import run_sharded_bench

    got, want = run_sharded_bench(served, topk=6), run_sharded_bench(sharded, topk=6)
    assert got["engine"] == "RayShardedIndex" and want["engine"] == "ShardedIndex"
    for direction in ("t2i", "i2t"):
        assert got[direction]["candidate_recall"] == want[direction]["candidate_recall"]
        for method in ("hei", "hamming"):
            a = {k: v for k, v in got[direction][method].items() if k != "seconds"}
            b = {k: v for k, v in want[direction][method].items() if k != "seconds"}
            assert a == b, (direction, method)


def test_the_bench_warm_up_on_ray_answers_the_first_queries_as_in_process(served, sharded):
    """The warm-up's first queries (a cut of the packed words on Ray, a select in process) get
    the same candidates and scores from each shard."""
    for name, queries in (("bench_captions", 7), ("bench_images", 5)):
        got, want = getattr(served, name)(6, queries), getattr(sharded, name)(6, queries)
        assert len(got) == len(want) > 1  # one per shard
        for (g_ids, g_scores, g_ham), w in zip(got, want, strict=True):
            assert len(g_ids) == queries, name
            np.testing.assert_array_equal(g_ids, w.ids)
            np.testing.assert_allclose(g_scores, w.scores, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(g_ham, w.hamming)


def test_bench_actors_send_their_cached_codes(served, sharded):
    """For the bench each actor sends its shard's features with the codes its shard hashed once
    (the driver hands all of them to every actor), equal to the in-process shards' codes."""
    import numpy as np

    for actor, shard in zip(served.actors, sharded.shards, strict=True):
        words, lengths, caption_codes = ray.get(actor.caption_features.remote())
        regions, gram, image_codes = ray.get(actor.features.remote())
        np.testing.assert_array_equal(caption_codes, shard.caption_codes())
        np.testing.assert_array_equal(image_codes, shard.image_codes())
        assert len(words) == int(lengths.sum()) and len(regions) == len(gram) == len(image_codes)


def test_bench_driver_hands_every_actor_all_shards_codes(local_ray, sharded):
    """RayShardedIndex.bench_captions / bench_images give each actor the codes the shards sent
    (concatenated in shard order), so no actor hashes the queries again: checked with stand-in
    actors that record what reaches them."""
    import numpy as np

    got = []

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            return ray.put(self.fn(*args))

    class StandIn:
        def __init__(self, shard):
            self.caption_features = Method(
                lambda count: (shard.words.flat.numpy(), shard.lengths.numpy(), shard.caption_codes())
            )
            self.features = Method(lambda count: (shard.regions.numpy(), shard.gram.numpy(), shard.image_codes()))
            self.candidates_for_captions = Method(lambda w, n_, codes, n: got.append(("t2i", ray.get(codes))))
            self.candidates_for_images = Method(lambda r, g, codes, n: got.append(("i2t", ray.get(codes))))

    driver = RayShardedIndex.__new__(RayShardedIndex)
    driver.path, driver.manifest = sharded.path, sharded.manifest
    driver.actors = [StandIn(s) for s in sharded.shards]
    driver.bench_captions(5)
    driver.bench_images(5)
    captions = np.concatenate([s.caption_codes() for s in sharded.shards])
    images = np.concatenate([s.image_codes() for s in sharded.shards])
    assert [d for d, _ in got] == ["t2i"] * 3 + ["i2t"] * 3
    for direction, codes in got:
        np.testing.assert_array_equal(codes, captions if direction == "t2i" else images)


def test_bad_threads_and_an_unreachable_cluster_are_named(sharded, monkeypatch):
    """--threads -2 reached the actors and read as "actor died"; serve --stop without a cluster
    was a ConnectionError traceback. Both are named before any actor starts."""
    import heiindex.ray_engine as engine

    class NoCluster:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise ConnectionError(f"no cluster at {kwargs['address']}")

    with pytest.raises(ValueError, match="threads must be a whole number, at least 1, got -2"):
        RayShardedIndex(sharded.path, address="auto", threads=-2)
    with monkeypatch.context() as m:  # each failed inside Ray, after a local cluster had started
        m.setattr(engine, "_connect", lambda address: pytest.fail("Ray was started"))
        for kwargs, message in (
            ({"max_restarts": "x"}, "max_restarts must be a whole number, at least -1, got 'x'"),
            ({"start_timeout": -1}, "start_timeout must be a finite number, greater than 0, got -1"),
            ({"address": 5}, "address must be a non-empty string such as 'auto', got 5"),
            ({"detached": "no"}, "detached must be true or false, got 'no'"),
            ({"model_dir": ""}, "model_dir must be a path"),
            ({"path": ""}, "path must be a path"),
        ):
            with pytest.raises(HeiindexError, match="^" + re.escape(message)):
                RayShardedIndex(**{"path": sharded.path, **kwargs})
        with pytest.raises(HeiindexError, match="^address must be a non-empty string such as 'auto', got ''"):
            engine.stop_served(sharded.path, "")  # taken as "auto"
    monkeypatch.setattr(engine, "_ray", lambda: NoCluster)
    for call in (
        lambda: engine.stop_served(sharded.path, "auto"),
        lambda: engine.stop_served(sharded.path, None),  # the cluster running here, not a fresh local Ray
        lambda: RayShardedIndex(sharded.path, "auto"),
    ):
        with pytest.raises(HeiindexError, match="cannot reach a Ray cluster at 'auto': no cluster at auto") as info:
            call()
        assert str(info.value).endswith("; to start one on this machine: `ray start --head`")


def test_an_address_nothing_answers_on_fails_fast():
    """serve --address notahost:1 waited inside Ray for more than 300 s before failing."""
    import socket

    from heiindex.ray_engine import _check_reachable

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "no-such-host.invalid:6379"):
        with pytest.raises(HeiindexError, match=f"cannot reach a Ray cluster at '{address}'"):
            _check_reachable(address)
    with socket.socket() as s:  # one that listens is fine, and "auto" is Ray's to resolve
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    _check_reachable("auto")


def test_moved_models_are_named_and_can_be_given(local_ray, sharded, pipe, tmp_path):
    copy = pf.index_with_moved_models(pipe, tmp_path, sharded.path)
    # The actors' refusal comes back as theirs (it used to read "its actor died"), and fast.
    t0 = time.perf_counter()
    gone = "give the matcher folder as {} and the hash module folder as {}"
    with pytest.raises(
        DataError, match="records its matcher at .*gone-model.*" + gone.format("`model_dir`", "`hash_dir`")
    ):
        RayShardedIndex(copy, threads=1)
    assert time.perf_counter() - t0 < 60
    # pickled back with the settings it names, which the command line names by its flags
    clean_error(run("query", "--image", "0", "--index", copy, "--engine", "ray"), gone.format("--model", "--hash"))
    moved = RayShardedIndex(copy, threads=1, model_dir=pipe.model_dir, hash_dir=pipe.hash_dir)
    for text in QUERIES:
        assert _items(moved.search(text, 5, 4)) == _items(sharded.search(text, 5, 4))
    got = as_json(
        run("query", "a dog", "--index", copy, "--engine", "ray", "--model", pipe.model_dir, "--hash", pipe.hash_dir,
            "--candidates", "6", "--json")
    )  # fmt: skip
    assert got == sharded.search("a dog", 10, 6).to_dict()


def test_stop_warns_where_ray_keeps_a_stopped_actors_name(local_ray, sharded, tmp_path, monkeypatch):
    """_wait_unnamed gave up after 10 s without a word, and serve --stop returned as if the names
    were free. Here Ray's answer is held back: the stop still counts the actors, and says so."""
    import shutil
    import warnings

    from heiindex import ray_engine

    copy = tmp_path / "served"
    shutil.copytree(sharded.path, copy)
    ok(run("serve", "--index", copy))
    names = [ray_engine._actor_name(copy.resolve(), i) for i in range(3)]
    monkeypatch.setattr(ray_engine, "_wait_unnamed", lambda r, given: list(given)[1:])  # two still held
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ray_engine.stop_served(copy, None) == 3
    assert [str(w.message) for w in caught] == [
        f"Ray had not yet ended 2 of the 3 actors stopped ({names[1]}, {names[2]}); a serve started before "
        "they end would be handed them: wait a moment before serving again"
    ]


def test_wait_unnamed_returns_the_names_still_held_when_time_runs_out(local_ray):
    from heiindex import ray_engine

    live = (
        ray.remote(type("Live", (), {"ping": lambda self: 1})).options(name="held-name", namespace="heiindex").remote()
    )
    ray.get(live.ping.remote())
    try:
        assert ray_engine._wait_unnamed(ray, ["held-name", "no-such-name"], timeout=0.2) == ["held-name"]
    finally:
        ray.kill(live)
    assert ray_engine._wait_unnamed(ray, ["held-name"], timeout=10) == []


def test_a_foreign_index_in_a_shard_folder_is_refused_on_ray_as_in_process(local_ray, sharded, pipe, tmp_path):
    """The actors opened each shard folder with its own models and no check against the build:
    an unsharded index copied into shard-001 was served, every image twice."""
    import shutil

    from heiindex.shards import ShardedIndex

    copy = tmp_path / "foreign"
    shutil.copytree(sharded.path, copy)
    shutil.rmtree(copy / "shard-001")
    shutil.copytree(pipe.index_dir, copy / "shard-001")
    for open_it in (lambda: ShardedIndex.open(copy), lambda: RayShardedIndex(copy)):
        with pytest.raises(DataError, match="is not the shard .* records") as e:
            open_it()
        assert e.value.path == copy / "shard-001" / "manifest.json"
    shutil.rmtree(copy / "shard-001")
    shutil.copytree(sharded.path / "shard-001", copy / "shard-001")
    with pf.edited_json(copy / "shard-001" / "manifest.json") as m:
        m["matcher"]["sha256"] = "0" * 64  # built with another matcher
    for open_it in (lambda: ShardedIndex.open(copy), lambda: RayShardedIndex(copy)):
        with pytest.raises(DataError, match=r"was built with matcher 000000000000, not the build's"):
            open_it()


def test_drivers_own_their_actors_and_a_refusal_ends_only_its_own(local_ray, sharded, pipe, tmp_path):
    """A driver's actors were named by the index path, so a second driver borrowed the first's and
    they died with it under its queries; and a refusal killed every actor it had found, those
    that `serve` started for the other shards too. Served actors ignored a driver's --threads
    without a word."""
    import shutil
    import warnings

    from heiindex import ray_engine

    own = RayShardedIndex(sharded.path, threads=1)  # nothing served: actors of its own, unnamed
    for i in range(3):
        with pytest.raises(ValueError):
            ray.get_actor(own.actor_name(i), namespace="heiindex")
    for actor in own.actors:
        ray.kill(actor)
    copy = tmp_path / "served"
    shutil.copytree(sharded.path, copy)
    ok(run("serve", "--index", copy, "--threads", "1"))
    names = [ray_engine._actor_name(copy.resolve(), i) for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = RayShardedIndex(copy, threads=2)  # the served actors, with their one thread
    assert [i["threads"] for i in found.infos] == [1, 1, 1]
    assert [str(w.message) for w in caught] == [
        "`threads` 2: the actors `heiindex serve` started for shards 0, 1, 2 keep the threads they were started "
        "with (1, 1, 1); serve again to change them"
    ]
    ray.kill(ray.get_actor(names[1], namespace="heiindex"), no_restart=True)  # shard 1's served actor is lost
    assert ray_engine._wait_unnamed(ray, [names[1]]) == []
    with pytest.raises(HeiindexError):  # shard 1's new actor refuses the hash module given
        RayShardedIndex(copy, hash_dir=pipe.model_dir)
    assert ray.get_actor(names[0], namespace="heiindex") and ray.get_actor(names[2], namespace="heiindex")
    assert ray_engine.stop_served(copy, None) == 2


def test_stop_ends_the_actors_of_a_folder_deleted_or_rebuilt_unsharded(local_ray, sharded, pipe, tmp_path):
    """serve --stop read the build's manifest first: once the folder was gone, or held an
    unsharded index, the served actors (~0.5 GB each) could not be stopped."""
    import shutil

    from heiindex import ray_engine

    copy = tmp_path / "served"
    for unsharded in (False, True):
        shutil.copytree(sharded.path, copy)
        ok(run("serve", "--index", copy))
        shutil.rmtree(copy)
        if unsharded:
            shutil.copytree(pipe.index_dir, copy)
        assert "stopped 3 shard actors" in ok(run("serve", "--index", copy, "--stop")).output
        for i in range(3):
            with pytest.raises(ValueError):
                ray.get_actor(ray_engine._actor_name(copy.resolve(), i), namespace="heiindex")
        shutil.rmtree(copy, ignore_errors=True)


def test_auto_names_a_recorded_cluster_that_is_gone_at_once(monkeypatch):
    """With the address of a cluster whose processes ended without `ray stop` still recorded,
    --address auto retried it inside Ray for over 10 minutes."""
    import socket

    from heiindex import ray_engine

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class NotYet:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise AssertionError("ray.init was reached")

    monkeypatch.setattr(ray_engine, "_ray", lambda: NotYet)
    monkeypatch.setattr(ray_engine, "_resolved_auto", lambda a: f"127.0.0.1:{port}" if a == "auto" else a)
    with pytest.raises(HeiindexError, match=rf"^cannot reach a Ray cluster at 'auto', here 127.0.0.1:{port} \("):
        ray_engine._connect("auto")


def test_no_address_starts_a_local_ray_of_its_own(monkeypatch):
    """With no --address, ray.init joined a cluster running on this machine and refused the
    num_cpus it was given ("When connecting to an existing cluster, num_cpus ... must not be
    provided"); "local" starts a new one, as the README says."""
    from heiindex import ray_engine

    got = {}

    class Fresh:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            got.update(kwargs)

    monkeypatch.setattr(ray_engine, "_ray", lambda: Fresh)
    ray_engine._connect(None)
    assert got["address"] == "local" and got["num_cpus"] >= 1
