"""heiindex.prototypes: image codes made partly of the training captions the matcher ranks highest,
and the builds (plain, sharded, CLI) that write them."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pipeline_fixtures as pf
import pytest
import torch
from cli_helpers import as_json, build, clean_error, ok, run

from heiindex import shards
from heiindex.bench import run_bench
from heiindex.checkpoint import load_model
from heiindex.encode import encode_captions
from heiindex.errors import DataError, HeiindexError, UnusedSettingWarning
from heiindex.hamming import load_binary_index, stored_codes
from heiindex.hash_folder import load_hash
from heiindex.hashing import pack_codes
from heiindex.index import Index
from heiindex.prototypes import PendingImages, PrototypeConfig, caption_bank, describe_images
from heiindex.shards import write_shards

TRAIN_CAPTIONS = 5 * pf.SPLIT_IMAGES["train"]  # 320
SMALL = PrototypeConfig(k=3, weight=0.6, preselect=40)


@pytest.fixture(scope="module")
def models(pipe):
    return load_model(pipe.model_dir), load_hash(pipe.hash_dir)


@pytest.fixture(scope="module")
def plain(pipe):
    return Index.open(pipe.index_dir)


@pytest.fixture(scope="module")
def bank(pipe, models):
    return caption_bank(pipe.root, SMALL, *models, block=64)


@pytest.fixture(scope="module")
def built(pipe, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("proto") / "test"
    Index.write(pipe.root, "test", *models, out, index_type="flat", prototypes=SMALL, describe_images_block=10)
    return out


def _reference(bank, models, regions: torch.Tensor, cfg: PrototypeConfig, scored: np.ndarray) -> np.ndarray:
    """The codes by the formula, from the full (images, captions) score matrix of ``score_block``,
    the matcher scoring only the captions where ``scored`` (n, captions) is true."""
    matcher, hasher = models
    module = hasher.module
    words = encode_captions(matcher.model, bank.tokens, bank.lengths)
    with torch.no_grad():
        scores = matcher.model.score(words, torch.from_numpy(bank.lengths), regions).T  # (images, captions)
        outputs = torch.tanh(module.text_hash(module.pool_captions(words, torch.from_numpy(bank.lengths))))
        own = module.image_hash(module.pool_images(regions))
    scores = scores.masked_fill(~torch.from_numpy(scored), float("-inf"))
    top = scores.topk(cfg.k, dim=1).indices
    proto = outputs[top].mean(dim=1)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    return pack_codes(cfg.weight * unit(own) + (1 - cfg.weight) * unit(proto) > 0)


def test_the_bank_holds_every_training_caption_hashed_as_the_index_hashes_captions(bank, models):
    matcher, hasher = models
    assert len(bank) == TRAIN_CAPTIONS
    assert np.all(np.diff(bank.lengths) >= 0)  # in order of length
    words = encode_captions(matcher.model, bank.tokens, bank.lengths)
    lengths = torch.from_numpy(bank.lengths)
    np.testing.assert_array_equal(bank.codes, hasher.module.caption_codes(words, lengths))
    with torch.no_grad():
        pre = hasher.module.text_hash(hasher.module.pool_captions(words, lengths))
    torch.testing.assert_close(bank.outputs, torch.tanh(pre))
    assert bank.tokens.dtype == np.int32  # as the store holds them, as the memory figures assume
    entry = bank.manifest_entry()
    assert entry == {"split": "train", "k": 3, "weight": 0.6, "preselect": 40, "captions": TRAIN_CAPTIONS,
                     "store_checksum": bank.store.checksum}  # fmt: skip


def test_codes_follow_the_formula_when_every_caption_is_scored(pipe, models, plain):
    cfg = PrototypeConfig(k=4, weight=0.8, preselect=TRAIN_CAPTIONS)  # asymmetric: a swapped mix would fail
    every = caption_bank(pipe.root, cfg, *models, block=100)
    got = describe_images(every, *models, plain.regions, plain.gram)
    scored = np.ones((plain.n_images, TRAIN_CAPTIONS), dtype=bool)
    want = _reference(every, models, plain.regions, cfg, scored)
    np.testing.assert_array_equal(got, want)
    assert (got != plain.image_codes()).any(axis=1).sum() >= plain.n_images // 2  # the prototypes move most codes


def test_settings_beyond_the_describing_captions_are_said(pipe, models, plain):
    """A preselection (or k) above the describing split's captions was capped without a word, and
    the manifest recorded the value asked for."""
    cfg = PrototypeConfig(k=4, weight=0.8, preselect=TRAIN_CAPTIONS + 1)
    with pytest.warns(UnusedSettingWarning) as seen:
        over = caption_bank(pipe.root, cfg, *models, block=100)
    assert [str(w.message) for w in seen] == [
        f"`preselect` {TRAIN_CAPTIONS + 1} exceeds the {TRAIN_CAPTIONS} captions of prototypes split "
        "'train': the matcher scores all of them for each image"
    ]
    exact = caption_bank(pipe.root, PrototypeConfig(k=4, weight=0.8, preselect=TRAIN_CAPTIONS), *models, block=100)
    np.testing.assert_array_equal(  # the same codes as with every caption preselected
        describe_images(over, *models, plain.regions, plain.gram),
        describe_images(exact, *models, plain.regions, plain.gram),
    )
    with pytest.warns(
        UnusedSettingWarning,
        match=r"^`preselect` 500 and `k` 400 exceed the 320 captions .* all 320 are",
    ):
        caption_bank(pipe.root, PrototypeConfig(k=400, preselect=500), *models, block=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing said where the captions suffice
        caption_bank(pipe.root, PrototypeConfig(k=4, weight=0.8, preselect=TRAIN_CAPTIONS), *models, block=100)


def test_only_the_hamming_nearest_captions_are_scored(pipe, models, plain):
    # preselect == k: the top k are the k Hamming-nearest captions, whatever the matcher says of them
    cfg = PrototypeConfig(k=5, weight=0.3, preselect=5)
    near_bank = caption_bank(pipe.root, cfg, *models)
    got = describe_images(near_bank, *models, plain.regions, plain.gram)
    dist = pf.hamming_by_hand(plain.image_codes(), near_bank.codes)
    order = np.argsort(dist, axis=1, kind="stable")
    kth, next_ = np.take_along_axis(dist, order[:, 4:6], axis=1).T
    clear = kth < next_  # images whose 5 nearest captions are not tied with a sixth (32-bit codes tie often)
    assert clear.sum() >= 5
    scored = np.zeros(dist.shape, dtype=bool)
    np.put_along_axis(scored, order[:, :5], True, axis=1)
    want = _reference(near_bank, models, plain.regions, cfg, scored)
    np.testing.assert_array_equal(got[clear], want[clear])


def test_images_described_in_blocks_get_the_codes_of_one_pass(bank, models, plain):
    whole = describe_images(bank, *models, plain.regions, plain.gram)
    out: list = []
    pending = PendingImages(bank, *models, 5, out)
    for s in range(0, plain.n_images, 7):  # build blocks of 7 against describing blocks of 5
        pending.add(plain.regions[s : s + 7], plain.gram[s : s + 7])
    pending.flush()
    assert [len(c) for c in out] == [5, 5, 5, 5, 4]
    np.testing.assert_array_equal(np.concatenate(out), whole)


def test_a_build_writes_the_prototype_codes_and_records_them(built, bank, models, plain):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["prototypes"] == bank.manifest_entry()
    assert "prototypes" not in json.loads((plain.path / "manifest.json").read_text())
    images = stored_codes(load_binary_index(built / "images.faiss"))
    np.testing.assert_array_equal(images, describe_images(bank, *models, plain.regions, plain.gram))
    captions = stored_codes(load_binary_index(built / "captions.faiss"))
    np.testing.assert_array_equal(captions, plain.caption_codes())  # the caption side is untouched
    index = Index.open(built)
    np.testing.assert_array_equal(index.image_codes(), images)
    hits = index.search("a dog on the grass", k=3, candidates=10).results
    assert len(hits) == 3
    codes = index.hasher.module.caption_codes(*pf.encoded_text(index, "a dog on the grass"))
    # the Hamming distances shown are to the prototype codes searched
    assert [h.hamming for h in hits] == pf.hamming_by_hand(codes, images[index.image_rows([h.id for h in hits])])[
        0
    ].tolist()


def test_codes_searched_elsewhere_still_come_from_the_build(built, models):
    # An index whose codes are searched outside its FAISS files (Milvus) cannot hash its images'
    # prototype codes from their features: it reads them from images.faiss.
    manifest = json.loads((built / "manifest.json").read_text())
    searched = (load_binary_index(built / "images.faiss"), load_binary_index(built / "captions.faiss"))
    index = Index(built, manifest, *models, code_indexes=searched)
    np.testing.assert_array_equal(index.image_codes(), stored_codes(searched[0]))
    assert (index.image_codes() != index.hash_images(index.regions)).any()


def test_shards_get_the_codes_of_the_unsharded_build(pipe, models, built, tmp_path):
    m = write_shards(pipe.root, "test", *models, tmp_path / "sharded", 3, index_type="flat", prototypes=SMALL)
    assert m["prototypes"] == json.loads((built / "manifest.json").read_text())["prototypes"]
    parts = [stored_codes(load_binary_index(tmp_path / "sharded" / e["path"] / "images.faiss")) for e in m["shards"]]
    np.testing.assert_array_equal(np.concatenate(parts), stored_codes(load_binary_index(built / "images.faiss")))


def test_numpy_settings_are_taken_as_python_numbers(pipe, models, tmp_path):
    """np.int64 / np.float32 settings passed the checks and reached manifest.json, whose JSON
    writer failed at the very end of the build."""
    cfg = PrototypeConfig(k=np.int64(3), weight=np.float32(0.5), preselect=np.int64(40))
    assert [type(v) for v in (cfg.k, cfg.weight, cfg.preselect)] == [int, float, int]
    m = Index.write(pipe.root, "test", *models, tmp_path / "x", prototypes=cfg)
    assert (m["prototypes"]["k"], m["prototypes"]["weight"], m["prototypes"]["preselect"]) == (3, 0.5, 40)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be"),
        ({"k": 5, "preselect": 4}, "k 5 exceeds `preselect` (4)"),
        ({"weight": 1.0}, "weight must be below 1"),
        ({"weight": -0.1}, "weight must be"),
        ({"split": ""}, "split must name a store split"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(HeiindexError, match=re.escape(message)):
        PrototypeConfig(**kwargs)


def test_cli_build_and_bench_with_prototypes(pipe, tmp_path):
    out = tmp_path / "cli-proto"
    res = ok(build(pipe, out, "--prototypes", "train"))
    assert "image codes with train prototypes" in res.output
    entry = json.loads((out / "manifest.json").read_text())["prototypes"]
    defaults = PrototypeConfig().to_dict()
    assert {key: entry[key] for key in defaults} == defaults and defaults["split"] == "train"
    bench = as_json(run("bench", "--index", out, "--topk", "10", "--json"))
    assert bench["prototypes"] == entry
    table = ok(run("bench", "--index", out, "--topk", "10")).output
    assert "image codes with train prototypes" in table


@pytest.mark.parametrize(
    "split, message",
    [
        (
            "test",
            (
                "Error: --prototypes test: the captions of test would describe its own images, and the bench "
                "measures with them; describe the images with the captions of a split other than test",
            ),
        ),
        ("nope", ("prototypes split 'nope': ", "no such split in this store (it holds: dev, test, train)")),
    ],
)
def test_cli_refuses_a_describing_split_it_cannot_use(pipe, tmp_path, split, message):
    messages = message if isinstance(message, tuple) else (message,)
    clean_error(build(pipe, tmp_path / "x", "--prototypes", split), *messages)
    assert not (tmp_path / "x").exists()


@pf.needs_cuda
def test_a_cuda_build_gives_about_the_cpu_codes(pipe, models, built, tmp_path):
    # A GPU rounds the encodings and scores differently in the last bits: a code bit near zero,
    # or the k-th caption among near-equal scores, may flip. Most codes must stay the same.
    out = tmp_path / "cuda"
    Index.write(pipe.root, "test", *models, out, index_type="flat", prototypes=SMALL, device="cuda")
    gpu = stored_codes(load_binary_index(out / "images.faiss"))
    cpu = stored_codes(load_binary_index(built / "images.faiss"))
    bits = pf.hamming_by_hand(gpu, cpu).diagonal()
    assert (bits == 0).sum() >= 18 and bits.max() <= 8, bits


def test_the_bench_searches_with_the_prototype_codes(built, plain):
    # The two indexes differ only in images.faiss: a bench that hashed the stored images again
    # would give the prototype build the plain build's image-to-text Hamming ranking.
    # (Figures only: each row's seconds differ between any two runs.)
    proto, base = (run_bench(Index.open(p), topk=5, exhaustive=False) for p in (built, plain.path))
    assert proto["prototypes"]["k"] == SMALL.k and base["prototypes"] is None

    def figures(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in ("seconds", "seconds_each")}

    assert figures(proto["i2t"]["hamming"]) != figures(base["i2t"]["hamming"])
    assert figures(proto["t2i"]["hamming"]) != figures(base["t2i"]["hamming"])


def test_codes_read_for_a_milvus_search_are_checked(built, models, tmp_path):
    import shutil

    copy = pf.copy_index(built, tmp_path)
    shutil.copy(copy / "captions.faiss", copy / "images.faiss")  # 120 codes for 24 images
    manifest = json.loads((copy / "manifest.json").read_text())
    searched = (load_binary_index(built / "images.faiss"), load_binary_index(built / "captions.faiss"))
    with pytest.raises(DataError, match=r"images\.faiss: holds 120 codes, but the index has 24 images"):
        Index(copy, manifest, *models, code_indexes=searched)
    shutil.copy(built / "images.faiss", copy / "images.faiss")
    pf.flip_bit(copy / "images.faiss")  # one bit of a code: the count is right, the checksum is not
    with pytest.raises(DataError, match=r"copy/images\.faiss: changed since the index was built"):
        Index(copy, manifest, *models, code_indexes=searched)


@pytest.mark.parametrize("field, value", [("prototypes", "train"), ("prototypes.k", 2.5), ("prototypes.weight", None)])
def test_a_malformed_prototypes_record_is_named(built, tmp_path, field, value):
    copy = pf.copy_index(built, tmp_path)
    with pf.edited_json(copy / "manifest.json") as m:
        if "." in field:
            m["prototypes"][field.split(".")[1]] = value
        else:
            m["prototypes"] = value
    shown = field if "." in field else "prototypes.split"
    with pytest.raises(DataError, match=f'field "{shown}" is missing or not of type'):
        Index.open(copy)
    clean_error(run("bench", "--index", copy, "--topk", "5"), "manifest.json", f'field "{shown}"')


def test_a_sharded_build_checks_its_lists_before_hashing_captions(pipe, models, tmp_path, monkeypatch):
    pf.forbid(monkeypatch, "the captions were hashed before --nlist was checked", (shards, "caption_bank"))
    with pytest.raises(HeiindexError, match="^nlist 10 exceeds the 8 images to index in its shard"):
        write_shards(pipe.root, "test", *models, tmp_path / "s", 3, index_type="ivf", nlist=10, prototypes=SMALL)


def test_the_record_names_the_split_as_the_store_does(pipe, models, tmp_path):
    m = Index.write(
        pipe.root, "test", *models, tmp_path / "x", prototypes=PrototypeConfig(split="./train", k=2, preselect=4)
    )
    assert m["prototypes"]["split"] == "train"


@pytest.mark.parametrize("split", ["test", "./test", "test/"])  # by name, or the same folder by another
def test_a_split_is_not_described_by_its_own_captions(pipe, models, tmp_path, monkeypatch, split):
    import heiindex.index_write

    pf.forbid(
        monkeypatch,
        "the captions were hashed before the folder was compared",
        (heiindex.index_write, "caption_bank"),
        (shards, "caption_bank"),
    )
    with pytest.raises(HeiindexError, match="captions of test would describe its own images"):
        Index.write(pipe.root, "test", *models, tmp_path / "x", prototypes=PrototypeConfig(split=split))
    with pytest.raises(HeiindexError, match="captions of test would describe its own images"):
        write_shards(pipe.root, "test", *models, tmp_path / "y", 2, prototypes=PrototypeConfig(split=split))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_sharded_build_with_a_malformed_record_is_named(pipe, models, tmp_path):
    from heiindex.shards import ShardedIndex

    out = tmp_path / "sharded"
    write_shards(pipe.root, "test", *models, out, 2, index_type="flat", prototypes=SMALL)
    with pf.edited_json(out / "manifest.json") as m:
        m["prototypes"]["preselect"] = "300"
    with pytest.raises(DataError, match='field "prototypes.preselect" is missing or not of type int'):
        ShardedIndex.open(out)


def test_cli_tunes_the_prototypes(pipe, built, tmp_path):
    out = tmp_path / "tuned"
    ok(build(pipe, out, "--prototypes", "train", "--prototype-k", "3", "--prototype-weight", "0.6",
             "--prototype-preselect", "40"))  # fmt: skip
    entry = json.loads((out / "manifest.json").read_text())["prototypes"]
    assert (entry["k"], entry["weight"], entry["preselect"]) == (SMALL.k, SMALL.weight, SMALL.preselect)
    # the library's build with the same settings wrote the same codes
    np.testing.assert_array_equal(
        stored_codes(load_binary_index(out / "images.faiss")), stored_codes(load_binary_index(built / "images.faiss"))
    )
    # the library's warning names its settings; the command's line, its flags
    r = ok(build(pipe, tmp_path / "over", "--prototypes", "train", "--prototype-preselect", str(TRAIN_CAPTIONS + 1)))
    assert f"Warning: --prototype-preselect {TRAIN_CAPTIONS + 1} exceeds the {TRAIN_CAPTIONS} captions" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prototypes", "train", "--prototype-k", "0"], "--prototype-k must be a whole number, at least 1, got 0"),
        (["--prototypes", "train", "--prototype-weight", "1"], "Error: --prototype-weight must be below 1"),
        (
            ["--prototypes", "train", "--prototype-k", "50", "--prototype-preselect", "40"],
            "Error: --prototype-k 50 exceeds --prototype-preselect (40): the top k captions",
        ),
        (
            ["--prototypes", "train", "--prototype-k", "400"],
            "Error: --prototype-k 400 exceeds --prototype-preselect (300)",
        ),
        (["--prototype-k", "3"], "--prototype-k tunes the codes of --prototypes SPLIT; give --prototypes too"),
    ],
)
def test_cli_refuses_bad_tuning(pipe, tmp_path, args, message):
    clean_error(build(pipe, tmp_path / "x", *args), message)
    assert not (tmp_path / "x").exists()
