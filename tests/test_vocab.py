"""heiindex.vocab: SCAN's vocab JSON, building from captions, encoding, malformed files."""

from __future__ import annotations

import json

import pytest

from heiindex.errors import DataError
from heiindex.vocab import END, PAD, SPECIALS, START, UNK, Vocab


@pytest.fixture(scope="module")
def scan_vocab(scan_vocab_path) -> Vocab:
    return Vocab.load(scan_vocab_path)


# -- SCAN's file ------------------------------------------------------------------------------


def test_load_scan_vocab(scan_vocab):
    assert len(scan_vocab) == 11352
    assert scan_vocab.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (PAD, START, END, UNK) == SPECIALS == ("<pad>", "<start>", "<end>", "<unk>")
    w = scan_vocab.word2idx
    assert (w["<pad>"], w["<start>"], w["<end>"], w["<unk>"]) == (0, 1, 2, 3)
    assert (w["a"], w["restaurant"], w["."], w["dog"], w["'s"], w["n't"], w["moped"]) == (4, 5, 12, 484, 97, 2421, 5184)
    assert scan_vocab.words[11351] == max(w, key=w.get)


def test_save_load_round_trip_keeps_scan_format(scan_vocab, scan_vocab_path, tmp_path):
    out = tmp_path / "vocab.json"
    scan_vocab.save(out)
    assert not (tmp_path / "vocab.json.tmp").exists()
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(scan_vocab_path.read_text(encoding="utf-8"))
    again = Vocab.load(out)
    assert again == scan_vocab
    assert again.checksum == scan_vocab.checksum
    assert len(again.checksum) == 64


def test_save_load_round_trip_of_non_ascii_words(tmp_path):
    v = Vocab([*SPECIALS, "café", "naïve", "日本"])
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").words == [*SPECIALS, "café", "naïve", "日本"]


def test_checksum_depends_on_words_and_order():
    a = Vocab([*SPECIALS, "dog", "cat"])
    assert a.checksum == Vocab([*SPECIALS, "dog", "cat"]).checksum
    assert a.checksum != Vocab([*SPECIALS, "cat", "dog"]).checksum
    assert a != Vocab([*SPECIALS, "cat", "dog"])


def test_constructor_rejects_bad_word_lists():
    with pytest.raises(ValueError):
        Vocab(["<start>", "<pad>", "<end>", "<unk>", "a"])
    with pytest.raises(ValueError):
        Vocab([*SPECIALS, "a", "a"])


# -- building -----------------------------------------------------------------------------


def test_build_keeps_words_seen_at_least_four_times_specials_first():
    captions = ["A dog runs .", "a dog sits .", "The dog .", "a Dog and a cat", "cat cat cat"]
    v = Vocab.build(captions)
    # counts: a 4, dog 4, . 3, cat 4, the 1, runs 1, sits 1, and 1: kept in order of first appearance
    assert v.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat"]
    assert Vocab.build(captions, min_count=3).words == [*SPECIALS, "a", "dog", ".", "cat"]
    assert Vocab.build(captions, min_count=1).words == [
        *SPECIALS,
        "a",
        "dog",
        "runs",
        ".",
        "sits",
        "the",
        "and",
        "cat",
    ]


def test_build_never_repeats_a_special():
    v = Vocab.build(["<unk> <unk> <unk> <unk> x"] * 4)
    assert v.words[:4] == list(SPECIALS)
    assert len(set(v.words)) == len(v.words)


def test_build_from_real_captions(testall_lines):
    v = Vocab.build(testall_lines[:35])
    assert len(v) == 29
    assert v.words == [
        "<pad>",
        "<start>",
        "<end>",
        "<unk>",
        "a",
        "man",
        "with",
        "red",
        "on",
        ".",
        "riding",
        "bike",
        "the",
        "of",
        "to",
        "and",
        "in",
        "is",
        "girl",
        "out",
        "candle",
        "train",
        "kitchen",
        "are",
        "wooden",
        "table",
        "spoons",
        "bathroom",
        "shower",
    ]


# -- encoding -----------------------------------------------------------------------------


def test_encode_wraps_in_start_end(scan_vocab, testall_lines):
    enc = scan_vocab.encode(testall_lines[0])  # 'A man with a red helmet on a small moped on a dirt road .'
    assert enc.ids == [1, 4, 34, 15, 4, 60, 952, 19, 4, 43, 5184, 19, 4, 1230, 600, 12, 2]
    assert enc.tokens == [
        "a",
        "man",
        "with",
        "a",
        "red",
        "helmet",
        "on",
        "a",
        "small",
        "moped",
        "on",
        "a",
        "dirt",
        "road",
        ".",
    ]
    assert enc.unknown == []
    assert scan_vocab.decode(enc.ids) == ["<start>", *enc.tokens, "<end>"]


def test_encode_maps_unknown_words_to_unk_and_reports_them(scan_vocab):
    enc = scan_vocab.encode("A zorblax dog's bowl, zorblax")
    assert enc.ids == [1, 4, 3, 484, 97, 355, 75, 3, 2]  # dog 484, 's 97, bowl 355, "," 75
    assert enc.unknown == ["zorblax", "zorblax"]


def test_encode_real_line_with_unknown_word(scan_vocab, testall_lines):
    enc = scan_vocab.encode(testall_lines[3])
    assert enc.unknown == ["cloud-wreathed"]
    assert enc.ids[27] == 3
    assert enc.ids.count(3) == 1
    assert (enc.ids[0], enc.ids[-1], len(enc.ids)) == (1, 2, 31)


def test_encode_empty_text_is_start_end(scan_vocab):
    assert scan_vocab.encode("").ids == [1, 2]


# -- malformed files ----------------------------------------------------------------------


def _good() -> dict:
    words = [*SPECIALS, "a", "dog"]
    return {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": 6,
    }


def _json(data) -> bytes:
    return json.dumps(data).encode()


def _missing_word2idx():
    d = _good()
    del d["word2idx"]
    return _json(d)


def _gap():
    d = _good()
    d["word2idx"]["dog"] = 7
    d["idx2word"] = {str(i): w for w, i in d["word2idx"].items()}
    return _json(d)


def _repeat():
    d = _good()
    d["word2idx"]["dog"] = 4
    return _json(d)


def _wrong_specials():
    d = _good()
    d["word2idx"]["<unk>"], d["word2idx"]["a"] = 4, 3
    d["idx2word"] = {str(i): w for w, i in d["word2idx"].items()}
    return _json(d)


def _idx2word_disagrees():
    d = _good()
    d["idx2word"]["5"] = "cat"
    return _json(d)


def _idx2word_missing_entry():
    d = _good()
    del d["idx2word"]["4"]
    return _json(d)


def _idx_wrong():
    d = _good()
    d["idx"] = 7
    return _json(d)


def _non_int_id():
    d = _good()
    d["word2idx"]["dog"] = "5"
    return _json(d)


def _bool_id():
    d = _good()
    d["word2idx"]["dog"] = True
    return _json(d)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: b"{not json", "JSON"),
        (lambda: b"", "JSON"),
        (lambda: b'{"word2idx": {"\xff\xfe": 0}}', "UTF-8"),
        (lambda: _json([1, 2, 3]), "word2idx"),
        (_missing_word2idx, "word2idx"),
        (lambda: _json({"word2idx": ["<pad>"]}), "word2idx"),
        (_gap, 'field "word2idx"'),
        (_repeat, 'field "word2idx"'),
        (_wrong_specials, 'field "word2idx"'),
        (_idx2word_disagrees, 'field "idx2word"'),
        (_idx2word_missing_entry, 'field "idx2word"'),
        (lambda: _json({**_good(), "idx2word": ["<pad>"]}), 'field "idx2word"'),
        (_idx_wrong, 'field "idx"'),
        (_non_int_id, 'field "word2idx"'),
        (_bool_id, 'field "word2idx"'),
    ],
    ids=[
        "not_json",
        "empty_file",
        "not_utf8",
        "not_an_object",
        "missing_word2idx",
        "word2idx_not_object",
        "gap",
        "repeat",
        "wrong_specials",
        "idx2word_disagrees",
        "idx2word_missing_entry",
        "idx2word_not_object",
        "idx_wrong",
        "non_int_id",
        "bool_id",
    ],
)
def test_malformed_vocab_raises_data_error_naming_file_and_field(tmp_path, make, field):
    path = tmp_path / "bad_vocab.json"
    path.write_bytes(make())
    with pytest.raises(DataError) as info:
        Vocab.load(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("make", "detail"),
    [
        (_gap, "the ids of its 6 words must be 0 to 5, each once (missing: 5; out of range: 7)"),
        (_repeat, "the ids of its 6 words must be 0 to 5, each once (missing: 5; repeated: 4)"),
        (
            lambda: _json({"word2idx": {"a": 4}}),
            "the ids of its 1 word must be 0 to 0, each once (missing: 0; out of range: 4)",
        ),
    ],
    ids=["gap", "repeat", "one_word"],
)
def test_bad_word_ids_are_named(tmp_path, make, detail):
    """It said 'ids must be exactly 0..0 with no gaps or repeats' of a one-word vocabulary with id 4."""
    path = tmp_path / "bad_vocab.json"
    path.write_bytes(make())
    with pytest.raises(DataError) as info:
        Vocab.load(path)
    assert info.value.problem == f'field "word2idx": {detail}'


def test_good_fixture_loads(tmp_path):
    (tmp_path / "v.json").write_bytes(_json(_good()))
    assert Vocab.load(tmp_path / "v.json").words == [*SPECIALS, "a", "dog"]


def test_missing_vocab_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="vocab file not found") as info:
        Vocab.load(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(info.value)


def test_bool_ids_in_a_vocab_file_are_refused(tmp_path):
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"word2idx": {"<pad>": False, "<start>": True, "<end>": 2, "<unk>": 3}}))
    with pytest.raises(DataError, match="every value must be an integer id"):
        Vocab.load(p)


def test_vocab_checksum_tells_where_words_split():
    assert Vocab([*SPECIALS, "ab", "c"]).checksum != Vocab([*SPECIALS, "a", "bc"]).checksum


def test_saved_vocab_keeps_non_ascii_words_as_text(tmp_path):
    Vocab([*SPECIALS, "café"]).save(tmp_path / "v.json")
    assert '"café"' in (tmp_path / "v.json").read_text(encoding="utf-8")


def test_a_vocab_path_that_is_a_folder_is_named(tmp_path):
    """It escaped as a raw IsADirectoryError."""
    (tmp_path / "vocab.json").mkdir()
    with pytest.raises(DataError, match=r"vocab\.json: cannot be read \(Is a directory\)"):
        Vocab.load(tmp_path / "vocab.json")


def test_a_vocab_file_that_is_not_json_or_not_utf8_is_named_for_which(tmp_path):
    (tmp_path / "v.json").write_text("a dog\n")
    with pytest.raises(DataError, match=r"v\.json: not valid JSON \(Expecting value"):
        Vocab.load(tmp_path / "v.json")
    (tmp_path / "v.json").write_bytes(b'{"word2idx": "\xff"}')
    with pytest.raises(DataError, match=r"v\.json: not valid UTF-8 \(invalid start byte at byte 14\)"):
        Vocab.load(tmp_path / "v.json")
