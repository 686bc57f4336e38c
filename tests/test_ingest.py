"""heiindex.ingest and ``heiindex ingest``: precomp split -> Parquet store, atomically.

The CLI is exercised through click's ``CliRunner`` with real files in a tmp dir; the first test
is the issue's acceptance test, verbatim.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import clean_error, ok, run  # tests/ is on sys.path (pytest rootdir-relative import)

from heiindex import __version__
from heiindex.errors import DataError, VocabularyWarning
from heiindex.ingest import ingest
from heiindex.manifests import MANIFEST_FILE, file_sha256
from heiindex.store import CAPTIONS_FILE, FORMAT_VERSION, IMAGES_FILE, SplitStore
from heiindex.vocab import SPECIALS, Vocab


def _run(*args):
    return run("ingest", *args)


def _manifest(root, split="test") -> dict:
    return json.loads((root / split / MANIFEST_FILE).read_text())


def _checksums(m: dict) -> dict:
    return {
        "images": m["images"]["sha256"],
        "captions": m["captions"]["sha256"],
        "vocab": m["vocab"]["sha256"],
        "files": {k: v["sha256"] for k, v in m["files"].items()},
    }


def _no_leftovers(root, split="test"):
    """Nothing of a failed ingest: no split folder, no temporary folder, no Parquet file."""
    assert not (root / split).exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert list(root.rglob("*.parquet")) == []


# -- the acceptance test ------------------------------------------------------------------


def test_acceptance_cli_ingest_7_images_35_captions(make_precomp, tmp_path):
    precomp, feats, caps = make_precomp(n_images=7, feature_dim=2048)
    out = tmp_path / "O"
    result = ok(_run("--precomp", precomp, "--split", "test", "--out", out))
    assert "test: 7 images, 35 captions" in result.output

    images = pq.read_table(out / "test" / IMAGES_FILE)
    captions = pq.read_table(out / "test" / CAPTIONS_FILE)
    assert images.num_rows == 7
    assert captions.num_rows == 35
    assert images.column("image_id").to_pylist() == list(range(7))
    got = np.asarray(images.column("features").combine_chunks().values).reshape(7, 36, 2048)
    np.testing.assert_array_equal(got, feats)
    assert captions.column("caption_id").to_pylist() == list(range(35))
    assert captions.column("image_id").to_pylist() == [i // 5 for i in range(35)]
    assert captions.column("text").to_pylist() == caps

    vocab = Vocab.load(out / "vocab.json")
    assert vocab == Vocab.build(caps)
    assert len(vocab) == 29
    assert captions.column("tokens").to_pylist() == [vocab.encode(c).ids for c in caps]

    m = _manifest(out)
    assert m["format_version"] == FORMAT_VERSION == 1
    assert m["split"] == "test"
    assert m["created_by"] == f"heiindex {__version__}"
    assert m["images"] == {
        "count": 7,
        "regions": 36,
        "feature_dim": 2048,
        "dtype": "float32",
        "rows_per_image": 1,
        "sha256": m["images"]["sha256"],
    }
    assert m["captions"]["count"] == 35
    assert m["captions"]["per_image"] == 5
    assert m["captions"]["tokens"] == 420
    assert m["source"]["images"] == {"path": str((precomp / "test_ims.npy").resolve()), "dtype": "float32", "rows": 7}
    assert m["source"]["captions"]["path"] == str((precomp / "test_caps.txt").resolve())
    assert m["vocab"]["size"] == 29
    assert m["vocab"]["sha256"] == vocab.checksum
    assert m["vocab"]["unknown_rate"] == pytest.approx(157 / 420)
    for sha in (m["images"]["sha256"], m["captions"]["sha256"], m["source"]["captions"]["sha256"]):
        assert len(sha) == 64 and int(sha, 16) >= 0
    assert sorted(m["files"]) == [CAPTIONS_FILE, IMAGES_FILE]
    for name, entry in m["files"].items():
        assert entry["sha256"] == file_sha256(out / "test" / name)
        assert entry["bytes"] == (out / "test" / name).stat().st_size

    assert sorted(p.name for p in out.iterdir()) == ["test", "vocab.json"]
    assert sorted(p.name for p in (out / "test").iterdir()) == [CAPTIONS_FILE, IMAGES_FILE, MANIFEST_FILE]

    store = SplitStore.open(out, "test")
    assert (store.n_images, store.n_captions, store.regions, store.feature_dim) == (7, 35, 36, 2048)


def test_acceptance_36_caption_lines_fails_and_writes_nothing(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7, feature_dim=2048, n_captions=36)
    out = tmp_path / "O"
    out.mkdir()
    result = _run("--precomp", precomp, "--split", "test", "--out", out)
    clean_error(result, str(precomp / "test_caps.txt"), "36 captions")
    _no_leftovers(out)
    assert list(out.iterdir()) == []


def test_a_caption_too_long_to_encode_is_refused_by_line(make_precomp, tmp_path):
    """A line of 100,000 words was ingested, and build then asked for 12 GB (every caption of a
    block is padded to the longest) and died with a traceback, or the OOM killer."""
    precomp, _, caps = make_precomp(n_images=7, feature_dim=2048)
    lines = list(caps)
    lines[4] = " ".join(["dog"] * 129)
    lines[20] = " ".join(["dog"] * 100_000)
    (precomp / "test_caps.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "O"
    result = _run("--precomp", precomp, "--split", "test", "--out", out)
    clean_error(
        result,
        f"{precomp / 'test_caps.txt'}: line 5: the caption has 129 words; a caption may have at most 128 "
        "(COCO's longest has 51) (1 other line too: 21)",
    )
    assert not out.exists()
    lines[4], lines[20] = " ".join(["dog"] * 128), caps[20]  # 128 words: taken
    (precomp / "test_caps.txt").write_text("\n".join(lines) + "\n")
    ok(_run("--precomp", precomp, "--split", "test", "--out", out))


def test_acceptance_36_caption_lines_into_missing_out(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7, feature_dim=2048, n_captions=36)
    out = tmp_path / "O"
    result = _run("--precomp", precomp, "--split", "test", "--out", out)
    clean_error(result, str(precomp / "test_caps.txt"))
    assert not (out / "test").exists()
    assert list(tmp_path.rglob("*.parquet")) == []


def test_second_ingest_gives_same_checksums(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7)
    args = ("--precomp", precomp, "--split", "test", "--feature-dim", "8")
    ok(_run(*args, "--out", tmp_path / "O1"))
    first = _checksums(_manifest(tmp_path / "O1"))
    # again into the same root (replaces the split) and into a fresh root
    ok(_run(*args, "--out", tmp_path / "O1"))
    ok(_run(*args, "--out", tmp_path / "O2"))
    assert _checksums(_manifest(tmp_path / "O1")) == first
    assert _checksums(_manifest(tmp_path / "O2")) == first
    assert sorted(p.name for p in (tmp_path / "O1").iterdir()) == ["test", "vocab.json"]


def test_content_checksum_does_not_depend_on_block_size(make_precomp, tmp_path):
    """The manifest's images.sha256 is a content checksum ("independent of Parquet's encoding"):
    the same 7 images ingested in blocks of 2 or of 128 must give the same value."""
    precomp, _, _ = make_precomp(n_images=7)
    ingest(precomp, "test", tmp_path / "O2", feature_dim=8, block_images=2)
    ingest(precomp, "test", tmp_path / "O128", feature_dim=8, block_images=128)
    m2, m128 = _manifest(tmp_path / "O2"), _manifest(tmp_path / "O128")
    assert m2["captions"]["sha256"] == m128["captions"]["sha256"]
    assert m2["images"]["sha256"] == m128["images"]["sha256"]


@pytest.mark.parametrize("block", [0, -1, True, 2.5])
def test_block_size_must_be_a_whole_number_of_images(make_precomp, tmp_path, block):
    """-1 used to write a store of no image rows whose manifest counted 7 (and verify passed it)."""
    precomp, _, _ = make_precomp(n_images=7)
    with pytest.raises(ValueError, match=f"block_images must be a whole number, at least 1, got {block}"):
        ingest(precomp, "test", tmp_path / "O", feature_dim=8, block_images=block)
    assert not (tmp_path / "O").exists()


# -- library ------------------------------------------------------------------------------


def test_library_ingest_with_scan_vocab(make_precomp, tmp_path, scan_vocab_path):
    precomp, feats, caps = make_precomp(n_images=7)
    summary = ingest(precomp, "test", tmp_path / "O", vocab=scan_vocab_path, feature_dim=8, block_images=3)
    assert (summary.split, summary.n_images, summary.n_captions, summary.vocab_size) == ("test", 7, 35, 11352)
    assert summary.path == tmp_path / "O" / "test"
    assert summary.unknown_words == {"cloud-wreathed": 1, "inhales": 1, "goodness": 1}
    assert summary.unknown_rate == pytest.approx(3 / 420)
    assert summary.line() == (
        f"test: 7 images, 35 captions, vocab 11352, unknown-word rate 0.71% -> {tmp_path / 'O' / 'test'}"
    )
    assert Vocab.load(tmp_path / "O" / "vocab.json") == Vocab.load(scan_vocab_path)
    with warnings.catch_warnings():  # a given vocabulary leaving 0.71% unknown: nothing to say
        warnings.simplefilter("error")
        ingest(precomp, "test", tmp_path / "P", vocab=scan_vocab_path, feature_dim=8)
    with pytest.warns(VocabularyWarning) as seen:  # a train split builds the vocabulary SCAN would
        ingest(make_precomp("tr", split="train", n_images=7)[0], "train", tmp_path / "T", feature_dim=8)
    assert [str(w.message)[:5] for w in seen] == ["37.4%"]  # only the unknown words' share

    store = SplitStore.open(tmp_path / "O", "test")
    assert store.n_row_groups == 3  # one per block of 3 images
    np.testing.assert_array_equal(np.concatenate([f for _, f in store.iter_image_blocks(4)]), feats)
    table = store.captions()
    assert table.tokens[0, :17].tolist() == [1, 4, 34, 15, 4, 60, 952, 19, 4, 43, 5184, 19, 4, 1230, 600, 12, 2]
    assert table.lengths[0] == 17
    assert table.lengths.tolist() == [len(Vocab.load(scan_vocab_path).encode(c).ids) for c in caps]


def test_library_ingest_one_row_per_caption(make_precomp, tmp_path):
    precomp, feats, _ = make_precomp(n_images=7, rows_per_image=5)
    summary = ingest(precomp, "test", tmp_path / "O", feature_dim=8)
    assert (summary.n_images, summary.n_captions) == (7, 35)
    m = _manifest(tmp_path / "O")
    assert (m["images"]["count"], m["images"]["rows_per_image"], m["source"]["images"]["rows"]) == (7, 5, 35)
    images = pq.read_table(tmp_path / "O" / "test" / IMAGES_FILE)
    assert images.num_rows == 7
    got = np.asarray(images.column("features").combine_chunks().values).reshape(7, 36, 8)
    np.testing.assert_array_equal(got, feats)
    assert pq.read_table(tmp_path / "O" / "test" / CAPTIONS_FILE).column("image_id").to_pylist() == [
        i // 5 for i in range(35)
    ]


def test_library_bad_input_raises_and_writes_nothing(bad_precomp, tmp_path):
    out = tmp_path / "O"
    out.mkdir()
    with pytest.raises(DataError) as info:
        ingest(bad_precomp.folder, bad_precomp.split, out, feature_dim=bad_precomp.feature_dim, block_images=2)
    assert info.value.path == bad_precomp.named
    _no_leftovers(out, bad_precomp.split)
    assert not (out / "vocab.json").exists()


def test_failed_ingest_keeps_the_older_split(make_precomp, tmp_path):
    good, _, _ = make_precomp("good", n_images=7)
    out = tmp_path / "O"
    ingest(good, "test", out, feature_dim=8)
    before = {p.name: p.read_bytes() for p in (out / "test").iterdir()}
    bad, _, _ = make_precomp("bad", n_images=7)
    a = np.load(bad / "test_ims.npy")
    a[5, 0, 0] = np.nan
    np.save(bad / "test_ims.npy", a)
    with pytest.raises(DataError, match="image 5"):
        ingest(bad, "test", out, feature_dim=8, block_images=2)
    assert {p.name: p.read_bytes() for p in (out / "test").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["test", "vocab.json"]


# -- CLI: bad input -----------------------------------------------------------------------


def test_cli_ingests_one_caption_per_image(make_precomp, tmp_path):
    """--captions-per-image 1: caption i is image i's (7 images, 7 captions were refused as 5 per image)."""
    precomp, feats, caps = make_precomp(n_images=7, n_captions=7)
    refused = _run("--precomp", precomp, "--split", "test", "--out", tmp_path / "five", "--feature-dim", "8")
    assert refused.exit_code == 2 and "7 captions do not fit 7 feature rows" in refused.output
    out = tmp_path / "O"
    result = ok(
        _run("--precomp", precomp, "--split", "test", "--out", out, "--feature-dim", "8", "--captions-per-image", "1")
    )
    assert "test: 7 images, 7 captions" in result.output
    captions = pq.read_table(out / "test" / CAPTIONS_FILE)
    assert captions.column("image_id").to_pylist() == list(range(7))
    assert captions.column("text").to_pylist() == caps
    assert _manifest(out)["captions"]["per_image"] == 1
    store = SplitStore.open(out, "test")
    store.check_ids(store.captions())  # every image captioned
    assert (store.n_images, store.n_captions) == (7, 7)


def test_cli_bad_input_exits_2_and_names_the_file(bad_precomp, tmp_path):
    out = tmp_path / "O"
    out.mkdir()
    result = _run(
        "--precomp",
        bad_precomp.folder,
        "--split",
        bad_precomp.split,
        "--out",
        out,
        "--feature-dim",
        str(bad_precomp.feature_dim),
    )
    if bad_precomp.name == "unknown_split":  # refused by click's choice before the library runs
        details = ("--split",)
    else:
        # the library's `name` of a setting is the command's --flag (captions_per_image, regions)
        flagged = re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), bad_precomp.detail)
        details = (f"Error: {bad_precomp.named}: ", flagged)
    clean_error(result, *details)
    _no_leftovers(out, bad_precomp.split)


def test_cli_wrong_expected_feature_dim(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7)  # feature size 8, the CLI expects 2048 by default
    result = _run("--precomp", precomp, "--split", "test", "--out", tmp_path / "O")
    clean_error(result, str(precomp / "test_ims.npy"), "expected feature size 2048 (axis 2), got 8")


def test_splits_of_another_feature_size_are_refused_in_one_store(make_precomp, tmp_path):
    """ingest put 8-d and 16-d splits into one root; a model can encode only one of them."""
    a, _, _ = make_precomp("a", split="test", n_images=7, feature_dim=8)
    b, _, _ = make_precomp("b", split="dev", n_images=7, feature_dim=16)
    ingest(a, "test", tmp_path / "O", regions=None, feature_dim=None)
    with pytest.raises(
        DataError, match=r"test/manifest.json: split test of this store has 36 x 8 region features; dev has 36 x 16"
    ):
        ingest(b, "dev", tmp_path / "O", regions=None, feature_dim=None)
    assert sorted(p.name for p in (tmp_path / "O").iterdir()) == ["test", "vocab.json"]
    (tmp_path / "O" / "index").mkdir()  # a folder with another kind of manifest.json is not a split to judge
    (tmp_path / "O" / "index" / "manifest.json").write_text('{"matcher": {}}')
    c, _, _ = make_precomp("c", split="test", n_images=7, feature_dim=16)
    ingest(c, "test", tmp_path / "O", regions=None, feature_dim=None)  # the split itself may change shape
    assert SplitStore.open(tmp_path / "O", "test").feature_dim == 16


def test_cli_missing_vocab_file(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7)
    result = _run(
        "--precomp",
        precomp,
        "--split",
        "test",
        "--out",
        tmp_path / "O",
        "--feature-dim",
        "8",
        "--vocab",
        tmp_path / "nope.json",
    )
    clean_error(result, str(tmp_path / "nope.json"))
    assert not (tmp_path / "O" / "test").exists()


def test_cli_a_folder_where_a_file_is_expected_is_a_clear_error(make_precomp, tmp_path):
    """--vocab naming a folder was an IsADirectoryError traceback (any OSError now ends in one
    line naming the path), and an --out under a file a FileExistsError."""
    precomp, _, _ = make_precomp(n_images=7)
    (tmp_path / "vocab").mkdir()
    args = ("--precomp", precomp, "--split", "test", "--feature-dim", "8")
    r = _run(*args, "--out", tmp_path / "O", "--vocab", tmp_path / "vocab")
    clean_error(r, f"{tmp_path / 'vocab'}: cannot be read (Is a directory)")  # Vocab.load's DataError
    (tmp_path / "file").write_text("")
    r = _run(*args, "--out", tmp_path / "file")
    clean_error(r, f"{tmp_path / 'file'}: exists and is not a folder; a store root is a folder")
    assert not (tmp_path / "O").exists() and (tmp_path / "file").read_text() == ""


def test_an_out_that_is_not_a_store_root_is_refused_and_left_as_it_was(make_precomp, tmp_path):
    """ingest wrote a split and a vocab.json into an index, a store split, a model folder or the
    precomp folder itself (each then refused by every other command), and into a folder of the
    user's own."""
    precomp, _, _ = make_precomp(n_images=7)
    args = ("--precomp", precomp, "--split", "test", "--feature-dim", "8")
    store = tmp_path / "store"
    ok(_run(*args, "--out", store))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "vocab.json").write_text("{}")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "notes.txt").write_text("mine")
    cases = {
        store / "test": "holds a manifest.json, so it is a store split or an index, not a store root",
        tmp_path / "model": "holds what a store root does not (config.json)",
        precomp: "holds what a store root does not (test_caps.txt, test_ims.npy)",
        tmp_path / "own": "holds what a store root does not (notes.txt)",
    }
    for out, detail in cases.items():
        before = sorted(p.name for p in out.iterdir())
        r = _run(*args, "--out", out)
        clean_error(r, f"{out}: {detail}")
        assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(DataError, match="holds a manifest.json"):
        ingest(precomp, "test", store / "test", feature_dim=8)


def test_a_store_root_may_keep_an_index_and_hidden_files_beside_its_splits(make_precomp, tmp_path):
    test_dir, _, _ = make_precomp("t", split="test", n_images=7)
    dev_dir, _, _ = make_precomp("d", split="dev", n_images=7, first_line=35)
    store = tmp_path / "store"
    ingest(test_dir, "test", store, feature_dim=8)
    (store / "index").mkdir()
    (store / "index" / MANIFEST_FILE).write_text("{}")
    (store / ".DS_Store").write_text("")
    (store / "lost+found").mkdir()  # a store root at the top of a file system
    ingest(dev_dir, "dev", store, feature_dim=8)
    assert sorted(p.name for p in store.iterdir()) == [".DS_Store", "dev", "index", "lost+found", "test", "vocab.json"]
    # The split being written may be there without its manifest (a repair), or empty.
    (store / "test" / MANIFEST_FILE).unlink()
    ingest(test_dir, "test", store, feature_dim=8)
    assert (store / "test" / MANIFEST_FILE).is_file()
    (store / "train").mkdir()
    ingest(make_precomp("r", split="train", n_images=7, first_line=70)[0], "train", store, feature_dim=8)
    assert (store / "train" / MANIFEST_FILE).is_file()


def test_a_link_to_nothing_as_out_is_named_as_such(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7)
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=f"is a link to {tmp_path / 'gone'}, which does not exist"):
        ingest(precomp, "test", tmp_path / "link", feature_dim=8)


# -- vocabulary across splits -------------------------------------------------------------


def test_vocab_conflict_is_refused(make_precomp, tmp_path, scan_vocab_path):
    test_dir, _, _ = make_precomp("t", split="test", n_images=7)
    dev_dir, _, dev_caps = make_precomp("d", split="dev", n_images=7, first_line=35)
    out = tmp_path / "O"
    ok(_run("--precomp", test_dir, "--split", "test", "--out", out, "--feature-dim", "8", "--vocab", scan_vocab_path))
    other = tmp_path / "other_vocab.json"
    Vocab.build(dev_caps).save(other)
    result = _run("--precomp", dev_dir, "--split", "dev", "--out", out, "--feature-dim", "8", "--vocab", other)
    clean_error(result, str(out / "vocab.json"), "another vocabulary")
    assert not (out / "dev").exists()
    assert Vocab.load(out / "vocab.json") == Vocab.load(scan_vocab_path)
    # the same vocabulary again is accepted
    ok(_run("--precomp", dev_dir, "--split", "dev", "--out", out, "--feature-dim", "8", "--vocab", scan_vocab_path))
    assert _manifest(out, "dev")["vocab"]["size"] == 11352


def test_vocab_conflict_is_refused_by_the_library(make_precomp, tmp_path):
    precomp, _, _ = make_precomp(n_images=7)
    out = tmp_path / "O"
    ingest(precomp, "test", out, feature_dim=8)
    with pytest.raises(DataError) as info:
        ingest(precomp, "test", out, vocab=Vocab([*SPECIALS, "dog"]), feature_dim=8)
    assert info.value.path == out / "vocab.json"


def test_a_root_that_lost_its_vocab_keeps_its_splits_vocabulary(make_precomp, tmp_path):
    """With vocab.json gone but a split left, ingest built a new vocabulary from the new split's
    captions and left the root with two (verify then failed). It needs the recorded one."""
    test_dir, _, test_caps = make_precomp("t", split="test", n_images=7)
    dev_dir, _, _ = make_precomp("d", split="dev", n_images=7, first_line=35)
    out = tmp_path / "O"
    ingest(test_dir, "test", out, feature_dim=8)
    built = Vocab.load(out / "vocab.json")
    saved = tmp_path / "saved_vocab.json"
    built.save(saved)
    (out / "vocab.json").unlink()
    with pytest.raises(
        DataError,
        match=rf"missing, but split\(s\) test of this store were tokenised with vocabulary {built.checksum[:12]}",
    ) as info:
        ingest(dev_dir, "dev", out, feature_dim=8)
    assert info.value.path == out / "vocab.json" and not (out / "dev").exists()
    with pytest.raises(DataError, match=r"record vocabulary .*, not the `vocab` given \("):
        ingest(dev_dir, "dev", out, vocab=Vocab([*SPECIALS, "dog"]), feature_dim=8)
    ingest(dev_dir, "dev", out, vocab=saved, feature_dim=8)  # the recorded one is accepted
    assert _manifest(out, "dev")["vocab"]["sha256"] == built.checksum
    # Re-ingesting the only split builds a new vocabulary, as into a new root: nothing else uses it.
    alone = tmp_path / "alone"
    ingest(test_dir, "test", alone, feature_dim=8)
    (alone / "vocab.json").unlink()
    ingest(test_dir, "test", alone, feature_dim=8)
    assert Vocab.load(alone / "vocab.json") == Vocab.build(test_caps)


def test_a_vocabulary_saved_meanwhile_by_another_ingest_is_not_overwritten(make_precomp, tmp_path, monkeypatch):
    """Two ingests into a new root each built a vocabulary from their own captions, and each wrote
    vocab.json: one split was left tokenised with a vocabulary the root no longer had. Another
    ingest saving first (here: while this one writes its captions) now stops this one."""
    import heiindex.ingest as ingest_module

    test_dir, _, test_caps = make_precomp("t", split="test", n_images=7)
    out = tmp_path / "O"
    theirs = Vocab([*SPECIALS, "dog"])
    real_write = ingest_module.write_captions

    def another_ingest_saves_first(*args, **kwargs):
        theirs.save(out / "vocab.json")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "write_captions", another_ingest_saves_first)
    with pytest.raises(DataError, match=r"was written by another ingest into this store while this one ran") as info:
        ingest(test_dir, "test", out, feature_dim=8)
    assert info.value.path == out / "vocab.json"
    assert "ingest it again to use the store's vocabulary" in str(info.value)
    assert not (out / "test").exists() and Vocab.load(out / "vocab.json") == theirs
    assert sorted(p.name for p in out.iterdir()) == ["vocab.json"]  # no scratch left
    # the same vocabulary saved meanwhile is no conflict
    (out / "vocab.json").unlink()
    theirs = Vocab.build(test_caps)
    ingest(test_dir, "test", out, feature_dim=8)
    assert _manifest(out, "test")["vocab"]["sha256"] == theirs.checksum == Vocab.load(out / "vocab.json").checksum


def test_the_vocabulary_is_saved_through_a_link_and_a_dead_runs_scratch_of_it_is_cleared(make_precomp, tmp_path):
    import pipeline_fixtures as pf

    from heiindex import atomic

    test_dir, _, test_caps = make_precomp("t", split="test", n_images=7)
    out = tmp_path / "O"
    out.mkdir()
    left = out / f".vocab.json.partial-{atomic._HOST}-{atomic._NS}-{pf.dead_pid()}-abcd"
    left.write_text("half")  # a killed ingest's scratch of vocab.json
    kept = tmp_path / "shared-vocab.json"
    (out / "vocab.json").symlink_to(kept)  # dangling: written where it points
    ingest(test_dir, "test", out, feature_dim=8)
    assert (out / "vocab.json").is_symlink() and Vocab.load(kept) == Vocab.build(test_caps)
    assert sorted(p.name for p in out.iterdir()) == ["test", "vocab.json"]


def test_concurrent_ingests_into_a_new_root_leave_one_vocabulary(make_precomp, tmp_path):
    """Whatever the interleaving, every split written is tokenised with the root's vocab.json."""
    from concurrent.futures import ThreadPoolExecutor

    test_dir, _, _ = make_precomp("t", split="test", n_images=7)
    dev_dir, _, _ = make_precomp("d", split="dev", n_images=7, first_line=35)
    for attempt in range(3):
        out = tmp_path / f"O{attempt}"
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(ingest, folder, split, out, feature_dim=8)
                for folder, split in ((test_dir, "test"), (dev_dir, "dev"))
            ]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result().split)
            except DataError as exc:
                assert "was written by another ingest into this store" in str(exc)
        assert outcomes  # at least one of them was written
        root_vocab = Vocab.load(out / "vocab.json").checksum
        for split in ("test", "dev"):
            assert (out / split).exists() == (split in outcomes)
            if split in outcomes:
                assert _manifest(out, split)["vocab"]["sha256"] == root_vocab


def test_two_ingests_that_both_built_a_vocabulary_leave_one_split_and_a_refusal(make_precomp, tmp_path, monkeypatch):
    """The race forced: both ingests into a new root have built their vocabulary (test's and
    dev's, which differ) before either saves it. Exactly one saves vocab.json and writes its split;
    the other is refused by name and writes nothing."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import heiindex.ingest

    test_dir, _, _ = make_precomp("t", split="test", n_images=7)
    dev_dir, _, _ = make_precomp("d", split="dev", n_images=7, first_line=35)
    both_built = threading.Barrier(2, timeout=120)
    real = heiindex.ingest._claim_vocab

    def claim_together(path, voc, split):
        both_built.wait()
        return real(path, voc, split)

    monkeypatch.setattr(heiindex.ingest, "_claim_vocab", claim_together)
    out = tmp_path / "O"
    with ThreadPoolExecutor(2) as pool:
        futures = {
            split: pool.submit(ingest, folder, split, out, feature_dim=8)
            for folder, split in ((test_dir, "test"), (dev_dir, "dev"))
        }
    written = [split for split, f in futures.items() if f.exception() is None]
    refused = [split for split, f in futures.items() if f.exception() is not None]
    assert len(written) == len(refused) == 1
    exc = futures[refused[0]].exception()
    assert isinstance(exc, DataError) and "was written by another ingest into this store" in str(exc)
    assert f"so {refused[0]} was not written" in str(exc)
    assert sorted(p.name for p in out.iterdir()) == sorted([written[0], "vocab.json"])
    assert _manifest(out, written[0])["vocab"]["sha256"] == Vocab.load(out / "vocab.json").checksum


def test_first_split_builds_vocab_next_split_reuses_it(make_precomp, tmp_path, testall_lines):
    test_dir, _, test_caps = make_precomp("t", split="test", n_images=7)
    dev_dir, _, dev_caps = make_precomp("d", split="dev", n_images=7, first_line=35)
    out = tmp_path / "O"
    r1 = ok(_run("--precomp", test_dir, "--split", "test", "--out", out, "--feature-dim", "8"))
    assert "vocab 29" in r1.output
    # said: the store's vocabulary now comes from test, and leaves many of these words unknown
    assert "Warning: the store's vocabulary (29 words) was built from the test captions; SCAN builds it" in r1.output
    assert "Warning: 37.4% of the test captions' words are not in the vocabulary and encode as <unk>" in r1.output
    built = Vocab.load(out / "vocab.json")
    assert built == Vocab.build(test_caps)
    vocab_bytes = (out / "vocab.json").read_bytes()

    r2 = ok(_run("--precomp", dev_dir, "--split", "dev", "--out", out, "--feature-dim", "8"))
    assert "dev: 7 images, 35 captions, vocab 29" in r2.output
    assert "was built from" not in r2.output  # reused, not built
    assert (out / "vocab.json").read_bytes() == vocab_bytes
    assert Vocab.build(dev_caps) != built  # dev alone would have built another vocabulary
    m_test, m_dev = _manifest(out, "test"), _manifest(out, "dev")
    assert m_dev["vocab"]["sha256"] == m_test["vocab"]["sha256"] == built.checksum
    dev_tokens = pq.read_table(out / "dev" / CAPTIONS_FILE).column("tokens").to_pylist()
    assert dev_tokens == [built.encode(c).ids for c in dev_caps]
    assert sorted(p.name for p in out.iterdir()) == ["dev", "test", "vocab.json"]


def test_an_interrupted_first_ingest_leaves_no_vocabulary_in_the_new_root(make_precomp, tmp_path, monkeypatch):
    """The vocabulary is claimed just before the split is put in place: interrupted there, the new
    root kept a vocab.json built from that split's captions, and the next ingest with --vocab was
    refused (without, tokenised with the dead run's vocabulary). A root's own vocabulary stays."""
    import heiindex.outputs as outputs_module

    precomp, _, _ = make_precomp(n_images=7)
    out = tmp_path / "new"

    def interrupted(new, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs_module, "swap_in", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(precomp, "test", out, feature_dim=8)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # no split, no vocab.json
    monkeypatch.undo()
    ingest(precomp, "test", out, feature_dim=8)  # a store root with a split and its vocabulary
    monkeypatch.setattr(outputs_module, "swap_in", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(precomp, "test", out, feature_dim=8)  # a re-ingest: the root's vocabulary was not this run's
    assert (out / "vocab.json").exists() and SplitStore.open(out, "test").n_images == 7


def test_the_summary_line_counts_in_the_singular_and_with_thousands():
    """A 1-image split printed "1 images"."""
    from heiindex.ingest import IngestSummary

    one = IngestSummary("dev", Path("/s/dev"), 1, 1, 30, 0.0, {})
    assert one.line() == "dev: 1 image, 1 caption, vocab 30, unknown-word rate 0.00% -> /s/dev"
    many = IngestSummary("test", Path("/s/test"), 5000, 25000, 30, 0.5, {})
    assert many.line().startswith("test: 5,000 images, 25,000 captions, vocab 30, unknown-word rate 50.00%")
