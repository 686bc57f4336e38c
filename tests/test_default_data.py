"""The bundled coco-sim test split: real captions, simulated features, through the real ingest path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pyarrow.parquet as pq
import pytest

from heiindex import default_data as dd
from heiindex.default_data import data_dir, default_hash_dir, default_model_dir
from heiindex.errors import DataError, HeiindexError, LastBuiltWarning
from heiindex.ingest import ingest
from heiindex.precomp import read_captions
from heiindex.simulate import SimConfig, simulate_images

CAPTIONS = Path(__file__).resolve().parent.parent / "data" / "coco-captions"


def _make_test_split(root: Path) -> dict:
    lines = read_captions(CAPTIONS / "testall_caps.txt")[:5000]  # the first 1,000 images: COCO 1K fold 1
    pre = root / "precomp"
    pre.mkdir(parents=True)
    (pre / "test_caps.txt").write_text("\n".join(lines) + "\n")
    simulate_images(lines, pre / "test_ims.npy", SimConfig())
    ingest(pre, "test", root / "store", vocab=CAPTIONS / "coco_precomp_vocab.json")
    return json.loads((root / "store" / "test" / "manifest.json").read_text())


def test_coco_sim_test_split_is_1000_images_5000_captions_and_reproducible(tmp_path):
    a = _make_test_split(tmp_path / "a")
    b = _make_test_split(tmp_path / "b")
    assert a["images"]["count"] == 1000 and a["captions"]["count"] == 5000
    assert (a["images"]["regions"], a["images"]["feature_dim"]) == (36, 2048)
    assert pq.read_metadata(tmp_path / "a" / "store" / "test" / "images.parquet").num_rows == 1000
    assert pq.read_metadata(tmp_path / "a" / "store" / "test" / "captions.parquet").num_rows == 5000
    for part in ("images", "captions"):
        assert a[part]["sha256"] == b[part]["sha256"]
    for name in ("images.parquet", "captions.parquet"):
        assert a["files"][name]["sha256"] == b["files"][name]["sha256"]


def test_default_paths_point_into_the_repository():
    assert (data_dir() / "coco-captions" / "testall_caps.txt").exists()
    assert (default_model_dir() / "model.safetensors").exists()
    assert (default_hash_dir() / "hash.safetensors").exists()


def test_committed_hash_module_records_the_train_hash_defaults():
    """data/models/hash-coco-sim records the library's (and so the CLI's, tests/test_cli.py) hash
    and training defaults and the committed matcher: `heiindex train-hash --out DIR` trains with
    the same settings (its weights are not checked: that takes a 10-minute training run)."""
    from heiindex.checkpoint import load_model
    from heiindex.hashing import HashConfig
    from heiindex.train_hash import HashTrainConfig

    cfg = json.loads((default_hash_dir() / "config.json").read_text())
    matcher = load_model(default_model_dir())
    assert cfg["info"]["matcher_sha256"] == matcher.checksum
    assert cfg["hash"] == HashConfig(embed_size=matcher.model.config.embed_size).to_dict()
    assert cfg["info"]["train"] == HashTrainConfig().resolved(1000).to_dict()  # coco-sim dev: 1,000 images


def test_a_damaged_coco_sim_stamp_means_regenerate(tmp_path):
    """A corrupt VERSION.json was "Error: Expecting property name ..." naming no file. _stamp now
    reads it as None, which never equals what ensure_coco_sim wants, so the data is regenerated
    (the regeneration itself: test_coco_sim_regenerates_after_a_change_of_feature_size)."""
    from heiindex.default_data import _stamp

    stamp = tmp_path / "VERSION.json"
    assert _stamp(stamp) is None
    stamp.write_text("{oops")
    assert _stamp(stamp) is None
    stamp.write_text('{"sim_version": 3}')
    assert _stamp(stamp) == {"sim_version": 3}


def test_coco_sim_regenerates_after_a_change_of_feature_size(tmp_path, monkeypatch):
    """Regenerating with another feature size re-ingests every split; the old splits must not
    block it (ingest refuses a store root that mixes shapes)."""
    from heiindex.default_data import ensure_coco_sim
    from heiindex.store import SplitStore

    (tmp_path / "coco-captions").symlink_to(CAPTIONS)
    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path))
    small = SimConfig(regions=2, feature_dim=8, clutter_regions=0, background_regions=0)
    store = ensure_coco_sim(small, log=lambda *_: None)
    assert SplitStore.open(store, "train").feature_dim == 8
    store = ensure_coco_sim(
        SimConfig(regions=2, feature_dim=4, clutter_regions=0, background_regions=0), log=lambda *_: None
    )
    assert {SplitStore.open(store, s).feature_dim for s in ("train", "dev", "test")} == {4}


def test_the_last_build_marker_naming_a_removed_index_is_said(tmp_path, monkeypatch):
    """The marker kept pointing at a removed --out, and plain `heiindex query` then said "no index
    here; run heiindex build first" though the default index was there."""
    monkeypatch.setattr(dd, "coco_sim_dir", lambda: tmp_path)
    assert dd.last_built_index() == dd.default_index_dir("test")  # no marker: the default
    (tmp_path / "index").mkdir()
    dd.mark_last_built(tmp_path / "mine")
    gone = f"the last build on the default data wrote {tmp_path / 'mine'}, which is gone: give an index's folder"
    with pytest.raises(HeiindexError, match=f"{gone}, or build again$"):
        dd.last_built_index()
    default = dd.default_index_dir("test")  # the default place holds an index: named as one to give
    default.mkdir()
    (default / "manifest.json").write_text("{}")
    with pytest.raises(HeiindexError, match=rf"{gone} \(the default one, {default}, is there\), or build again$"):
        dd.last_built_index()
    set_aside = tmp_path / ".mine.old-somehost-4026531836-12345-abcd"  # a replace killed between its renames
    set_aside.mkdir()
    with pytest.raises(
        HeiindexError,
        match=re.escape(
            f"{tmp_path / 'mine'}, which is gone (a run replacing it was interrupted between two renames: the previous mine is {set_aside.name}, beside it; rename it back to mine): give"
        ),
    ):
        dd.last_built_index()
    set_aside.rename(tmp_path / "mine")
    assert dd.last_built_index() == tmp_path / "mine"
    marker = tmp_path / "index" / "LAST"
    for damaged in (b"", b"\n", b"\xff\xfe"):  # "" was the current folder; bad bytes a codec error naming no file
        marker.write_bytes(damaged)
        with pytest.raises(DataError, match="should name the index the last build on the default data wrote") as e:
            dd.last_built_index()
        assert e.value.path == marker


def test_the_marker_is_written_where_no_index_folder_is_yet(tmp_path, monkeypatch):
    """A fresh checkout's first build with --out wrote its index, then failed with exit 2 on the
    marker's scratch file (data/coco-sim/index/ did not exist); a read-only one the same way."""
    monkeypatch.setattr(dd, "coco_sim_dir", lambda: tmp_path / "coco-sim")
    (tmp_path / "mine").mkdir()
    dd.mark_last_built(tmp_path / "mine")
    assert dd.last_built_index() == tmp_path / "mine"
    monkeypatch.setattr(dd, "coco_sim_dir", lambda: tmp_path / "file" / "coco-sim")
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(LastBuiltWarning, match=f"{tmp_path / 'mine'} is built, but .* could not record it"):
        dd.mark_last_built(tmp_path / "mine")


def test_HEIINDEX_DATA_names_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_a_default_model_missing_under_HEIINDEX_DATA_names_the_variable(tmp_path, monkeypatch):
    """It said only 'no model config here' of a folder the variable had chosen."""
    from cli_helpers import clean_error, run

    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path / "empty"))
    r = run("evaluate", "--store", tmp_path / "no-store")
    clean_error(
        r,
        f"{tmp_path / 'empty' / 'models' / 'scan-coco-sim' / 'config.json'}: no model config here; is this a "
        f"heiindex model folder? (HEIINDEX_DATA={tmp_path / 'empty'} names the folder where the default models "
        "and data are looked for, which does not exist)",
    )
    for elsewhere in (tmp_path / "model", tmp_path / "empty" / "mine"):  # outside models/ and coco-sim/
        r = run("evaluate", "--model", elsewhere, "--store", tmp_path / "no-store")
        clean_error(r, f"{elsewhere / 'config.json'}: no model config here; is this a heiindex model folder?")
        assert "HEIINDEX_DATA" not in r.output


def test_the_default_captions_and_index_missing_under_HEIINDEX_DATA_name_the_variable(tmp_path, monkeypatch):
    """prepare (the caption file) and query (the default index) did not say the variable chose
    the folder, nor, where it named a file, that it did."""
    from cli_helpers import clean_error, run

    hint = "names the folder where the default models and data are looked for"
    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    r = run("prepare")
    captions = tmp_path / "empty" / "coco-captions" / "testall_caps.txt"
    assert (
        r.exit_code == 2
        and f"{captions}: caption file not found (HEIINDEX_DATA={tmp_path / 'empty'} {hint})" in r.output
    )
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path / "afile"))
    r = run("query", "a dog")
    clean_error(
        r,
        f"{tmp_path / 'afile' / 'coco-sim' / 'index' / 'test'}: no such folder (HEIINDEX_DATA={tmp_path / 'afile'} "
        f"{hint}, but it is a file); give a folder `heiindex build` wrote, or build it",
    )


def test_the_last_build_marker_holds_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel" / "idx").mkdir(parents=True)
    (tmp_path / "data" / "coco-sim" / "index").mkdir(parents=True)
    dd.mark_last_built(Path("rel/idx"))
    monkeypatch.chdir("/")
    assert dd.last_built_index() == tmp_path / "rel" / "idx"


def test_a_missing_split_is_generated_again_despite_the_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("HEIINDEX_DATA", str(tmp_path))
    calls = []

    def fake_ingest(pre, split, store, **kw):
        calls.append(split)
        (Path(store) / split).mkdir(parents=True, exist_ok=True)
        (Path(store) / split / "manifest.json").write_text("{}")
        return SimpleNamespace(line=lambda: split)

    monkeypatch.setattr(dd, "write_coco_sim_precomp", lambda *a: calls.append("precomp"))
    monkeypatch.setattr(dd, "ingest", fake_ingest)
    dd.ensure_coco_sim(SimConfig(), log=pf.quiet)
    assert calls == ["precomp", "train", "dev", "test"]
    calls.clear()
    dd.ensure_coco_sim(SimConfig(), log=pf.quiet)
    assert calls == []  # stamped and whole: nothing done
    shutil.rmtree(tmp_path / "coco-sim" / "store" / "dev")
    dd.ensure_coco_sim(SimConfig(), log=pf.quiet)
    assert calls == ["precomp", "train", "dev", "test"]


def test_the_stamp_follows_the_simulators_version(monkeypatch):
    """default_data had its own SIM_VERSION beside simulate.SIMULATOR_VERSION: bumping the
    simulator's alone would have reused the old cached features."""
    from heiindex import default_data, simulate

    before = default_data.wanted_stamp(simulate.SimConfig())
    monkeypatch.setattr(simulate, "SIMULATOR_VERSION", simulate.SIMULATOR_VERSION + 1)
    after = default_data.wanted_stamp(simulate.SimConfig())
    assert after["sim_version"] == before["sim_version"] + 1 and after["config"] == before["config"]
