"""Sharded indexes served by Ray: one actor per shard, queries scattered and merged by score.

What this module is for: ``RayShardedIndex`` opens a sharded build (``heiindex.shards``) as one
Ray actor per shard, placed by Ray over the cluster's nodes. A batch of text queries (one query
is a batch of one) goes to every actor: each checks and encodes it, takes its own Hamming top-N
and re-ranks it (texts of more than one batch, or named for their errors by ``where``, as
``query --file`` does, are checked by one actor first, before any is searched).
A batch of image queries first asks every actor which of the ids it holds (unknown ids are
refused before any search), fetches each image's features from its shard, then sends the batch to
every actor. The driver merges the shards' top-k by score (``heiindex.shards.merge_hits``), so the answer is item for item the
in-process ``ShardedIndex`` answer.

Threads: Ray starts workers with ``OMP_NUM_THREADS=1``; each actor sets torch's thread count
explicitly (``threads``), and heiindex's OpenMP defaults (set on import: short spins, then sleep;
see ``heiindex/__init__.py``) keep more than one thread per actor from spinning against the others.

Faults: actors restart (``max_restarts``) and reload their shard from its files; a query whose
shard dies under it raises ``HeiindexError`` naming the shard (never a silent partial answer);
the next query is served by the restarted actor.

Every node must see the shard folders at the same path (local copies or shared storage).
What it must not do: build indexes or compute scores itself.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DataError, HeiindexError, HeiindexWarning, name_some
from .index import Hits, SearchResult
from .index_manifest import check_shards, read_index_manifest, read_sharded_manifest
from .manifests import manifest_digest
from .search import BatchSearch, refuse_queries
from .settings import SettingError, require, require_flag, require_path
from .shards import (
    batch_results,
    first_counts,
    locate_images,
    shard_search_regions,
    shard_search_text,
)

__all__ = ["NAMESPACE", "RayShardedIndex", "stop_served"]

NAMESPACE = "heiindex"


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - the extra is part of the dev install
        raise HeiindexError("the Ray engine needs Ray: pip install 'heiindex[ray]'") from None
    return ray


class _ShardServer:
    """One shard in one process (the body of the Ray actor)."""

    def __init__(
        self, shard_path: str, threads: int, model_dir: str | None = None, hash_dir: str | None = None
    ) -> None:
        import torch

        from .index import Index

        torch.set_num_threads(threads)
        self.pid = os.getpid()
        # which build of the shard this actor serves: a rebuild of the folder changes it, and a
        # later driver that finds this actor by name must not be served the old one
        self.manifest_sha256 = manifest_digest(Path(shard_path))
        # A refusal here (models moved, a damaged file) is kept for ``info``, the driver's first
        # call: raised from the constructor, it reads on the driver as "the actor died", and Ray
        # would start it again and again.
        self.refused: HeiindexError | None = None
        try:
            self.index = Index.open(shard_path, model_dir, hash_dir)
        except HeiindexError as exc:
            self.index, self.refused = None, exc

    def info(self) -> dict:
        import torch

        if self.refused is not None:
            raise self.refused
        return {
            "pid": self.pid,
            "threads": torch.get_num_threads(),
            "n_images": self.index.n_images,
            "image_span": self.index.image_span,
            "manifest_sha256": self.manifest_sha256,
        }

    def query_problems(self, texts: list[str]) -> list[tuple[int, str]]:
        from .search import query_problems

        return query_problems(self.index.matcher.vocab, texts)[1]

    def search_many(self, texts: list[str], k: int, candidates: int) -> tuple[list[Hits], list[list[str]]]:
        """This shard's hits for each of a batch of text queries, and their unknown words."""
        from .search import check_queries, encode_queries

        queries = encode_queries(self.index.model, check_queries(self.index.matcher.vocab, texts))
        return shard_search_text(self.index, queries, k, candidates), queries.unknown

    def lookup_images(self, image_ids: list[int], features: bool):
        """This shard's row of each id (-1 where not its image) and, with ``features``, the features
        of the ids it holds, in order (one round trip for a request of one batch)."""
        rows = self.index.image_rows(image_ids)
        held = rows[rows >= 0]
        return rows, self.image_features(held) if features and len(held) else None

    def image_features(self, rows):
        """The encoded regions and Gram matrices (float32) and the codes of this shard's image
        ``rows`` (``Index.image_features``)."""
        regions, gram, codes = self.index.image_features(rows)
        return regions.float().cpu().numpy(), gram.float().cpu().numpy(), codes

    def search_regions(self, regions, gram, k: int, candidates: int, codes=None) -> list[Hits]:
        import torch

        return shard_search_regions(self.index, torch.from_numpy(regions), torch.from_numpy(gram), k, candidates, codes)

    def bench_meta(self) -> dict:
        return self.index.bench_meta()

    def candidates_for_captions(self, words, lengths, codes, n: int):
        import torch

        from .packed import PackedWords

        packed = PackedWords(torch.from_numpy(words), torch.from_numpy(lengths))
        return self.index.candidates_for_captions(packed, packed.lengths, n, codes)

    def features(self, count: int | None = None):
        """This shard's images (the first ``count``, or all): regions, Gram matrices (float32) and
        their codes."""
        index = self.index
        cut = slice(count)
        return (
            index.regions[cut].float().cpu().numpy(),
            index.gram[cut].float().cpu().numpy(),
            index.image_codes()[cut],
        )

    def caption_features(self, count: int | None = None):
        """This shard's captions (the first ``count``, or all): words packed ((total_words, d)
        float32; the first captions' words come first), lengths and codes."""
        index = self.index
        lengths = index.lengths[slice(count)].cpu().numpy()
        words = index.words.flat[: int(lengths.sum())]
        return words.float().cpu().numpy(), lengths, index.caption_codes()[slice(count)]

    def candidates_for_images(self, regions, gram, codes, n: int):
        import torch

        return self.index.candidates_for_images(torch.from_numpy(regions), torch.from_numpy(gram), n, codes)

    def crash(self) -> None:
        """End this actor's process at once (fault tests: Ray restarts it)."""
        os._exit(1)


def check_texts(
    path: str | Path,
    texts: list[str],
    where: Callable[[int], str] | None = None,
    model_dir: str | Path | None = None,
) -> None:
    """Text queries checked against the matcher's vocabulary in this process, as the shard actors
    would check them (``heiindex.search.check_queries``; ``where(position)`` names a query in a
    message), so that a refused query file costs no Ray start first (13 s against 4 s in
    process, for the CLI). The vocabulary is that of ``model_dir``, else of the matcher the build
    at ``path`` records; where neither can be read here (a moved folder, a damaged manifest),
    this checks nothing and the actors check the texts as they search them."""
    from .search import check_queries
    from .vocab import Vocab

    try:
        folder = read_index_manifest(Path(path))["matcher"]["path"] if model_dir is None else model_dir
        vocab = Vocab.load(Path(folder) / "vocab.json")
    except (HeiindexError, KeyError, TypeError):
        return
    check_queries(vocab, texts, where)


class RayShardedIndex(BatchSearch):
    """A sharded build served by Ray actors.

    ``address``: a running cluster ("auto", "ray://host:10001", ...); None starts a local Ray in
    this process. ``threads``: torch threads per actor (default: this process's count, so that
    products are summed in the same order and scores match in-process ones to the last bit). ``detached``: actors outlive this driver
    (``heiindex serve``); later drivers with the same index path find them by name and use them
    (their threads stay as started). Otherwise, where none serves a shard, its actor is this
    driver's own, unnamed, and ends with it.
    ``model_dir`` / ``hash_dir``: the matcher and hash module folders for every actor to open
    where the ones the build recorded have moved (the same path on every node); they must be
    the recorded ones by checksum. Actors already serving the index keep what they opened.
    """

    sharded = True

    def __init__(
        self,
        path: str | Path,
        address: str | None = None,
        threads: int | None = None,
        detached: bool = False,
        max_restarts: int = 3,
        start_timeout: float = 300.0,
        model_dir: str | Path | None = None,
        hash_dir: str | Path | None = None,
    ) -> None:
        import torch

        self.path = require_path("path", path).resolve()
        # Before Ray starts (a bad one failed inside Ray, after a local cluster had started)
        max_restarts = require("max_restarts", max_restarts, at_least=-1, integer=True)  # -1: Ray's "for ever"
        start_timeout = require("start_timeout", start_timeout, above=0)
        _check_address(address)
        detached = require_flag("detached", detached)  # "no" started actors that outlive this driver
        model_dir, hash_dir = (
            None if f is None else require_path(n, f) for n, f in (("model_dir", model_dir), ("hash_dir", hash_dir))
        )
        self.manifest = read_sharded_manifest(self.path)  # before Ray: an unsharded index is refused as such
        check_shards(self.path, self.manifest)  # as in-process: each actor opens its shard with its own models
        asked = threads
        if threads is not None:  # checked here: an actor that fails on it reads as "actor died"
            require("threads", threads, at_least=1, integer=True)
        threads = threads or torch.get_num_threads()
        ray = _connect(address)
        actor_cls = ray.remote(_ShardServer)
        options = {
            # No CPU reservation (a reservation the cluster cannot meet leaves an actor pending
            # for ever); SPREAD places the shards over the nodes, threads are set explicitly.
            "num_cpus": 0,
            "scheduling_strategy": "SPREAD",
            "max_restarts": max_restarts,
            "max_task_retries": 0,  # a task on a dying actor fails loudly, it is not re-run
            "namespace": NAMESPACE,
        }
        # Folders for the actors to open, absolute: an actor's working directory is not this one's.
        models = [None if f is None else str(Path(f).resolve()) for f in (model_dir, hash_dir)]
        # Actors `serve` started (detached, named by the path) are used where there are; other
        # actors are this driver's own, unnamed: named, a second driver borrowed the first's, and
        # they died with it under the second's queries.
        self.actors, created = [], []
        for i, e in enumerate(self.manifest["shards"]):
            name, args = self.actor_name(i), (str(self.path / e["path"]), threads, *models)
            try:
                self.actors.append(ray.get_actor(name, namespace=NAMESPACE))
                created.append(False)
                continue
            except ValueError:
                pass
            named = {"name": name, "lifetime": "detached", "get_if_exists": True} if detached else {}
            self.actors.append(actor_cls.options(**options, **named).remote(*args))
            created.append(True)
        self.infos, refusing = [], None
        futures = [a.info.remote() for a in self.actors]
        for i, future in enumerate(futures):
            try:
                self.infos += self._gather([future], "start", timeout=start_timeout, shards=[i])
            except HeiindexError as exc:  # a shard refused to open: its actor serves nothing
                refusing, refusal = i, exc
                _settle(futures[i + 1 :])
                break
        if refusing is not None:  # the actors started here, and the refusing shard's, are ended
            ended = [j for j in range(len(self.actors)) if created[j] or j == refusing]
            for j in ended:
                ray.kill(self.actors[j])
            _wait_unnamed(ray, [self.actor_name(j) for j in ended if detached or not created[j]])
            raise _as_given_here(refusal) from None
        self._refuse_stale(address)
        kept = [i for i, info in enumerate(self.infos) if not created[i] and info.get("threads") != threads]
        if asked is not None and kept:
            warnings.warn(
                HeiindexWarning(
                    f"`threads` {asked}: the actors `heiindex serve` started for shard{'s' if len(kept) > 1 else ''} "
                    f"{', '.join(map(str, kept))} keep the threads they were started with "
                    f"({', '.join(str(self.infos[i]['threads']) for i in kept)}); serve again to change them",
                    settings=("threads",),
                ),
                stacklevel=2,
            )

    def _refuse_stale(self, address: str | None) -> None:
        """``HeiindexError`` where actors found by name (``heiindex serve``'s) opened another build
        of their shard than the folder now holds: after a rebuild they answered from the old one,
        missing a third of the images, without a word."""
        stale = [
            i
            for i, (info, e) in enumerate(zip(self.infos, self.manifest["shards"], strict=True))
            if info.get("manifest_sha256") != manifest_digest(self.path / e["path"])
        ]
        if stale:
            at = f" --address {address}" if address else ""
            raise HeiindexError(
                f"the Ray actors serving shard{'s' if len(stale) > 1 else ''} {', '.join(map(str, stale))} of "
                f"{self.path} opened an earlier build of it: stop them (heiindex serve --stop --index {self.path}{at}; "
                f"from Python, heiindex.ray_engine.stop_served({str(self.path)!r}, {address!r})) and serve the build "
                "again"
            )

    def actor_name(self, i: int) -> str:
        return _actor_name(self.path, i)

    def _gather(self, futures: list, what: str, timeout: float | None = None, shards: list[int] | None = None) -> list:
        """The replies, in order; ``shards``: the shard of each future where not one per shard, in
        order (an error names the shard that failed)."""
        ray = _ray()
        out = []
        for pos, f in enumerate(futures):
            i = pos if shards is None else shards[pos]
            try:
                out.append(ray.get(f, timeout=timeout))
            except ray.exceptions.GetTimeoutError:
                raise HeiindexError(
                    f"shard {i} did not answer within {timeout:.0f} s during {what}: "
                    "can every node read the shard folders and import heiindex?"
                ) from None
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                path = self.path / self.manifest["shards"][i]["path"]
                raise HeiindexError(
                    f"shard {i} ({path}) failed during {what}: its actor died ({type(exc).__name__}); "
                    "Ray restarts it from its files, run the query again"
                ) from None
            except ray.exceptions.RayTaskError as exc:  # the actor refused the request: its error alone
                if isinstance(exc.cause, HeiindexError):
                    _settle(futures[pos + 1 :])
                    raise exc.cause from None  # as raised there (a DataError keeps its path)
                raise
        return out

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def n_captions(self) -> int:
        return int(self.manifest["n_captions"])

    def shard_sizes(self, image_query: bool) -> list[int]:
        return [int(e["n_captions" if image_query else "n_images"]) for e in self.manifest["shards"]]

    # -- the sharded bench (heiindex.bench.run_sharded_bench): every shard at once -------------
    def bench_metas(self) -> list[dict]:
        return self._gather([a.bench_meta.remote() for a in self.actors], "the bench")

    # ``queries``: only the first that many (the bench's warm-up), sent by the first shards only,
    # else all.
    def bench_captions(self, n: int, queries: int | None = None) -> list:
        import numpy as np

        ray = _ray()
        feats = self._first(queries, image_query=True, method="caption_features")
        # packed words: no padding travels; the codes are those each shard hashed, once
        words, lengths, codes = (ray.put(np.concatenate([f[i] for f in feats])) for i in range(3))
        return self._gather(
            [a.candidates_for_captions.remote(words, lengths, codes, n) for a in self.actors], "the bench"
        )

    def bench_images(self, n: int, queries: int | None = None) -> list:
        import numpy as np

        ray = _ray()
        feats = self._first(queries, image_query=False, method="features")
        regions, gram, codes = (ray.put(np.concatenate([f[i] for f in feats])) for i in range(3))
        return self._gather([a.candidates_for_images.remote(regions, gram, codes, n) for a in self.actors], "the bench")

    def _first(self, queries: int | None, image_query: bool, method: str) -> list:
        """The features (actor ``method``) of the first ``queries`` captions (``image_query``:
        those the images search) or images, from the shards holding them, or of all."""
        counts = first_counts(self.shard_sizes(image_query), queries)
        calls = [getattr(a, method).remote(c) for a, c in zip(self.actors, counts, strict=True) if c]
        return self._gather(calls, "the bench")

    def _search_texts(self, texts: list[str], k, candidates, batch: int, where) -> Iterator[SearchResult]:
        """Every text is checked before any is searched, then each batch goes to all shards at once
        and is merged here. Texts that fit in one batch, with no ``where``, are checked by the
        actors as they search them, here and now (no extra round trip; a refusal is raised by this
        call, as in process); more batches, or a ``where`` to name them by, are checked by one actor
        first, and searched as the results are read."""
        if len(texts) > batch or where is not None:
            problems = self._gather([self.actors[0].query_problems.remote(texts)], "the query check")[0]
            refuse_queries(problems, len(texts), where)
            return self._search_batches(texts, k, candidates, batch)
        answered = list(self._search_batches(texts, k, candidates, batch))  # one batch at most
        return iter(answered)

    def _search_batches(self, texts: list[str], k: int, candidates: int, batch: int) -> Iterator[SearchResult]:
        for start in range(0, len(texts), batch):
            t0 = time.perf_counter()
            part = texts[start : start + batch]
            replies = self._gather([a.search_many.remote(part, k, candidates) for a in self.actors], "the query")
            yield from batch_results(part, [r[0] for r in replies], replies[0][1], k, t0)

    def _search_images(self, image_ids: list[int], k, candidates, batch: int) -> Iterator[SearchResult]:
        """Every actor says which ids it holds (unknown ids are refused before any search; for a
        request of one batch it sends their features in the same reply), each image's features come
        from its shard, then each batch goes to all shards at once and is merged here."""
        import numpy as np

        t0 = time.perf_counter()
        if not image_ids:
            return iter([])
        one_batch = len(image_ids) <= batch
        replies = self._gather([a.lookup_images.remote(image_ids, one_batch) for a in self.actors], "the image lookup")
        # actors that an older heiindex started report no span: the refusal then gives none
        spans = [i["image_span"] for i in self.infos] if all("image_span" in i for i in self.infos) else None
        shard_of, own_rows = locate_images(image_ids, [r[0] for r in replies], spans)
        if not one_batch:
            return self._image_batches(image_ids, shard_of, own_rows, k, candidates, batch)
        feats = self._assemble(
            len(image_ids),
            [(np.flatnonzero(shard_of == s), np.flatnonzero(r[0] >= 0), r[1]) for s, r in enumerate(replies)],
        )
        return iter(list(self._search_batch(image_ids, feats, k, candidates, t0)))

    def _image_batches(self, image_ids, shard_of, rows, k: int, candidates: int, batch: int):
        import numpy as np

        for start in range(0, len(image_ids), batch):
            t0 = time.perf_counter()
            part, shards, part_rows = (
                image_ids[start : start + batch],
                shard_of[start : start + batch],
                rows[start : start + batch],
            )
            holders = [s for s in range(len(self.actors)) if (shards == s).any()]
            asked = [np.flatnonzero(shards == s) for s in holders]  # the positions each holder answers for
            futures = [
                self.actors[s].image_features.remote(part_rows[pos]) for s, pos in zip(holders, asked, strict=True)
            ]
            found = self._gather(futures, "the image lookup", shards=holders)
            feats = self._assemble(
                len(part),
                [(pos, pos, f) for pos, f in zip(asked, found, strict=True)],  # listed as asked
            )
            yield from self._search_batch(part, feats, k, candidates, t0)

    @staticmethod
    def _assemble(n: int, parts: list) -> tuple:
        """One batch's features from the shards' replies: ``parts`` holds, per shard, the batch
        positions it answers for, the positions its features are listed for, and those features
        (regions, gram, codes) or None. Returns (regions, gram, codes) of the ``n`` images."""
        import numpy as np

        out = None
        for want, listed, feats in parts:
            if not len(want):
                continue
            if out is None:
                out = tuple(np.empty((n, *f.shape[1:]), dtype=f.dtype) for f in feats)
            at = np.searchsorted(listed, want)  # where each wanted position sits in the shard's list
            for whole, f in zip(out, feats, strict=True):
                whole[want] = f[at]
        return out

    def _search_batch(self, image_ids, feats: tuple, k: int, candidates: int, t0: float):
        ray = _ray()
        regions, gram, codes = (ray.put(f) for f in feats)
        replies = self._gather(
            [a.search_regions.remote(regions, gram, k, candidates, codes) for a in self.actors], "the image query"
        )
        yield from batch_results(image_ids, replies, None, k, t0)


def _wait_unnamed(ray, names: list[str], timeout: float = 10.0) -> list[str]:
    """Wait (at most ``timeout`` s) until no actor holds ``names``: a killed actor keeps its name
    until Ray has ended it, and a driver started at once would be handed the dying one. Returns
    the names still held when the time ran out."""
    deadline = time.monotonic() + timeout
    held = []
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            if time.monotonic() >= deadline:
                held.append(name)
                break
            time.sleep(0.05)
    return held


def _settle(futures: list) -> None:
    """Wait for and drop the replies of the other shards to a request one shard refused (every shard
    refuses the same input; an error reply never fetched is logged by Ray as unhandled)."""
    ray = _ray()
    for f in futures:
        try:
            ray.get(f)
        except ray.exceptions.RayError:
            pass


def _check_address(address) -> None:
    """A Ray cluster's address: None (the one running here) or a non-empty string such as "auto";
    anything else failed inside Ray, after a local cluster had started."""
    if address is not None and (not isinstance(address, str) or not address):
        raise SettingError("address", f"address must be a non-empty string such as 'auto', got {address!r}")


def stop_served(path: str | Path, address: str | None) -> int:
    """Kill the detached actors ``heiindex serve`` started for ``path`` on the cluster at ``address``
    (None: the one running here, as Ray's "auto"); returns how many. Returns once their names are
    free (at most ~10 s), so that a ``serve`` right after it starts new actors instead of finding
    the dying ones."""
    path = require_path("path", path).resolve()
    _check_address(address)  # "" was taken as "auto"
    try:
        recorded = len(read_sharded_manifest(path)["shards"])
    except DataError:  # the folder is gone, or holds an unsharded build now: its actors still run
        recorded = 0
    ray = _connect("auto" if address is None else address)  # the running cluster: a fresh local Ray would serve nothing
    stopped = []
    # every shard the build records, and beyond them those of an earlier build of more shards
    # (a 3-shard build's shard 2 outlived a rebuild into 2 shards and its stop)
    for i in itertools.count():
        name = _actor_name(path, i)
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # no such actor: past the recorded shards, the first gap ends the search
            if i >= recorded:
                break
            continue
        stopped.append(name)
    held = _wait_unnamed(ray, stopped)
    if held:
        warnings.warn(
            HeiindexWarning(
                f"Ray had not yet ended {len(held)} of the {len(stopped)} actors stopped ({name_some(held)}); "
                "a serve started before they end would be handed them: wait a moment before serving again"
            ),
            stacklevel=2,
        )
    return len(stopped)


def _connect(address: str | None):
    """The ``ray`` module, initialised: on the cluster at ``address`` (a clear error where none
    answers there), or on a local Ray started for this process where ``address`` is None."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address is None:  # "local": a new Ray for this process, even where a cluster runs on this machine
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace=NAMESPACE
        )
        return ray
    _check_reachable(address)
    if (found := _resolved_auto(address)) != address:
        try:
            _check_reachable(found)
        except HeiindexError as exc:
            raise HeiindexError(
                f"cannot reach a Ray cluster at {address!r}, here {found} (RAY_ADDRESS, or the cluster the last "
                f"`ray start` on this machine recorded: if it has ended, `ray stop` clears it): "
                f"{str(exc).split(': ', 1)[-1]}"
            ) from None
    try:
        ray.init(address=address, log_to_driver=False, namespace=NAMESPACE)
    except ConnectionError as exc:
        raise HeiindexError(
            f"cannot reach a Ray cluster at {address!r}: {str(exc).rstrip('.')}; to start one on this machine: "
            "`ray start --head`"
        ) from None
    return ray


# The shard's Index.open names the folders as its own parameters; here they are model_dir and hash_dir.
_HERE = {"matcher": "model_dir", "hasher": "hash_dir"}


def _as_given_here(exc: HeiindexError) -> HeiindexError:
    """``exc`` (an actor's refusal) naming the folders by this class's parameters (a moved matcher
    read "give the matcher folder as `matcher`", which ``RayShardedIndex`` does not take)."""
    if not isinstance(exc, DataError) or not set(exc.settings) & set(_HERE):
        return exc
    problem = exc.problem
    for theirs, ours in _HERE.items():
        problem = problem.replace(f"`{theirs}`", f"`{ours}`")
    return DataError(exc.path, problem, settings=tuple(_HERE.get(s, s) for s in exc.settings))


def _resolved_auto(address: str) -> str:
    """The ``host:port`` Ray's "auto" stands for here (``RAY_ADDRESS``, else the cluster the last
    ``ray start`` on this machine recorded, else one running here), found as Ray finds it but
    without connecting, so that ``_check_reachable`` can try it: a cluster whose processes ended
    without ``ray stop`` left its address recorded, and Ray retried it for over 10 minutes.
    Other addresses, and "auto" where Ray's lookup is not there to call or finds nothing, are
    returned as given (``ray.init`` then says there is no cluster)."""
    if address != "auto":
        return address
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(address, None) or address
    except (ImportError, TypeError, ConnectionError):  # another Ray, or no cluster: Ray says so itself
        return address


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must resolve and accept a TCP connection
    (the connection attempt is bounded by ``timeout`` seconds; the name lookup by the system's
    resolver): Ray itself retries an unreachable one for minutes before it fails. ``auto`` and
    other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise HeiindexError(f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc}") from None


def _actor_name(path: Path, i: int) -> str:
    """The name of the actor serving shard ``i`` of the build at (resolved) ``path``."""
    return f"shard-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}-{i:03d}"
