"""One message, two namings: the library names a setting by its Python parameter (`nlist` 12,
``heiindex.errors``), the command line by its flag (--nlist 12), and only where the library
marks it as a setting: an ordinary word that is also a setting's name stays as it is."""

from __future__ import annotations

import pickle
import re
import warnings

import click
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from cli_helpers import build, clean_error, ok, run
from click.testing import CliRunner

import heiindex.evaluation
from cli.main import handle_errors
from heiindex.errors import DataError, HeiindexError, HeiindexWarning, UnusedSettingWarning
from heiindex.settings import SettingError


def _say(problem: Exception | Warning):
    """A command with flags for a few settings (``--model`` setting ``model_dir``) that raises or
    warns ``problem``: what the user reads."""

    @click.command()
    @click.option("--candidates", type=int)
    @click.option("--k", type=int)
    @click.option("--vocab")
    @click.option("--codes")
    @click.option("--resume", is_flag=True)
    @click.option("--model", "model_dir")
    @click.option("--protocol")
    @handle_errors
    def command(**_):
        if isinstance(problem, Warning):
            warnings.warn(problem, stacklevel=1)
        else:
            raise problem

    return CliRunner().invoke(command, [])


def test_a_setting_is_flagged_where_it_is_marked_and_nowhere_else():
    """The settings an error names were named by their flags by a whole-word replace, which also
    flagged ordinary words: "the 12 --candidates", "--vocab.json", "Milvus --codes", "--resume=True"."""
    r = _say(
        HeiindexError(
            "k 13 is larger than the 12 candidates the shards return together; `candidates` 4 from each: "
            "vocab.json's words, Milvus codes (resume=True); give `vocab`",
            settings=("k", "candidates", "vocab", "codes", "resume"),
        )
    )
    assert r.exit_code == 2
    assert r.output == (
        "Error: --k 13 is larger than the 12 candidates the shards return together; --candidates 4 from each: "
        "vocab.json's words, Milvus codes (resume=True); give --vocab\n"
    )
    # a setting out of range as before: its name first, the others where marked
    r = _say(SettingError("k", "k 13 exceeds the 12 candidates of vocab.json", also=("candidates", "vocab")))
    assert r.output == "Error: --k 13 exceeds the 12 candidates of vocab.json\n"
    # the first word only where it is the name, followed by a space
    r = _say(HeiindexError("vocab.json is missing; candidates: give `vocab`", settings=("vocab", "candidates")))
    assert r.output == "Error: vocab.json is missing; candidates: give --vocab\n"


def test_the_librarys_names_for_a_commands_parameters_are_flagged_where_the_command_has_them():
    """``matcher`` is set by --model (the command's ``model_dir``), ``protocols`` by --protocol; a
    setting the command has no flag for (``hasher`` here) keeps the library's name, unquoted (a
    review found bench printing `codes` milvus: it has no --codes)."""
    r = _say(
        DataError(
            "/x/manifest.json",
            "give the matcher folder as `matcher` and the hash module folder as `hasher`; `protocols` full",
            settings=("matcher", "hasher", "protocols"),
        )
    )
    assert r.output == (
        "Error: /x/manifest.json: give the matcher folder as --model and the hash module folder as hasher; "
        "--protocol full\n"
    )


def test_warnings_name_their_settings_as_errors_do():
    r = _say(UnusedSettingWarning("`k` 3 and `vocab` x not used: the candidates", settings=("k", "vocab")))
    assert r.exit_code == 0 and r.output == "Warning: --k 3 and --vocab x not used: the candidates\n"
    r = _say(HeiindexWarning("the 12 candidates of vocab.json; `candidates` 3 avoids it", settings=("candidates",)))
    assert r.output == "Warning: the 12 candidates of vocab.json; --candidates 3 avoids it\n"


def test_errors_keep_their_settings_when_pickled():
    """A Ray actor's refusal reaches the driver pickled: its settings too, or the CLI could not
    name them by their flags."""
    for err in (
        HeiindexError("k 3 is larger than `candidates` 2", settings=("k", "candidates")),
        DataError("/x/vocab.json", "give `vocab`", settings=("vocab",)),
        SettingError("nprobe", "nprobe 3 exceeds `nlist` 2", also=("nlist",)),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.settings == err.settings


# -- the library's messages, each as Python and as the command line says it --------------------


def test_a_k_no_candidates_can_hold(pipe):
    from heiindex.search import default_counts

    with pytest.raises(HeiindexError, match=r"^k 25 is larger than the 24 images in this index$"):
        default_counts(None, 25, [24], "images")
    clean_error(
        run("query", "a dog", "--index", pipe.index_dir, "--k", "25"),
        "Error: --k 25 is larger than the 24 images in this index",
    )


def test_codes_and_uri_an_index_was_not_built_for(pipe):
    from heiindex.index import Index

    path = pipe.index_dir
    with pytest.raises(HeiindexError, match=r"was built without Milvus codes \(build with `codes` milvus\)$"):
        Index.open(path, codes="milvus")
    clean_error(run("query", "a dog", "--index", path, "--codes", "milvus"), "(build with --codes milvus)")
    with pytest.raises(HeiindexError, match=r"^uri names a Milvus server, but the codes of "):
        Index.open(path, uri="http://127.0.0.1:1")
    clean_error(
        run("query", "a dog", "--index", path, "--uri", "http://127.0.0.1:1"), "Error: --uri names a Milvus server"
    )


def test_shards_and_nlist_beyond_the_images(pipe, tmp_path):
    from heiindex.index_write import check_lists_filled
    from heiindex.shards import shard_bounds

    with pytest.raises(HeiindexError, match=r"^shards must lie in \[1, 24\]"):
        shard_bounds(24, 25)
    clean_error(build(pipe, tmp_path / "s", "--shards", "25"), "Error: --shards must lie in [1, 24]")
    with pytest.raises(HeiindexError, match=r"^nlist 9 exceeds .*; `nlist` applies to each shard\)$"):
        check_lists_filled("ivf", 9, None, {"images": 8}, (0, 8))
    with pytest.raises(HeiindexError, match=r"needs some \(`index_type` flat, or fewer shards\)$"):
        check_lists_filled("ivf", None, None, {"captions": 0}, (0, 8))
    r = build(pipe, tmp_path / "s", "--shards", "3", "--index", "ivf", "--nlist", "9")
    clean_error(r, "Error: --nlist 9 exceeds the 8 images to index in its shard (image rows 0 to 7; --nlist applies")
    assert not (tmp_path / "s").exists()


def test_the_sparse_lists_warning_names_what_avoids_it(pipe, tmp_path, monkeypatch):
    import numpy as np

    from heiindex.errors import SparseListsWarning
    from heiindex.hamming import make_binary_index

    codes = np.random.default_rng(0).integers(0, 256, (60, 4), dtype=np.uint8)
    with pytest.warns(SparseListsWarning, match=r"to\. `nlist` 1, or `index_type` flat, avoids it$"):
        make_binary_index(codes, "ivf", nlist=2)
    r = ok(build(pipe, tmp_path / "ivf", "--index", "ivf", "--nlist", "3"))
    assert "they need to. --index flat avoids it\n" in r.output  # 24 images: not one list of 39
    # an --nprobe above the default lists (sqrt of 24 images: 5; of 120 captions: 11) was lowered
    # without a word; said once per modality, before the encoding (not once per shard after it)
    r = ok(build(pipe, tmp_path / "ivf2", "--index", "ivf", "--nprobe", "6"))
    said = (
        "Warning: --nprobe 6 exceeds the 5 lists (--nlist left to its default) of the IVF index of the 24 images: "
        "it probes all its lists, so every code is searched (a query's --nprobe above them is refused)\n"
    )
    assert said in r.output and r.output.count("--nprobe 6 exceeds") == 1
    import heiindex.index_write
    from heiindex.index import Index

    with monkeypatch.context() as m:  # said before the encoding: it came after, from make_binary_index
        pf.forbid(m, "encoding began", (heiindex.index_write, "ImageWriter"))
        with pytest.warns(UnusedSettingWarning, match="^`nprobe` 6 exceeds"), pytest.raises(pytest.fail.Exception):
            Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "ivf5", index_type="ivf", nprobe=6)
    r = ok(build(pipe, tmp_path / "ivf3", "--index", "ivf", "--nprobe", "4", "--shards", "2"))
    assert (
        r.output.count("Warning: --nprobe 4 exceeds the 3 lists (--nlist left to its default) of the IVF indexes of ")
        == 1
    )
    assert "the images of each shard: each probes all its lists, so every code is searched" in r.output
    r = ok(build(pipe, tmp_path / "ivf4", "--index", "ivf", "--nprobe", "11"))
    assert "of the IVF index of the 120 captions: it probes all its lists" not in r.output  # 11 lists: not above
    assert "exceeds the 5 lists (--nlist left to its default) of the IVF index of the 24 images" in r.output


def test_the_vocabulary_given_or_not_and_the_store_root(make_precomp, tmp_path):
    """vocab.json is a word, not the setting vocab: "--vocab.json" was the whole-word replace's."""
    from heiindex.errors import VocabularyWarning
    from heiindex.ingest import ingest
    from heiindex.vocab import Vocab

    dev, _, _ = make_precomp("d", split="dev", n_images=7)
    test, _, test_caps = make_precomp("t", split="test", n_images=7, first_line=35)
    out = tmp_path / "O"
    with pytest.warns(VocabularyWarning, match=r"SCAN builds it from train's: ingest train first, or give `vocab`$"):
        ingest(dev, "dev", out, feature_dim=8)
    r = ok(run("ingest", "--precomp", dev, "--split", "dev", "--out", tmp_path / "C", "--feature-dim", "8"))
    assert "SCAN builds it from train's: ingest train first, or give --vocab\n" in r.output
    other = tmp_path / "other.json"
    Vocab.build(test_caps).save(other)
    reuse = "this store root already uses another vocabulary; ingest into a new {} folder or pass no {} to reuse"
    with pytest.raises(DataError, match=reuse.format("`out_root`", "`vocab`")):
        ingest(test, "test", out, vocab=other, feature_dim=8)
    r = run("ingest", "--precomp", test, "--split", "test", "--out", out, "--feature-dim", "8", "--vocab", other)
    clean_error(r, reuse.format("--out", "--vocab"))
    (out / "vocab.json").unlink()  # dev records its vocabulary: the one to pass
    missing = "pass that vocabulary (the model's vocab.json) as {}, or ingest into a new {} folder"
    with pytest.raises(DataError, match=re.escape(missing.format("`vocab`", "`out_root`"))):
        ingest(test, "test", out, feature_dim=8)
    r = run("ingest", "--precomp", test, "--split", "test", "--out", out, "--feature-dim", "8")
    clean_error(r, missing.format("--vocab", "--out"))
    with pytest.raises(DataError, match=r"vocabulary .*, not the `vocab` given \("):
        ingest(test, "test", out, vocab=other, feature_dim=8)
    r = run("ingest", "--precomp", test, "--split", "test", "--out", out, "--feature-dim", "8", "--vocab", other)
    clean_error(r, ", not the --vocab given (")
    assert not (out / "test").exists()
    split = "so it is a store split or an index, not a store root; {} names the folder that holds a store's splits"
    with pytest.raises(DataError, match=re.escape(split.format("`out_root`"))):
        ingest(test, "test", out / "dev", feature_dim=8)
    r = run("ingest", "--precomp", test, "--split", "test", "--out", out / "dev", "--feature-dim", "8")
    clean_error(r, split.format("--out"))


def test_the_bench_protocols_named_as_run_bench_and_bench_name_them(pipe, monkeypatch):
    import heiindex.bench as bench
    from heiindex.index import Index

    index = Index.open(pipe.index_dir)
    with pytest.raises(SettingError, match=r"^COCO 1K \(`protocols` 1k\) needs whole folds of 1000 images"):
        bench.run_bench(index, topk=5, protocols="1k")
    r = run("bench", "--index", pipe.index_dir, "--topk", "5", "--protocol", "1k")
    clean_error(r, "Error: COCO 1K (--protocol 1k) needs whole folds of 1000 images; this split has 24")
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    why = "for this index (a COCO 1K fold's size; {} full benches only the whole split)"
    with pytest.raises(SettingError, match=r"^topk 13 must lie in \[1, 12\] " + re.escape(why.format("`protocols`"))):
        bench.run_bench(index, topk=13, protocols="1k")
    r = run("bench", "--index", pipe.index_dir, "--topk", "13", "--protocol", "1k")
    clean_error(r, "Error: --topk 13 must lie in [1, 12] " + why.format("--protocol"))


def test_the_clis_choices_are_the_librarys():
    """The CLI lists its choices itself (it starts without importing torch or FAISS): they must not
    drift from the values the library accepts."""
    from heiindex_cli.main import cli

    from heiindex import attention, evaluation, hamming, hashing, index_manifest, milvus_codes, precomp

    def choices(command: str, option: str) -> tuple:
        (param,) = [p for p in cli.commands[command].params if p.name == option]
        return tuple(param.type.choices)

    assert choices("evaluate", "protocol") == choices("bench", "protocol") == evaluation.PROTOCOLS
    assert choices("ingest", "split") == precomp.SPLITS
    assert choices("train", "cross_attn") == attention.CROSS_ATTN
    assert choices("train", "agg") == attention.AGGREGATIONS
    assert choices("train-hash", "pooling") == hashing.POOLINGS
    assert choices("build", "index_type") == ("auto", *hamming.INDEX_TYPES) == index_manifest.INDEX_SPEC_TYPES
    assert choices("build", "milvus_index") == milvus_codes.MILVUS_INDEX_TYPES
    # --raw-feature-norm takes any text (the library names the values it refuses); its help lists them
    help_text = " ".join(cli.commands["train"].get_help(click.Context(cli.commands["train"])).split())
    assert all(norm in help_text for norm in attention.RAW_FEATURE_NORMS)


def test_running_out_of_memory_is_one_line_and_other_runtime_errors_stay_tracebacks():
    """A build of a store with a caption of 100,000 words died with torch's allocator's traceback
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 12000240000 bytes")."""
    torch_cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 12000240000 bytes. Error code 12 (Cannot allocate memory)"
    )
    r = _say(torch_cpu)
    assert r.exit_code == 2
    assert r.output == "Error: out of memory: a block of 12.0 GB was asked for and the system refused it\n"
    r = _say(MemoryError())
    assert (r.exit_code, r.output) == (2, "Error: out of memory: MemoryError\n")
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")
    assert _say(cuda).output == f"Error: out of memory: {cuda}\n"
    r = _say(RuntimeError("a bug"))  # not ours to dress up
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
