"""The two HEI query pipelines, on features held in memory.

What this module is for: text to images (code the encoded captions, Hamming top-N over the
image codes, re-rank the N with the matcher) and image to text (the same from encoded images
over the caption codes). ``rerank_images`` / ``rerank_captions`` do it for a batch of queries
and are the one implementation that the bench, ``Index.candidates_for_*`` (shards, Ray, and
``search_image`` / ``search_images``) and ``images_for_text`` (``Index.search`` and
``search_many``: one query is a batch of one) share; ``top_k`` takes each query's best.
``benchmarks/latency.py`` times the same calls, so the latency measured is the latency served. Queries are checked here, all of a request before
any is searched (``check_queries``: empty or all-unknown texts; ``check_image_ids``), and texts
are encoded together (``encode_queries``).
What it must not do: read files (``heiindex.index_files``), or format results for people (the CLI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .attention import score_pairs
from .errors import DataError, HeiindexError, name_some, shown
from .hamming import hamming_candidates
from .hashing import HashModule
from .model import ScanModel
from .settings import SettingError, is_whole, require
from .vocab import MAX_CAPTION_WORDS, Encoded, Vocab

if TYPE_CHECKING:  # heiindex.index imports this module
    from .index import SearchResult

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_K",
    "MAX_QUERY_WORDS",
    "QUERY_BATCH",
    "BatchSearch",
    "Candidates",
    "EncodedQueries",
    "Ranked",
    "bench_depth",
    "check_batch",
    "check_image_ids",
    "check_queries",
    "check_query_counts",
    "default_counts",
    "encode_queries",
    "encode_text",
    "id_span",
    "images_for_text",
    "pooled_candidates",
    "query_file_lines",
    "query_problems",
    "refuse_queries",
    "refuse_unknown_images",
    "rerank_captions",
    "rerank_images",
    "top_k",
]


# Queries searched together by search_many (encoded, hashed and re-ranked: 256 captions' words and
# 256 x N candidate pairs at a time) and by search_images (256 images' regions).
QUERY_BATCH = 256
MAX_QUERY_WORDS = MAX_CAPTION_WORDS  # words (tokens) a query may have, as a stored caption
DEFAULT_CANDIDATES = 100  # N, Hamming candidates re-ranked, where a query does not say
DEFAULT_K = 10  # results returned, where a query does not say
_INT64 = (-(2**63), 2**63 - 1)  # image ids are stored as int64


class BatchSearch:
    """``search`` / ``search_many`` (text to image) and ``search_image`` / ``search_images`` (image to
    text) for ``Index``, ``ShardedIndex`` and ``RayShardedIndex``, one query being a batch of one.
    Each class implements ``_search_texts(texts, k, candidates, batch, where)`` and
    ``_search_images(ids, k, candidates, batch)``, which check everything at once (raising before
    any search) and return the generator of results; N and k reach them checked
    (``check_counts``, over ``shard_sizes``). ``sharded``: a sharded build, however many shards."""

    sharded = False

    def search(self, text: str, k: int | None = None, candidates: int | None = None) -> SearchResult:
        """Images for a caption: Hamming top-``candidates``, re-ranked by the matcher, top ``k``
        (a ``SearchResult``). By default N is 100 (or k where larger) and k 10, each capped at
        what there is (``default_counts``); an N or k given is refused where the index cannot
        fill it."""
        return next(self.search_many([text], k, candidates))

    def search_many(
        self,
        texts: Sequence[str],
        k: int | None = None,
        candidates: int | None = None,
        batch: int = QUERY_BATCH,
        where: Callable[[int], str] | None = None,
    ) -> Iterator[SearchResult]:
        """``search`` for many captions, in order, ``batch`` at a time (each batch encoded, hashed
        and re-ranked together; ``list()`` it for all results). Every text is checked before any
        is searched: empty or all-unknown ones are refused together, named by ``where(position)``
        (default "query 3"). A result's ``seconds`` is its batch's time shared equally."""
        candidates, k = self.query_counts(candidates, k, image_query=False)
        texts = check_batch(texts, batch)
        candidates, k = check_counts(candidates, k, self.shard_sizes(False), "images", self.sharded)
        return self._search_texts(texts, k, candidates, batch, where)

    def search_image(self, image_id: int, k: int | None = None, candidates: int | None = None) -> SearchResult:
        """Captions for a stored image: Hamming top-``candidates``, re-ranked, top ``k``."""
        return next(self.search_images([image_id], k, candidates))

    def search_images(
        self,
        image_ids: Sequence[int],
        k: int | None = None,
        candidates: int | None = None,
        batch: int = QUERY_BATCH,
    ) -> Iterator[SearchResult]:
        """``search_image`` for many stored images, in order, ``batch`` at a time; every id is
        checked before any is searched (ids not in the index are refused together)."""
        candidates, k = self.query_counts(candidates, k, image_query=True)
        image_ids = check_image_ids(image_ids, batch)
        candidates, k = check_counts(candidates, k, self.shard_sizes(True), "captions", self.sharded)
        return self._search_images(image_ids, k, candidates, batch)

    def query_counts(self, candidates: int | None, k: int | None, image_query: bool) -> tuple[int, int]:
        """N and k of a text query (``image_query`` False) or an image query where not given
        (None): ``default_counts`` over this index's items, a sharded build's pooled."""
        return default_counts(candidates, k, self.shard_sizes(image_query), "captions" if image_query else "images")

    def shard_sizes(self, image_query: bool) -> list[int]:
        """What each shard holds of the items a query searches: captions for an image query, else
        images (an unsharded index is one shard)."""
        return [self.n_captions if image_query else self.n_images]

    def _search_texts(self, texts: list[str], k, candidates, batch: int, where) -> Iterator:
        raise NotImplementedError

    def _search_images(self, image_ids: list[int], k, candidates, batch: int) -> Iterator:
        raise NotImplementedError


@dataclass
class EncodedQueries:
    """A batch of encoded text queries: ``words`` (q, L, d), zero beyond ``lengths`` (q,);
    ``unknown``: the out-of-vocabulary words of each query (mapped to ``<unk>``), each named once,
    in the order they first occur."""

    words: Tensor
    lengths: Tensor
    unknown: list[list[str]]

    def __len__(self) -> int:
        return len(self.unknown)


@dataclass
class Ranked:
    """Top-k items of one query, best first: rows into the searched set, matcher scores,
    Hamming distances of their codes to the query's code; ``found``: the candidates they were
    ranked from (fewer than N where an approximate index's search came back short)."""

    rows: np.ndarray
    scores: np.ndarray
    hamming: np.ndarray
    found: int


def _known(enc: Encoded) -> list[str]:
    """The tokens of ``enc`` that are in the vocabulary (an unknown one is searched as ``<unk>``)."""
    unknown = set(enc.unknown)
    return [t for t in enc.tokens if t not in unknown]


def _unknown_named(enc: Encoded) -> str:
    """The unknown words of ``enc`` as a message names them: each once, in order, a few at most."""
    return name_some([shown(w) for w in dict.fromkeys(enc.unknown)])


def query_problems(vocab: Vocab, texts: Sequence[str]) -> tuple[list[Encoded | None], list[tuple[int, str]]]:
    """Each text as ids (None where it is not a non-empty string), and ``(position, problem)`` for
    each text that cannot be a query: empty, no word in ``vocab``, no known word with a letter or
    digit (punctuation or symbols only), or more than ``MAX_QUERY_WORDS`` words."""
    encoded, problems = [], []
    for i, text in enumerate(texts):
        enc = vocab.encode(text) if isinstance(text, str) and text.strip() else None
        if not isinstance(text, str):
            problems.append((i, f"a query must be a string, got {type(text).__name__}"))
        elif enc is None:
            problems.append((i, "the query is empty"))
        elif len(enc.unknown) == len(enc.tokens):
            problems.append((i, f"no word of the query is in the model's vocabulary: {_unknown_named(enc)}"))
        elif not any(ch.isalnum() for token in _known(enc) for ch in token):  # "!!! ???" was searched
            unknown = f" and unknown words ({_unknown_named(enc)})"
            problems.append(
                (
                    i,
                    f"the query '{shown(text)}' has no word in the model's vocabulary but punctuation or symbols"
                    + (unknown if enc.unknown else ""),
                )
            )
        elif len(enc.tokens) > MAX_QUERY_WORDS:
            problems.append(
                (
                    i,
                    f"the query has {len(enc.tokens):,} words; a query may have at most {MAX_QUERY_WORDS} (a caption's length)",
                )
            )
        encoded.append(enc)
    return encoded, problems


def query_file_lines(data: bytes, name: str) -> list[str]:
    """The queries of a file of one query per line (its bytes; ``name`` names it in a message),
    split by ``heiindex.textlines.text_lines`` so that "line N" in a message is the file's line
    N, without the blank lines at the end (one answer a line before them). ``HeiindexError``
    names ``name`` and the line where the bytes are not UTF-8, where the file holds no query, or
    where a line holds a carriage return (old Mac line ends would read as one query of all the
    lines). What each line holds is checked by ``check_queries``, as for any query."""
    from .textlines import text_lines

    try:
        lines = text_lines(data, name)
    except DataError as exc:  # named as the queries' own errors are: "FILE line N: ...", the name as given
        raise HeiindexError(f"{name} {exc.problem}") from None
    while lines and not lines[-1].strip():  # blank lines an editor left at the end: no queries, nothing moved
        lines.pop()
    if not lines:
        raise HeiindexError(f"{name} holds no queries: give one query per line")
    if returns := [i for i, line in enumerate(lines) if "\r" in line]:
        raise HeiindexError(
            f"{name} line {returns[0] + 1}: holds a carriage return (\\r) inside the line: old Mac line ends? "
            "give one query per line, ended by \\n or \\r\\n"
        )
    return lines


def refuse_queries(problems: list[tuple[int, str]], n: int, where: Callable[[int], str] | None = None) -> None:
    """Raise one error naming the refused queries (the first five), if there are any. A single
    query's problem is the message itself (unless ``where`` names it); in a batch each is named by
    ``where(position)`` (default ``"query {position + 1}"``)."""
    if not problems:
        return
    if n == 1 and where is None:
        raise HeiindexError(problems[0][1])
    where = where or (lambda i: f"query {i + 1}")
    named = name_some([f"{where(i)}: {problem}" for i, problem in problems], sep="; ")
    raise HeiindexError(f"{len(problems)} of {n} queries refused (nothing was searched): {named}")


def check_batch(texts: Sequence[str], batch: int) -> list[str]:
    """The texts of a ``search_many`` as a list; one string (a likely slip for a list of one) and a
    batch size below 1 are refused."""
    if isinstance(texts, str | bytes):
        raise HeiindexError("search_many takes a list of queries, not one string (use search)")
    require("batch", batch, at_least=1, integer=True)
    try:
        return list(texts)
    except TypeError:
        raise HeiindexError(f"search_many takes a list of queries, got {type(texts).__name__}") from None


def default_counts(candidates: int | None, k: int | None, sizes: list[int], what: str = "items") -> tuple[int, int]:
    """N and k of a query where not given (None), over shards holding ``sizes`` items (one for an
    unsharded index), ``what`` they are: N = ``DEFAULT_CANDIDATES`` (or k where k is larger), or
    every item where there are fewer; k = ``DEFAULT_K``, or the candidates the shards return
    together (N from each, at most its size) where fewer. A k given that the items cannot fill
    is refused here when N was not given (naming the items, not an N the caller never gave);
    given values are otherwise returned as they are, to be checked."""
    total = sum(sizes)
    if candidates is None:
        if is_whole(k) and k > total:
            raise SettingError("k", f"k {k} is larger than the {total} {what} in this index")
        candidates = min(max(DEFAULT_CANDIDATES, k if is_whole(k) else 0), total)
    if k is None:
        k = min(DEFAULT_K, pooled_candidates(candidates, sizes)) if is_whole(candidates) else DEFAULT_K
    return candidates, k


def bench_depth(topk: int | None, limit: int) -> int:
    """N of a bench: ``topk`` where given (to be checked against ``limit``), else
    ``DEFAULT_CANDIDATES``, or ``limit`` (the most the index allows) where that is smaller."""
    return min(DEFAULT_CANDIDATES, limit) if topk is None else topk


def pooled_candidates(candidates: int, sizes: list[int]) -> int:
    """How many candidates shards holding ``sizes`` items return together for N = ``candidates``
    (each at most its size); an unsharded index is one shard."""
    return sum(min(candidates, n) for n in sizes)


def per_shard_depth(candidates: int, sizes: list[int], what: str) -> str:
    """How a sharded build's N reads after "top-N" or "N = N": " from each shard", and, where N
    exceeds a shard's ``what`` (``sizes``: each shard's), the cap, so that an N larger than every
    shard does not read as that many candidates."""
    if candidates <= min(sizes):
        return " from each shard"
    lo, hi = min(sizes), max(sizes)
    held = f"{lo}" if lo == hi else f"{lo}-{hi}"
    what = what[:-1] if hi == 1 else what  # "(1 image)": every shard holds one
    return f" from each shard, at most its size ({held} {what})"


def check_query_counts(candidates: int, k: int) -> tuple[int, int]:
    """``candidates`` (N) and ``k`` of a query as ints: whole numbers (a numpy integer is one; a bool
    or 2.0 is not), at least 1."""
    for name, value in (("candidates", candidates), ("k", k)):
        if not is_whole(value):
            raise SettingError(name, f"{name} must be a whole number, got {value!r}")
    for name, value in (("candidates", candidates), ("k", k)):
        if value < 1:
            raise SettingError(name, f"{name} must be at least 1, got {value}")
    return int(candidates), int(k)


def check_counts(candidates: int, k: int, sizes: list[int], what: str, sharded: bool) -> tuple[int, int]:
    """N and k of a query over an index (``sizes``: its item count) or a sharded build (its
    shards' item counts), as ints: N at most the items (each shard returns up to N, capped at
    its size), k at most the candidates the shards return together."""
    candidates, k = check_query_counts(candidates, k)
    if candidates > sum(sizes):
        raise SettingError(
            "candidates", f"candidates {candidates} is larger than the {sum(sizes)} {what} in this index"
        )
    pooled = pooled_candidates(candidates, sizes)  # N itself for an unsharded index
    if k > pooled:
        limit = f"the {pooled} candidates the shards return together" if sharded else f"`candidates` {candidates}"
        raise SettingError("k", f"k {k} is larger than {limit}", also=("candidates",))
    return candidates, k


def check_image_ids(image_ids: Sequence[int], batch: int) -> list[int]:
    """The ids of a ``search_images`` as ints (a numpy integer is one; a bool, "3" or 3.0 is not)."""
    if isinstance(image_ids, str | bytes) or not isinstance(image_ids, Iterable):
        raise HeiindexError(f"search_images takes a list of image ids, got {type(image_ids).__name__}")
    require("batch", batch, at_least=1, integer=True)
    ids = list(image_ids)
    for image_id in ids:
        if not is_whole(image_id) or not _INT64[0] <= image_id <= _INT64[1]:
            raise HeiindexError(f"an image id is a whole number of 64 bits, got {image_id!r}")
    return [int(i) for i in ids]


def id_span(ids: np.ndarray) -> tuple[int, int] | None:
    """The smallest and largest of ``ids``; None where there are none."""
    return (int(ids.min()), int(ids.max())) if len(ids) else None


def refuse_unknown_images(missing: list[int], n: int, spans: Sequence[Sequence[int] | None] | None = None) -> None:
    """Raise one error naming the ``missing`` ids (the first five) of ``n`` asked for, if any, with
    the span of the index's ids where given: ``spans`` holds ``id_span`` of each part (shard)."""
    if not missing:
        return
    span = ""
    if spans is not None:
        held = [s for s in spans if s is not None]
        span = f" (ids {min(s[0] for s in held)}..{max(s[1] for s in held)})" if held else " (no images)"
    if n == 1:
        raise HeiindexError(f"image id {missing[0]} is not in this index{span}")
    named = name_some([str(i) for i in missing])
    raise HeiindexError(f"{len(missing)} of {n} image ids are not in this index{span}; nothing was searched: {named}")


def check_queries(vocab: Vocab, texts: Sequence[str], where: Callable[[int], str] | None = None) -> list[Encoded]:
    """``texts`` as ids; any text that cannot be a query is refused (``refuse_queries``)."""
    encoded, problems = query_problems(vocab, texts)
    refuse_queries(problems, len(texts), where)
    return encoded


@torch.no_grad()
def encode_queries(model: ScanModel, encoded: Sequence[Encoded]) -> EncodedQueries:
    """Word features of checked queries (``check_queries``), encoded together where the model is."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(e.ids) for e in encoded], device=device)
    tokens = torch.zeros((len(encoded), int(lengths.max())), dtype=torch.long)
    for row, e in enumerate(encoded):
        tokens[row, : len(e.ids)] = torch.tensor(e.ids)
    words = model.encode_captions(tokens.to(device), lengths)
    return EncodedQueries(words, lengths, [list(dict.fromkeys(e.unknown)) for e in encoded])  # each once, in order


def encode_text(model: ScanModel, vocab: Vocab, text: str) -> EncodedQueries:
    """One caption as a batch of one query; an empty or all-unknown caption is refused."""
    return encode_queries(model, check_queries(vocab, [text]))


class Candidates(NamedTuple):
    """Hamming top-N of a batch of queries, re-ranked by the matcher. ``ids`` (q, N): rows into
    the searched set, -1 in the slots an approximate index left empty; ``scores`` (q, N) float32,
    -inf in those slots; ``hamming`` (q, N): Hamming distances of the candidates' codes."""

    ids: np.ndarray
    scores: np.ndarray
    hamming: np.ndarray


@torch.no_grad()
def rerank_images(
    model: ScanModel, image_index, codes: np.ndarray, *, words, lengths, regions, gram, n: int
) -> Candidates:
    """Text to image for a batch of encoded captions (``words`` (q, L, d) in the regions' dtype,
    ``lengths`` (q,)) with their packed ``codes``: the ``n`` nearest image codes, re-ranked."""
    dist, ids = hamming_candidates(image_index, codes, n)
    score = lambda query, item: score_pairs(model.attention, words, lengths, regions, query, item, gram)  # noqa: E731
    return Candidates(ids, _candidate_scores(ids, score, regions.device), dist)


@torch.no_grad()
def rerank_captions(
    model: ScanModel, caption_index, codes: np.ndarray, *, regions, gram, words, lengths, n: int
) -> Candidates:
    """Image to text for a batch of encoded images (``regions`` (q, R, d), ``gram`` (q, R, R))
    with their packed ``codes``: the ``n`` nearest caption codes, re-ranked."""
    dist, ids = hamming_candidates(caption_index, codes, n)
    score = lambda query, item: score_pairs(model.attention, words, lengths, regions, item, query, gram)  # noqa: E731
    return Candidates(ids, _candidate_scores(ids, score, regions.device), dist)


def _candidate_scores(ids: np.ndarray, score: Callable[[Tensor, Tensor], Tensor], device) -> np.ndarray:
    """The matcher's scores (q, N) float32 of each query's candidates ``ids``, ``score(query rows,
    item rows)`` scoring the pairs; -inf in the slots an approximate index left empty (-1), which
    are not scored (with IVF's few probes they can be most slots, and were all scored as item 0)."""
    valid = ids >= 0
    query, _ = np.nonzero(valid)  # row-major: each query's candidates in order, as a full (q, N) set
    got = score(torch.from_numpy(query).to(device), torch.from_numpy(ids[valid]).to(device))
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    out[valid] = got.float().cpu().numpy()
    return out


@torch.no_grad()
def images_for_text(
    model: ScanModel,
    hasher: HashModule,
    image_index,
    regions: Tensor,
    gram: Tensor,
    queries: EncodedQueries,
    k: int,
    candidates: int,
    codes: np.ndarray | None = None,
) -> list[Ranked]:
    """Text to image for each query: Hamming top-``candidates`` over the image codes,
    re-ranked, top ``k``. ``codes``: the queries' codes where hashed already (a sharded build
    hashes a batch once for all its shards)."""
    if codes is None:
        codes = hasher.caption_codes(queries.words, queries.lengths)
    words = queries.words.to(regions.dtype)  # the stored features' precision (see Index.to)
    found = rerank_images(
        model, image_index, codes, words=words, lengths=queries.lengths, regions=regions, gram=gram, n=candidates
    )
    return [top_k(found, k, q) for q in range(len(queries))]


def top_k(found: Candidates, k: int, q: int) -> Ranked:
    """The best ``k`` of query ``q``'s candidates; empty slots are dropped. Equal scores keep
    the candidates' order: the smaller Hamming distance first, then the item's row in the index
    (FAISS's and the torch search's order of equal distances; ``shards.merge_hits`` merges
    shards the same way)."""
    keep = found.ids[q] >= 0
    scores, ids, dist = found.scores[q][keep], found.ids[q][keep], found.hamming[q][keep]
    order = np.argsort(-scores, kind="stable")[:k]
    return Ranked(ids[order], scores[order], dist[order], int(keep.sum()))
