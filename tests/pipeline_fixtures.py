"""A tiny, learnable end-to-end set for the model/train/hash/index/bench/CLI tests.

``write_learnable_precomp`` writes a SCAN precomp folder whose captions are real COCO lines
(``data/coco-captions/testall_caps.txt``) and whose image features are made from those
captions: every content word of the train captions gets a fixed random vector, and each of an
image's regions shows (a multiple of) the vector of one of its captions' most frequent content
words, plus noise. A matcher learns this (it beats chance after a few epochs), and the set is
small enough to train on in seconds. The vocabulary is built from the set's captions.

``get_pipeline`` builds, once per test session (cached in this module, so every test module
that asks gets the same folders), a store root with train/dev/test, a matcher trained with
``heiindex.train.train``, a second matcher trained with another seed (for mismatch tests), a
hash module and a flat index of the test split. Test modules load this file by path and wrap
``get_pipeline`` in a session fixture of their own.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from heiindex import omp_threads

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = REPO / "data" / "coco-captions" / "testall_caps.txt"

# Sizes of the main set: regions per image, raw feature size, images per split.
REGIONS = 6
FEATURE_DIM = 32
SPLIT_IMAGES = {"train": 64, "dev": 24, "test": 24}
EMBED_SIZE = 24
WORD_DIM = 16
BITS = 32
TRAIN_EPOCHS = 8
BATCH_SIZE = 16
LR = 1e-2

_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=1)
def caption_lines() -> tuple[str, ...]:
    return tuple(CAPTIONS.read_text(encoding="utf-8").split("\n")[:-1])


def split_captions(splits: dict[str, int] = SPLIT_IMAGES) -> dict[str, list[str]]:
    """Consecutive testall lines, 5 per image: train first, then dev, then test."""
    lines = caption_lines()
    out, pos = {}, 0
    for split, n in splits.items():
        out[split] = list(lines[pos : pos + 5 * n])
        pos += 5 * n
    return out


def _content_words(caption: str, stop: set[str]) -> list[str]:
    return [w for w in _WORD.findall(caption.lower()) if w not in stop and len(w) > 2]


def make_features(
    captions: dict[str, list[str]],
    regions: int,
    feature_dim: int,
    noise: float = 0.3,
    seed: int = 0,
    words_per_region: int = 1,
) -> dict[str, np.ndarray]:
    """float32 ``(n_images, regions, feature_dim)`` per split, built from each image's captions.

    Stop words: words found in the captions of more than 15% of all images. Only content words
    of the first split's captions (train) get a vector, drawn once (sorted word order, fixed
    seed), so the same word means the same thing in every split and what dev/test images show
    can be learnt. Region ``r`` of an image holds ``sqrt(count)`` times the vector of its
    ``r``-th most frequent content word (with ``words_per_region > 1``, also the ``r + R``-th
    ...); regions without a word hold noise only.
    """
    rng = np.random.default_rng(seed)
    per_image = {s: [caps[i : i + 5] for i in range(0, len(caps), 5)] for s, caps in captions.items()}
    n_images = sum(len(v) for v in per_image.values())
    df: dict[str, int] = {}
    for imgs in per_image.values():
        for caps in imgs:
            for w in {w for c in caps for w in _WORD.findall(c.lower())}:
                df[w] = df.get(w, 0) + 1
    stop = {w for w, n in df.items() if n > 0.15 * n_images}
    first = next(iter(per_image.values()))
    vocab = sorted({w for caps in first for c in caps for w in _content_words(c, stop)})
    vectors = {w: v for w, v in zip(vocab, rng.standard_normal((len(vocab), feature_dim)), strict=True)}
    out = {}
    for split, imgs in per_image.items():
        feats = np.zeros((len(imgs), regions, feature_dim))
        for i, caps in enumerate(imgs):
            counts: dict[str, int] = {}
            for c in caps:
                for w in _content_words(c, stop):
                    if w in vectors:
                        counts[w] = counts.get(w, 0) + 1
            ranked = sorted(counts, key=lambda w: (-counts[w], w))
            for j, w in enumerate(ranked[: words_per_region * regions]):
                feats[i, j % regions] += np.sqrt(counts[w]) * vectors[w]
        feats += noise * rng.standard_normal(feats.shape)
        out[split] = feats.astype(np.float32)
    return out


def write_learnable_precomp(
    folder: Path,
    splits: dict[str, int] = SPLIT_IMAGES,
    regions: int = REGIONS,
    feature_dim: int = FEATURE_DIM,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Write ``{split}_ims.npy`` and ``{split}_caps.txt`` for each split; return the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = split_captions(splits)
    feats = make_features(captions, regions, feature_dim, seed=seed)
    for split, caps in captions.items():
        np.save(folder / f"{split}_ims.npy", feats[split])
        (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    return captions


def ingest_all(precomp: Path, root: Path, captions: dict[str, list[str]]) -> Path:
    """Ingest every split into ``root`` with a vocabulary built from all the set's captions."""
    from heiindex.ingest import ingest
    from heiindex.vocab import Vocab

    vocab = Vocab.build([c for caps in captions.values() for c in caps], min_count=2)
    for split in captions:
        ingest(precomp, split, root, vocab=vocab, regions=None, feature_dim=None)
    return root


def model_config(vocab_size: int, **kw):
    from heiindex.model import ScanConfig

    return ScanConfig(
        vocab_size=vocab_size,
        embed_size=kw.pop("embed_size", EMBED_SIZE),
        word_dim=kw.pop("word_dim", WORD_DIM),
        img_dim=kw.pop("img_dim", FEATURE_DIM),
        **kw,
    )


def train_config(**kw):
    from heiindex.train import TrainConfig

    base = {
        "epochs": TRAIN_EPOCHS,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "seed": 0,
        "val_images": 1000,
        "lr_decay_epochs": 100,
    }
    base.update(kw)
    return TrainConfig(**base)


def quiet(*_args, **_kw) -> None:
    pass


def forbid(monkeypatch, why: str, *targets) -> None:
    """Make each of ``targets`` (``"module.name"``, or ``(owner, "name")``) fail the test with
    ``why`` if it is called: for tests that something is checked before work starts. The failure
    is ``pytest.fail``'s, which no ``except Exception`` in the code under test can swallow."""

    def refuse(*_a, **_k):
        pytest.fail(why)

    for target in targets:
        if isinstance(target, str):
            monkeypatch.setattr(target, refuse)
        else:
            monkeypatch.setattr(*target, refuse)


# GPU-only tests: skipped where torch sees no CUDA device (CI); benchmarks/gpu.sh runs them.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by benchmarks/gpu.sh)")
# Tests of re-ranking's two workers: skipped where no per-thread torch thread count is found
# (heiindex.omp_threads), as the library then runs no workers.
needs_thread_local_setter = pytest.mark.skipif(
    omp_threads.thread_local_setter() is None, reason="no per-thread torch thread count found on this install"
)


def in_thread(fn):
    """What ``fn()`` returns when called in a new thread (started and joined here)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@contextmanager
def kept_tf32_switches():
    """Restores torch's two process-wide TF32 switches, which ``set_precision`` flips."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextmanager
def torch_threads(count: int):
    """Run torch on ``count`` threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_torch_thread():
    """Run torch on one thread, restoring the previous count afterwards.

    The tensors here are tiny; with two threads on a busy two-core machine, OpenMP's waiting
    threads make the same work 10-50x slower.
    """
    return torch_threads(1)


@dataclass
class Pipeline:
    """Everything the session built, on disk, plus what training returned."""

    precomp: Path
    root: Path
    captions: dict[str, list[str]]
    run_dir: Path  # train() output: best/, last/, history.json
    model_dir: Path  # run_dir / "best"
    other_model_dir: Path  # a matcher trained with another seed (same shapes)
    hash_dir: Path
    index_dir: Path
    train_history: list[dict]
    hash_result: dict

    @property
    def n_test_images(self) -> int:
        return SPLIT_IMAGES["test"]


_CACHE: dict = {}


def get_pipeline(tmp_path_factory) -> Pipeline:
    """Build (once per session) and return the shared pipeline."""
    if "p" in _CACHE:
        return _CACHE["p"]
    with one_torch_thread():
        _CACHE["p"] = _build_pipeline(tmp_path_factory)
    return _CACHE["p"]


def _build_pipeline(tmp_path_factory) -> Pipeline:
    from heiindex.checkpoint import load_model
    from heiindex.hashing import HashConfig
    from heiindex.index import Index
    from heiindex.train import train
    from heiindex.train_hash import HashTrainConfig, train_hash
    from heiindex.vocab import Vocab

    base = tmp_path_factory.mktemp("pipeline")
    precomp = base / "precomp"
    captions = write_learnable_precomp(precomp)
    root = ingest_all(precomp, base / "store", captions)
    vocab = Vocab.load(root / "vocab.json")

    run_dir = base / "run"
    res = train(root, run_dir, model_config(len(vocab)), train_config(), log=quiet)
    other = train(root, base / "run-other", model_config(len(vocab)), train_config(epochs=1, seed=7), log=quiet)
    matcher = load_model(run_dir / "best")
    hash_dir = base / "hash"
    hres = train_hash(
        matcher,
        root,
        hash_dir,
        HashConfig(bits=BITS, embed_size=EMBED_SIZE),
        HashTrainConfig(epochs=15, batch_size=32, lr=1e-2, rounds=2, val_candidates=5),
        log=quiet,
    )
    index_dir = base / "index-test"
    Index.build(root, "test", matcher, hash_dir, index_dir)
    return Pipeline(
        precomp, root, captions, run_dir, run_dir / "best", other.out / "last", hash_dir, index_dir, res.history, hres
    )


# -- a store with SCAN's feature size, for the CLI's ``train`` (which has no --img-dim) ------

WIDE_SPLITS = {"train": 32, "dev": 16}
WIDE_REGIONS = 4
WIDE_FEATURE_DIM = 2048


def get_wide_store(tmp_path_factory) -> Path:
    """A train/dev store root with 2048-d features (4 regions per image), built once."""
    if "wide" in _CACHE:
        return _CACHE["wide"]
    base = tmp_path_factory.mktemp("wide")
    captions = write_learnable_precomp(base / "precomp", WIDE_SPLITS, WIDE_REGIONS, WIDE_FEATURE_DIM)
    with one_torch_thread():
        root = ingest_all(base / "precomp", base / "store", captions)
    _CACHE["wide"] = root
    return root


# -- helpers -----------------------------------------------------------------------------------


def copy_index(source: Path, tmp_path: Path) -> Path:
    """A copy of the index (or sharded build) at ``source`` at ``tmp_path / "copy"``, to damage."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(source, out)
    return out


def flip_bit(path: Path, at: int = -3, mask: int = 0x10) -> None:
    """Flip one bit of the file ``path`` in place (by default inside a FAISS file's last code):
    the same size, another content."""
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def index_with_moved_models(pipe, tmp_path: Path, source: Path | None = None) -> Path:
    """A copy of the pipeline's index (or of the index or sharded build at ``source``) at
    ``tmp_path / "copy"`` whose manifests (a sharded build's top one and its shards') record
    its matcher and hash module at folders that are not there (``gone-model``, ``gone-hash``):
    an index copied to another machine, or whose models moved."""
    out = copy_index(source or pipe.index_dir, tmp_path)
    for manifest in [out / "manifest.json", *sorted(out.glob("shard-*/manifest.json"))]:
        with edited_json(manifest) as m:
            m["matcher"]["path"], m["hash"]["path"] = str(tmp_path / "gone-model"), str(tmp_path / "gone-hash")
    return out


def encoded_text(index, text: str):
    """``(words, lengths)`` of one text query, encoded by ``index``'s matcher."""
    from heiindex.search import encode_text

    q = encode_text(index.model, index.matcher.vocab, text)
    return q.words, q.lengths


def copy_store(pipe, tmp_path: Path) -> Path:
    """A copy of the pipeline's store root at ``tmp_path / "store"``, to damage."""
    import shutil

    root = tmp_path / "store"
    shutil.copytree(pipe.root, root)
    return root


def swap_words(vocab_json: Path, a: str | None = None, b: str | None = None) -> None:
    """Swap the ids of words ``a`` and ``b`` (by default the first two alphabetic words) in a SCAN
    vocab JSON file: same size, another mapping."""
    import json

    words = json.loads(vocab_json.read_text())
    idx = words["word2idx"]
    if a is None:
        a, b = sorted(w for w in idx if w.isalpha())[:2]
    idx[a], idx[b] = idx[b], idx[a]
    words["idx2word"] = {str(i): w for w, i in idx.items()}
    vocab_json.write_text(json.dumps(words))


def fake_clock(*readings: float):
    """A stand-in for the ``time`` module whose ``perf_counter`` returns ``readings`` in turn."""
    it = iter(readings)
    return type("FakeTime", (), {"perf_counter": staticmethod(lambda: next(it))})


@contextmanager
def edited_json(path: Path):
    """The JSON document at ``path``, written back as the ``with`` body leaves it (a crafted
    manifest or config)."""
    doc = json.loads(path.read_text())
    yield doc
    path.write_text(json.dumps(doc))


def edit_column(path: Path, column: str, edit) -> np.ndarray:
    """Rewrite the integer ``column`` of the Parquet file ``path`` as ``edit`` leaves a copy of
    it (a crafted bad input); returns the values written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column(column).to_numpy().copy()
    edit(values)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)), path)
    record_again(path)
    return values


def rebuilt_on_first_call(monkeypatch, module, name: str, pipe, tmp_path: Path) -> tuple[Path, list]:
    """A copy of the pipeline's index at ``tmp_path / "t"``, replaced by an HNSW build of the same
    split (as a rebuild swaps it in) at the first call of ``module.name``, made while something
    reads it; returns the folder and the list of swaps made (``[1]`` once it happened)."""
    import shutil

    from heiindex.index import Index

    target, other = tmp_path / "t", tmp_path / "hnsw"
    shutil.copytree(pipe.index_dir, target)
    Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, other, index_type="hnsw")
    real, swaps = getattr(module, name), []

    def swap_first(*args, **kwargs):
        if not swaps:  # the rebuild lands now, while the folder is read
            swaps.append(1)
            shutil.rmtree(target)
            shutil.copytree(other, target)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, swap_first)
    return target, swaps


def record_again(path: Path) -> None:
    """The manifest beside ``path`` records the file as it is now (its size and checksum), where it
    records it at all: a test that rewrites a store or index file on purpose, to reach a check
    of its content beyond the size the manifest records (``store.open_parquet``)."""
    from heiindex.manifests import file_record

    with edited_json(path.parent / "manifest.json") as manifest:
        if path.name in manifest.get("files", {}):
            manifest["files"][path.name] = file_record(path)


def hamming_of_hits(caption_ids: np.ndarray, caption_codes: np.ndarray, code: np.ndarray, result) -> list[int]:
    """The Hamming distances from ``code`` to the captions an image query's ``result`` holds
    (by caption id, among ``caption_ids`` with their ``caption_codes``)."""
    rows = [int(np.flatnonzero(caption_ids == h.id)[0]) for h in result.results]
    return hamming_by_hand(code[None, :], caption_codes[rows])[0].tolist()


def hamming_by_hand(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) Hamming distances of packed uint8 codes, by unpacking and counting differing bits."""
    ua = np.unpackbits(np.asarray(a, dtype=np.uint8), axis=1).astype(bool)
    ub = np.unpackbits(np.asarray(b, dtype=np.uint8), axis=1).astype(bool)
    return (ua[:, None, :] != ub[None, :, :]).sum(axis=2)


def assert_same_answer(got, want) -> None:
    """Two ``SearchResult``s of one query by different paths (a batch and a batch of one, shards
    and Ray): the same hits rank by rank, scores equal up to float rounding of batched products."""
    assert got.query == want.query and got.unknown_words == want.unknown_words
    assert [(h.rank, h.id, h.hamming, h.captions, h.text) for h in got.results] == [
        (h.rank, h.id, h.hamming, h.captions, h.text) for h in want.results
    ]
    assert [h.score for h in got.results] == pytest.approx([h.score for h in want.results], rel=1e-5, abs=1e-6)


def assert_exhaustive_top(result, full: np.ndarray, item_ids: np.ndarray) -> None:
    """``result``'s hits are the best of ``full`` (the matcher's scores of every item, whose ids are
    ``item_ids``), in order, with those scores."""
    top = np.argsort(-full, kind="stable")[: len(result.results)]
    assert [h.id for h in result.results] == [int(item_ids[r]) for r in top]
    np.testing.assert_allclose([h.score for h in result.results], full[top], atol=1e-5, rtol=0)


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped): a killed run's, for leftover names."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
