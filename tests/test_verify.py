"""heiindex verify: the files of a store and of an index (sharded or not) against the sizes and
SHA-256s their manifests record; a changed byte, a truncation and a missing file are each named."""

from __future__ import annotations

import json
import re
import shutil

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from cli_helpers import as_json, build, clean_error, ok, run  # tests/ is on sys.path (pytest rootdir-relative import)
from conftest import small_store  # tests/ is on sys.path

from heiindex.errors import DataError
from heiindex.index import Index
from heiindex.shards import ShardedIndex
from heiindex.verify import failures, verify


def _flip_a_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_store_split_and_root(pipe, tmp_path):
    root = pf.copy_store(pipe, tmp_path)
    checks = verify(root)
    assert failures(checks) is None and not any(c.failed for c in checks)
    assert [(c.path.parent.name, c.path.name, c.status) for c in checks] == [
        (split, name, "ok") for split in ("dev", "test", "train") for name in ("captions.parquet", "images.parquet")
    ] + [("store", "vocab.json", "ok")]
    assert checks[-1].detail == "the vocabulary splits dev, test and train record"  # a deleted split shows here
    _flip_a_byte(root / "test" / "images.parquet")  # same size: only the SHA-256 tells
    (root / "dev" / "captions.parquet").write_bytes((root / "dev" / "captions.parquet").read_bytes()[:-10])
    (root / "train" / "images.parquet").unlink()
    got = {(c.path.parent.name, c.path.name): (c.status, c.detail) for c in verify(root)}
    assert got[("test", "images.parquet")][0] == "changed" and "SHA-256" in got[("test", "images.parquet")][1]
    assert got[("dev", "captions.parquet")][0] == "changed" and "bytes" in got[("dev", "captions.parquet")][1]
    assert got[("train", "images.parquet")][0] == "missing"
    assert got[("test", "captions.parquet")][0] == "ok"
    assert failures(verify(root)) == (  # what `heiindex verify` exits with, for a script of its own
        "2 changed, 1 missing of 7 listed: files that differ from what their manifests record or are not there, "
        "or manifests heiindex cannot read"
    )
    assert [c.status for c in verify(root / "test")] == ["ok", "changed", "ok"]  # and the root's vocab.json
    assert verify(root / "test")[-1].detail == "the vocabulary split test records"


def test_what_interrupted_runs_left_is_listed_as_leftover(pipe, tmp_path):
    """A store root's split scratch (inside it) and an index's (beside it) are listed last, as
    leftovers, not as changed data: the exit status stays 0."""
    root = pf.copy_store(pipe, tmp_path)
    index = tmp_path / "index"
    shutil.copytree(pipe.index_dir, index)
    split_scratch = root / ".test.partial-somehost-4026531836-12345-abcd"
    split_scratch.mkdir()
    (split_scratch / "images.parquet").write_bytes(b"x" * 2_000_000)
    index_scratch = tmp_path / ".index.old-somehost-4026531836-12345-efgh"
    index_scratch.mkdir()
    checks = verify(root)
    assert [c.status for c in checks[:-1]] == ["ok"] * 7
    assert (checks[-1].path, checks[-1].status) == (split_scratch, "leftover")
    assert checks[-1].detail.startswith(
        "left by an interrupted run or a replaced output that could not all be deleted (2.0 MB), not part of the data"
    )
    assert [(c.path, c.status) for c in verify(index)][-1] == (index_scratch, "leftover")
    r = ok(run("verify", root, "--json"))
    assert as_json(r)["files"][-1]["status"] == "leftover"
    # a build killed before it put its output in place: the folder is missing, its scratch listed
    # (verify said only "no manifest.json here")
    shutil.rmtree(index)
    partial = index_scratch.rename(tmp_path / ".index.partial-somehost-4026531836-12345-efgh")
    checks = verify(index)
    assert [(c.path, c.status) for c in checks] == [(index, "missing"), (partial, "leftover")]
    assert checks[0].detail == "no such folder: a run writing it was interrupted (leftovers below)"
    r = run("verify", index, "--json")
    assert r.exit_code == 2 and [f["status"] for f in json.loads(r.stdout)["files"]] == ["missing", "leftover"]
    # the previous index, set aside by a replace killed between its two renames (no exchange on
    # this file system): verify said to delete it, the only copy, as any leftover
    partial.rename(index_scratch)
    checks = verify(index)
    assert [(c.path, c.status) for c in checks] == [(index, "missing"), (index_scratch, "leftover")]
    assert checks[0].detail == (
        "no such folder: a run replacing it was interrupted between two renames (its previous copy is below)"
    )
    assert checks[1].detail == (  # of another host: no write here puts it back (verify said the next one would)
        "the previous index (0 bytes), set aside by a run replacing it that was interrupted between two renames: "
        "rename it back to index"
    )
    from heiindex import atomic

    dead = tmp_path / f".index.old-{atomic._HOST}-{atomic._NS}-{pf.dead_pid()}-efgh"  # a dead run of this host's
    index_scratch.rename(dead)
    assert verify(index)[1].detail.endswith(
        "rename it back to index (the next write of index on this machine puts it back first)"
    )
    dead.rename(index_scratch)
    shutil.copytree(pipe.index_dir, index)  # an index in place again: the set-aside copy is a leftover as any other
    assert verify(index)[-1].detail.startswith("left by an interrupted run or a replaced output")
    # a new store root whose first ingest was killed holds only its scratch split (verify said
    # only "no manifest.json here"), with or without the vocab.json of an earlier run
    new_root = tmp_path / "new-root"
    new_root.mkdir()
    first = new_root / ".train.partial-somehost-4026531836-12345-abcd"
    first.mkdir()
    (new_root / ".train.lock").touch()  # what a killed ingest leaves beside its scratch split too
    for extra in (None, "vocab.json"):
        if extra:
            shutil.copy(root / extra, new_root / extra)
        checks = verify(new_root)
        assert [(c.path, c.status) for c in checks] == [(new_root, "missing"), (first, "leftover")]
        assert checks[0].detail == "no split or index here: a run writing into it was interrupted (below)"
        assert run("verify", new_root).exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no manifest.json here"):  # an empty folder is still no store
        verify(empty)
    mine = tmp_path / "mine"  # a folder of the user's own, with a leftover in it
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / ".x.partial-somehost-4026531836-12345-abcd").mkdir()
    with pytest.raises(DataError, match="no manifest.json here"):
        verify(mine)


def test_an_index_kept_in_a_store_root_is_verified_with_it(pipe, tmp_path):
    """Its manifest records no vocabulary, which the store root's vocab check took for a change."""
    root = pf.copy_store(pipe, tmp_path)
    shutil.copytree(pipe.index_dir, root / "index")
    checks = verify(root)
    assert {c.status for c in checks} == {"ok"}
    assert {c.path.parent.name for c in checks} == {"dev", "test", "train", "index", "store"}


def test_a_changed_store_vocabulary_is_reported(pipe, tmp_path):
    """Every file checked "ok" after vocab.json had two words swapped, which re-maps their ids."""
    root = pf.copy_store(pipe, tmp_path)
    pf.swap_words(root / "vocab.json")
    for target in (root, root / "dev"):
        [check] = [c for c in verify(target) if c.path.name == "vocab.json"]
        assert check.status == "changed" and "records" in check.detail
        assert {c.status for c in verify(target) if c.path.name != "vocab.json"} == {"ok"}


def test_a_split_whose_record_leaves_out_a_file_is_invalid(pipe, tmp_path):
    """With images.parquet's entry deleted from "files", a damaged images.parquet went unchecked:
    verify listed captions.parquet "ok" and passed the split (an index's manifest is refused so)."""
    from heiindex.store import SplitStore

    root = pf.copy_store(pipe, tmp_path)
    with pf.edited_json(root / "test" / "manifest.json") as m:
        del m["files"]["images.parquet"]
    [bad] = [c for c in verify(root / "test") if c.status != "ok"]
    assert (bad.path, bad.status) == (root / "test" / "manifest.json", "invalid")
    assert bad.detail == 'field "files" records no images.parquet (an ingest records both)'
    with pytest.raises(DataError, match="records no images.parquet"):
        SplitStore.open(root, "test")


def test_a_split_recording_another_vocabulary_size_than_its_vocab_is_invalid(pipe, tmp_path):
    """verify said ok; build then refused the captions' token ids as outside a vocabulary of 100
    words, blaming captions.parquet."""
    root = pf.copy_store(pipe, tmp_path)
    with pf.edited_json(root / "test" / "manifest.json") as m:
        m["vocab"]["size"] = 100
    [bad] = [c for c in verify(root) if c.status != "ok"]
    assert (bad.path, bad.status) == (root / "test" / "manifest.json", "invalid")
    assert bad.detail.startswith('field "vocab.size" is 100, where ') and bad.detail.endswith(" words")


@pytest.mark.parametrize("vocab", ["x", None, 3, []])
def test_a_split_whose_vocab_field_is_not_an_object_is_invalid_not_a_traceback(pipe, tmp_path, vocab):
    """verify of the root or the split ended in AttributeError ('str' object has no attribute 'get')."""
    root = pf.copy_store(pipe, tmp_path)
    with pf.edited_json(root / "test" / "manifest.json") as m:
        m["vocab"] = vocab
    for target in (root, root / "test"):
        bad = [c for c in verify(target) if c.status != "ok"]
        assert bad and {(c.path, c.status) for c in bad} == {(root / "test" / "manifest.json", "invalid")}
        assert any(c.detail.startswith('field "vocab') for c in bad)


def test_an_index_and_a_sharded_build(pipe, tmp_path):
    out = tmp_path / "copy"
    ok(build(pipe, out))
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["files"]) == [
        "caption_features.parquet",
        "captions.faiss",
        "image_features.parquet",
        "images.faiss",
    ]
    assert {c.status for c in verify(out)} == {"ok"}
    _flip_a_byte(out / "captions.faiss")
    assert {c.path.name: c.status for c in verify(out)}["captions.faiss"] == "changed"
    sharded = tmp_path / "sharded"
    ok(build(pipe, sharded, "--shards", "2"))
    checks = verify(sharded)
    assert len(checks) == 8 and {c.path.parent.name for c in checks} == {"shard-000", "shard-001"}
    assert {c.status for c in checks} == {"ok"}
    # A missing shard is reported as such, and the other shards are still checked (verify
    # stopped at it with "no manifest.json here").
    shutil.rmtree(sharded / "shard-000")
    checks = verify(sharded)
    assert (checks[0].path.parent.name, checks[0].path.name, checks[0].status) == (
        "shard-000",
        "manifest.json",
        "missing",
    )
    assert checks[0].detail == f"shard shard-000, recorded in {sharded / 'manifest.json'}"
    assert len(checks) == 5 and {c.status for c in checks[1:]} == {"ok"}
    with pytest.raises(DataError, match=r"manifest.json: records shard shard-000, which is missing .*--shards S"):
        ShardedIndex.open(sharded)


def test_a_file_or_a_split_given_for_a_folder_or_a_root_is_named_as_such(pipe, tmp_path):
    """A manifest given for its folder said ".../manifest.json/manifest.json: no manifest.json
    here"; a split given as --store ".../test/test/manifest.json: no store manifest here"."""
    from heiindex.index_manifest import read_index_manifest
    from heiindex.store import SplitStore

    manifest = pipe.index_dir / "manifest.json"
    with pytest.raises(DataError, match=r"index-test/manifest.json: is a file; give the folder that holds it"):
        verify(manifest)
    with pytest.raises(DataError, match=r"manifest.json: is a file; give the index folder that holds it"):
        read_index_manifest(manifest)
    with pytest.raises(
        DataError, match=r"test: is store split 'test', not a store root: give the folder that holds it"
    ):
        SplitStore.open(pipe.root / "test", "test")
    with pytest.raises(
        DataError, match=r"index-test: holds a manifest\.json that is not a store split's \(an index\?\)"
    ):
        SplitStore.open(pipe.index_dir, "test")  # an index's folder is no store root


def test_what_cannot_be_verified_is_said(pipe, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(pipe.index_dir, old)
    m = json.loads((old / "manifest.json").read_text())
    m.pop("files", None)  # as an index built before checksums were recorded
    (old / "manifest.json").write_text(json.dumps(m))
    [check] = verify(old)
    assert (check.path.name, check.status) == ("manifest.json", "unrecorded")
    with pytest.raises(DataError, match="nothing: no such folder; give a store root or split, an index, or a model"):
        verify(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json here: not a store, a store split, an index, a model"):
        verify(tmp_path / "empty")
    m["files"] = {"images.faiss": {"bytes": "12"}}
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r'field "files.images.faiss" must hold "bytes" and "sha256"'):
        verify(old)
    record = {"bytes": 1, "sha256": "0" * 64}
    for name in ("../../etc/hostname", "/etc/hostname", "", ".", "sub/images.faiss"):  # only this folder's files
        m["files"] = {name: record}
        (old / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DataError, match=f'field "files" must name files in this folder, got {name!r}'):
            verify(old)
        with pytest.raises(DataError, match=f'field "files" must name files in this folder, got {name!r}'):
            Index.open(old)  # it opened, where verify refused the same manifest


def test_a_sharded_manifest_names_its_own_distinct_shard_folders(pipe, tmp_path):
    """A shard path "." made verify recurse for ever; "../x" or an absolute path read files outside
    the build, and a shard listed twice was counted twice by ShardedIndex.open."""
    from heiindex.shards import ShardedIndex

    sharded = tmp_path / "sharded"
    ok(build(pipe, sharded, "--shards", "2"))
    good = json.loads((sharded / "manifest.json").read_text())
    cases = [
        (
            [{**good["shards"][0], "path": p}],
            rf'field "shards\[0\].path" must name a folder inside the build, got {p!r}',
        )
        for p in (".", "..", "../index-test", "/tmp", "", 3)
    ]
    cases += [
        ([good["shards"][0], good["shards"][0]], r'field "shards\[1\].path" names shard \'shard-000\' a second time'),
        ([], 'field "shards" lists no shard'),
        (["x"], r'field "shards\[0\]" must be an object \{"path": ...\}, got \'x\''),  # said shards[0].path, got None
    ]
    for shards, detail in cases:
        (sharded / "manifest.json").write_text(json.dumps({**good, "shards": shards}))
        for read in (verify, ShardedIndex.open):
            with pytest.raises(DataError, match=detail):
                read(sharded)
    # What ShardedIndex.open refuses, verify reports "invalid" (and still checks the shards' files).
    for bad, detail in (
        ({**good, "shards": [{"path": "shard-000"}]}, 'field "shards[0].n_images" is missing or not of type int'),
        ({**good, "matcher": {}}, 'field "matcher.path" is missing or not of type str'),
        ({**good, "format_version": 99}, "sharded build of format_version 99, expected 1"),
    ):
        (sharded / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=re.escape(detail)):
            ShardedIndex.open(sharded)
        checks = verify(sharded)
        assert (checks[0].path, checks[0].status) == (sharded / "manifest.json", "invalid")
        assert checks[0].detail.startswith(detail)
        assert {c.status for c in checks[1:]} == {"ok"}


def test_cli(pipe, tmp_path):
    root = pf.copy_store(pipe, tmp_path)
    d = as_json(run("verify", root, "--json"))
    assert d["path"] == str(root) and len(d["files"]) == 7 and {f["status"] for f in d["files"]} == {"ok"}
    assert "ok" in ok(run("verify", root / "test")).output
    _flip_a_byte(root / "test" / "images.parquet")
    r = run("verify", root)
    clean_error(r, "1 changed of 7 listed: files that differ from what their manifests record")
    assert "changed" in r.output


def test_a_store_root_without_splits_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(DataError, match="a store root without splits"):
        verify(tmp_path)


def test_files_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": []}))
    with pytest.raises(DataError, match='field "files" must be an object, got list'):
        verify(tmp_path)


def test_a_record_with_bytes_as_text_is_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a.bin": {"bytes": "3", "sha256": "x"}}}))
    with pytest.raises(DataError, match='field "files.a.bin" must hold "bytes" and "sha256"'):
        verify(tmp_path)


def test_every_split_of_a_root_is_checked_against_its_vocab(tmp_path):
    root = small_store(tmp_path, ("dev", "test"))
    with pf.edited_json(root / "test" / "manifest.json") as m:
        m["vocab"]["sha256"] = "0" * 64
    vocab = [c for c in verify(root) if c.path.name == "vocab.json"]
    assert [c.status for c in vocab] == ["changed"]
    assert "split test records 000000000000" in vocab[0].detail


def test_a_folder_where_a_recorded_file_was_is_missing(tmp_path):
    (tmp_path / "a.bin").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a.bin": {"bytes": 3, "sha256": "x"}}}))
    assert [c.status for c in verify(tmp_path)] == ["invalid", "missing"]  # a bare manifest; its file still checked


def test_a_manifest_the_commands_would_refuse_is_reported_invalid(pipe, tmp_path):
    """verify said ok (or "written by an older heiindex") for manifests every command refuses."""
    index = tmp_path / "index"
    shutil.copytree(pipe.index_dir, index)
    m = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    checks = verify(index)
    assert (checks[0].path.name, checks[0].status, checks[0].detail) == (
        "manifest.json",
        "invalid",
        "format_version 99, expected 1",
    )
    assert {c.status for c in checks[1:]} == {"ok"}  # its files are still the bytes recorded
    (index / "manifest.json").write_text("{}")
    [check] = verify(index)
    assert check.status == "invalid" and 'no "matcher", "images" or "captions"' in check.detail
    root = small_store(tmp_path / "s", ("dev", "test"))
    with pf.edited_json(root / "dev" / "manifest.json") as m:
        del m["vocab"]
    got = {(c.path.parent.name, c.path.name): c for c in verify(root)}
    assert got[("dev", "manifest.json")].status == "invalid"
    assert 'field "vocab.sha256" is missing' in got[("dev", "manifest.json")].detail
    r = run("verify", root)
    clean_error(
        r,
        "1 invalid of 6 listed: files that differ from what their manifests record or are not there, or manifests heiindex cannot read",
    )


def test_a_manifest_whose_counts_or_shapes_are_not_its_files_is_invalid(pipe, tmp_path):
    """A manifest has no checksum: an edited count or feature shape passed verify ("ok", exit 0),
    and every command then refused the store or index (the files' footers disagree)."""
    from heiindex.store import SplitStore

    root = small_store(tmp_path / "s", ("test",))
    with pf.edited_json(root / "test" / "manifest.json") as m:
        m["captions"]["count"] = 34
        m["images"]["regions"] = 37
    got = {(c.path.parent.name, c.path.name): c for c in verify(root)}
    check = got[("test", "manifest.json")]
    assert (check.status, check.detail) == (
        "invalid",
        "images.regions 37 x images.feature_dim 8 make 296 numbers an image in features, but images.parquet holds "
        "288; images.regions 37, but images.parquet records regions 36; captions.count 34, but captions.parquet "
        "holds 35 rows (the commands refuse it)",
    )
    assert got[("test", "images.parquet")].status == got[("test", "captions.parquet")].status == "ok"
    with pytest.raises(DataError, match="holds 35 captions; the manifest's captions.count says 34"):
        SplitStore.open(root, "test").captions()  # what a command says
    index = tmp_path / "index"
    shutil.copytree(pipe.index_dir, index)
    with pf.edited_json(index / "manifest.json") as m:
        m["n_images"] -= 1
    [check] = [c for c in verify(index) if c.failed]
    assert check.path.name == "manifest.json" and check.detail.startswith(
        f"n_images {pipe.n_test_images - 1}, but image_features.parquet holds {pipe.n_test_images} rows"
    )
    assert run("verify", index).exit_code == 2
    # a shape changed with the same product (regions halved, embed_size doubled) passed: the Gram
    # column and the footer's own shape tell it
    with pf.edited_json(index / "manifest.json") as m:
        m["n_images"] += 1
        regions, d = m["regions"], m["embed_size"]
        m["regions"], m["embed_size"] = regions // 2, d * 2
    [check] = [c for c in verify(index) if c.failed]
    assert check.detail == (
        f"regions {regions // 2} x regions {regions // 2} make {(regions // 2) ** 2} numbers an image in gram, but "
        f"image_features.parquet holds {regions**2}; regions {regions // 2}, but image_features.parquet records "
        f"regions {regions}; embed_size {2 * d}, but image_features.parquet records feature_dim {d} (the commands "
        "refuse it)"
    )
    _flip_a_byte(index / "image_features.parquet")  # a changed file is named, the footers are not read
    assert {c.path.name: c.status for c in verify(index)} == {
        "image_features.parquet": "changed",
        "caption_features.parquet": "ok",
        "captions.faiss": "ok",
        "images.faiss": "ok",
    }


def test_a_folder_of_indexes_is_not_a_store_root(pipe, tmp_path):
    """A folder holding only indexes (data/coco-sim/index: test/ and LAST) was taken for a store root."""
    shutil.copytree(pipe.index_dir, tmp_path / "indexes" / "test")
    (tmp_path / "indexes" / "LAST").write_text("x")
    with pytest.raises(DataError, match="no manifest.json here: not a store, a store split, an index, a model"):
        verify(tmp_path / "indexes")


def test_a_store_root_that_lost_its_vocabulary_is_still_verified(tmp_path):
    """It was "no manifest.json here: not a store", where verifying one of its splits said what was missing."""
    root = small_store(tmp_path, ("dev", "test"))
    (root / "vocab.json").unlink()
    checks = verify(root)
    assert [(c.path.name, c.status) for c in checks][-1] == ("vocab.json", "missing")
    assert {c.status for c in checks[:-1]} == {"ok"} and len(checks) == 5


def test_an_unreadable_manifest_is_listed_invalid_and_the_rest_still_checked(pipe, tmp_path):
    """A split's or a shard's manifest that is not JSON, and a vocab.json that does not load, were
    one error ("not valid JSON") and nothing else checked; the README promises an "invalid" row
    and the other splits or shards checked."""
    root = small_store(tmp_path / "s", ("dev", "test"))
    (root / "dev" / "manifest.json").write_text("garbage")
    got = {(c.path.parent.name, c.path.name): c for c in verify(root)}
    assert (
        got[("dev", "manifest.json")].status == "invalid" and "not valid JSON" in got[("dev", "manifest.json")].detail
    )
    assert got[("test", "images.parquet")].status == "ok" and got[(root.name, "vocab.json")].status == "ok"
    with pf.edited_json(root / "vocab.json") as v:
        v["word2idx"] = "not an object"
    got = {(c.path.parent.name, c.path.name): c for c in verify(root)}
    assert got[(root.name, "vocab.json")].status == "invalid" and "word2idx" in got[(root.name, "vocab.json")].detail
    [only] = verify(root / "dev")  # the split itself: one row, not an error
    assert (only.path, only.status) == (root / "dev" / "manifest.json", "invalid")

    sharded = tmp_path / "sharded"
    ok(build(pipe, sharded, "--shards", "2"))
    (sharded / "shard-000" / "manifest.json").write_text("garbage")
    checks = verify(sharded)
    bad = [c for c in checks if c.status != "ok"]
    assert [(c.path, c.status) for c in bad] == [(sharded / "shard-000" / "manifest.json", "invalid")]
    assert any(c.path.parent.name == "shard-001" and c.status == "ok" for c in checks)
    with pf.edited_json(sharded / "shard-001" / "manifest.json") as m:  # parses, but is no index's
        del m["matcher"]
    rows = [c for c in verify(sharded) if c.path.parent.name == "shard-001" and c.status == "invalid"]
    assert len(rows) == 1  # its own reason once, not also "is not the shard the build records"
    clean_error(run("verify", sharded), "2 invalid of")


def test_a_small_leftover_is_sized_in_bytes(tmp_path):
    from heiindex.verify import _leftover_detail

    (tmp_path / "f").write_bytes(b"x" * 5000)
    assert "(5,000 bytes)" in _leftover_detail(tmp_path / "f")
    (tmp_path / "g").write_bytes(b"x" * 2_500_000)
    assert "(2.5 MB)" in _leftover_detail(tmp_path / "g")


def test_a_model_a_hash_module_and_a_training_run_are_checked_against_their_config(pipe, tmp_path):
    """verify refused model and hash module folders ("loading checks them"), so it could not list
    what an interrupted run left beside one, nor check a copied model without loading it."""
    checks = verify(pipe.model_dir)
    assert [(c.path.name, c.status) for c in checks] == [
        ("config.json", "ok"),
        ("model.safetensors", "ok"),
        ("vocab.json", "ok"),
    ]
    assert checks[0].detail == "a matcher's config" and checks[1].detail == "checksum as config.json records"
    assert [(c.path.name, c.status) for c in verify(pipe.hash_dir)] == [
        ("config.json", "ok"),
        ("hash.safetensors", "ok"),
    ]
    run_checks = verify(pipe.run_dir)  # a `train` run: best/ and last/
    assert [(c.path.parent.name, c.path.name, c.status) for c in run_checks] == [
        (folder, name, "ok")
        for folder in ("best", "last")
        for name in ("config.json", "model.safetensors", "vocab.json")
    ]
    assert failures(run_checks) is None

    model, hasher = tmp_path / "model", tmp_path / "hash"
    shutil.copytree(pipe.model_dir, model)
    shutil.copytree(pipe.hash_dir, hasher)
    pf.swap_words(model / "vocab.json")  # the same size, another mapping
    [vocab] = [c for c in verify(model) if c.path.name == "vocab.json"]
    assert vocab.status == "changed" and vocab.detail.startswith("checksum ") and "config.json records" in vocab.detail
    assert failures(verify(model)).startswith("1 changed of 3 listed")
    (model / "model.safetensors").unlink()
    assert [(c.path.name, c.status) for c in verify(model)][1] == ("model.safetensors", "missing")
    _flip_a_byte(hasher / "hash.safetensors")
    assert verify(hasher)[1].status in ("changed", "invalid")  # a float changed, or made NaN, or the header
    with pf.edited_json(hasher / "config.json") as cfg:
        cfg["hash"]["bits"] = 12
    [check] = verify(hasher)
    assert (check.path.name, check.status) == ("config.json", "invalid") and "not a valid hash config" in check.detail
    shutil.copy(pipe.hash_dir / "hash.safetensors", hasher / "hash.safetensors")
    with pf.edited_json(hasher / "config.json") as cfg:
        cfg["hash"]["bits"] = json.loads((pipe.hash_dir / "config.json").read_text())["hash"]["bits"]
        del cfg["info"]["weights_sha256"]  # a hash folder written before its checksum was recorded
    checks = verify(hasher)
    assert [(c.path.name, c.status) for c in checks] == [("config.json", "ok"), ("hash.safetensors", "unrecorded")]
    assert failures(checks) is None


def test_what_a_killed_model_write_left_is_listed_beside_the_folder(pipe, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(pipe.model_dir, model)
    (tmp_path / f".model.partial-host-1-{pf.dead_pid()}-abcd").mkdir()
    checks = verify(model)
    assert [c.status for c in checks] == ["ok", "ok", "ok", "leftover"]
    assert checks[-1].path.name.startswith(".model.partial-host-1-")
    out = ok(run("verify", str(model), "--json"))
    assert [f["status"] for f in as_json(out)["files"]] == ["ok", "ok", "ok", "leftover"]


def test_a_shard_built_with_other_models_than_its_build_is_invalid(pipe, tmp_path):
    """Opening a sharded build refuses a shard whose manifest records another matcher, hash module
    or store data than the build's (check_shards); verify passed it."""
    sharded = tmp_path / "sharded"
    ok(build(pipe, sharded, "--shards", "2"))
    shard = sharded / "shard-001" / "manifest.json"
    saved = shard.read_bytes()
    for part, key, edit, said in (
        ("hash", "sha256", "0" * 64, "was built with hash 000000000000, not the build's"),
        ("matcher", "sha256", "0" * 64, "was built with matcher 000000000000, not the build's"),
        # each shard reads the split again: one ingested again during the build held other data
        ("store", "checksum", "1" * 64, "was built from store data 111111111111, not the build's"),
    ):
        shard.write_bytes(saved)
        with pf.edited_json(shard) as m:
            m[part][key] = edit
        [bad] = [c for c in verify(sharded) if c.status != "ok"]
        assert (bad.path, bad.status) == (shard, "invalid")
        assert bad.detail.startswith(said), bad.detail


def test_a_write_under_way_is_not_called_interrupted(tmp_path):
    """A live build's scratch folder was reported as left by an interrupted run, and verify said
    to delete it: a reviewer who did killed the build."""
    import os

    from heiindex.atomic import interrupted_hint, scratch

    target = tmp_path / "index"
    made = scratch(target)  # as a build of this process names it: running
    assert interrupted_hint(target) == (
        f" (process {os.getpid()} on this machine is writing it now, into {made.name}: try again when it is done)"
    )
    missing, left = verify(target)
    assert (missing.status, missing.detail) == (
        "missing",
        f"no such folder yet: process {os.getpid()} on this machine is writing it (below)",
    )
    assert left.status == "leftover" and "still running" in left.detail and "delete" not in left.detail


def test_a_rebuild_swapped_in_while_verify_reads_is_checked_again(pipe, tmp_path, monkeypatch):
    """verify read the manifest of one build and files of the next, and reported them "changed"
    (3 of 229 runs during rebuilds, in a review): where the manifest changed meanwhile it checks
    the folder again."""
    import heiindex.verify

    # the manifest is read when the first file is hashed
    target, swaps = pf.rebuilt_on_first_call(monkeypatch, heiindex.verify, "file_sha256", pipe, tmp_path)
    checks = verify(target)
    assert swaps == [1] and {c.status for c in checks} == {"ok"}


def test_verify_of_a_split_whose_manifest_cannot_be_read_says_so(tmp_path, monkeypatch):
    """With the manifest unreadable (permissions), verify said "changed while it was read, 3
    times: another command is rebuilding it": its digest was None before and after each read."""
    from pathlib import Path

    root = small_store(tmp_path)
    manifest = root / "test" / "manifest.json"
    real = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self == manifest:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    real_open = open

    def no_open(file, *args, **kwargs):
        if Path(file) == manifest:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    monkeypatch.setattr("builtins.open", no_open)
    [bad] = [c for c in verify(root / "test") if c.status != "ok"]
    assert (bad.path, bad.status) == (manifest, "invalid") and "Permission denied" in bad.detail
