"""heiindex.hashing and heiindex.train_hash: code layout (as FAISS reads it), the HEI loss, score
scaling, configs, hash folders and training next to a frozen matcher."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import faiss
import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch

import heiindex.train_hash as th
from heiindex.checkpoint import load_model, write_weights
from heiindex.encode import encode_split
from heiindex.errors import DataError, HeiindexError, ModelMismatchError
from heiindex.hash_folder import hash_checksum, load_hash, save_hash
from heiindex.hashing import (
    HashConfig,
    HashModule,
    code_ranking_loss,
    hash_loss,
    pack_codes,
    pool_regions,
    pool_words,
    scale_scores,
)
from heiindex.packed import PackedWords
from heiindex.settings import SettingError
from heiindex.store import SplitStore
from heiindex.train_hash import HashTrainConfig, candidate_recall, train_hash

# -- packing ----------------------------------------------------------------------------------


def test_pack_codes_bit_layout():
    bits = torch.zeros(3, 16, dtype=torch.bool)
    bits[0, 0] = bits[0, 3] = bits[0, 9] = True  # byte 0: 1 + 8; byte 1: bit 1 -> 2
    bits[1, 15] = True  # byte 1, bit 7 -> 128
    bits[2] = True
    codes = pack_codes(bits)
    assert codes.dtype == np.uint8 and codes.shape == (3, 2)
    np.testing.assert_array_equal(codes, [[9, 2], [0, 128], [255, 255]])
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1, bitorder="little").astype(bool), bits.numpy())


def test_faiss_hamming_distances_are_the_number_of_differing_bits():
    g = torch.Generator().manual_seed(0)
    db = torch.rand(40, 64, generator=g) > 0.5
    q = torch.rand(7, 64, generator=g) > 0.5
    by_hand = (q[:, None, :] != db[None, :, :]).sum(dim=2).numpy()  # popcount of the XOR, bit by bit
    index = faiss.IndexBinaryFlat(64)
    index.add(pack_codes(db))
    dist, ids = index.search(pack_codes(q), 40)
    for row in range(7):
        np.testing.assert_array_equal(dist[row], by_hand[row, ids[row]])
        assert sorted(ids[row]) == list(range(40))
        assert list(dist[row]) == sorted(dist[row])
    np.testing.assert_array_equal(pf.hamming_by_hand(pack_codes(q), pack_codes(db)), by_hand)
    # one flipped bit is distance 1 wherever it sits, so the byte layout is the one FAISS reads
    for bit in (0, 7, 8, 63):
        flipped = db[:1].clone()
        flipped[0, bit] = ~flipped[0, bit]
        d, i = index.search(pack_codes(flipped), 1)
        assert (int(d[0, 0]), int(i[0, 0])) == (1, 0)


# -- the module -------------------------------------------------------------------------------


def test_hash_module_codes_are_signs_of_the_relaxed_codes():
    torch.manual_seed(0)
    mod = HashModule(HashConfig(bits=24, embed_size=5))
    x = torch.randn(9, 5)
    with torch.no_grad():
        relaxed_i, relaxed_t = mod.relaxed(x, "image"), mod.relaxed(x, "text")
        torch.testing.assert_close(relaxed_i, torch.tanh(mod.image_hash(x)))
        torch.testing.assert_close(relaxed_t, torch.tanh(mod.text_hash(x)))
    ci, ct = mod.codes(x, "image"), mod.codes(x, "text")
    assert ci.shape == ct.shape == (9, 3) and ci.dtype == np.uint8
    np.testing.assert_array_equal(ci, pack_codes(relaxed_i > 0))
    np.testing.assert_array_equal(ct, pack_codes(relaxed_t > 0))
    assert not np.array_equal(ci, ct)  # separate layers per modality


@pytest.mark.parametrize("pooling", ["mean", "max", "attn", "query"])
def test_caption_codes_of_packed_words_equal_the_padded_ones(pooling):
    """Packed captions are coded ``block`` at a time, in order of length: the codes of padded
    captions, in the captions' order."""

    torch.manual_seed(1)
    mod = HashModule(HashConfig(bits=16, embed_size=6, pooling=pooling))
    lengths = torch.tensor([3, 1, 7, 2, 2, 5, 1])
    words = torch.randn(7, 7, 6) * (torch.arange(7)[None, :, None] < lengths[:, None, None])
    want = mod.caption_codes(words, lengths)
    packed = PackedWords.from_padded(words, lengths)
    for block in (1, 3, 4096):
        np.testing.assert_array_equal(mod.caption_codes(packed, lengths, block=block), want)
    np.testing.assert_array_equal(
        mod.caption_codes(packed.to(torch.bfloat16), lengths), mod.caption_codes(words.bfloat16(), lengths)
    )
    for other in (lengths[:-1], lengths[:, None]):
        with pytest.raises(
            ValueError, match=r"lengths \(shape .*\) differ from the packed words' own lengths \(shape \(7,\)\)"
        ):
            mod.caption_codes(packed, other)
    with pytest.raises(ValueError, match="own lengths: caption 0 has 3 words, lengths say 1"):
        mod.caption_codes(packed, lengths.flip(0))


@pytest.mark.parametrize("pooling", ["mean", "max", "attn", "query"])
def test_caption_codes_ignore_nan_padding(pooling):
    """Pooling multiplied the padding by a zero mask (0 x NaN is NaN): a NaN-padded caption got
    the all-zero code without a word, where its packed words gave its real code."""
    torch.manual_seed(0)
    words, lengths = torch.randn(3, 5, 8), torch.tensor([2, 5, 3])
    for i, n in enumerate(lengths.tolist()):
        words[i, n:] = float("nan")
    module = HashModule(HashConfig(bits=16, embed_size=8, pooling=pooling))
    got = module.caption_codes(words, lengths)
    np.testing.assert_array_equal(got, module.caption_codes(PackedWords.from_padded(words, lengths), lengths))
    zeros = torch.nan_to_num(words, nan=0.0)
    np.testing.assert_array_equal(got, module.caption_codes(zeros, lengths))


def test_pooling_means_over_regions_and_real_words_only():
    regions = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    torch.testing.assert_close(pool_regions(regions), regions.mean(dim=1))
    words = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 2, 1])
    garbage = words.clone()
    garbage[1, 2:] = 1e6
    garbage[2, 1:] = -7.0
    got = pool_words(garbage, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[i], words[i, :n].mean(dim=0))


def test_hash_config_accepts_multiples_of_8_only():
    for bits in (12, 0, 4, 1032, 127):
        with pytest.raises(
            ValueError, match=r"bits \(the code length k\) must be a multiple of 8 between 8 and 1024, got"
        ):
            HashConfig(bits=bits)
    assert HashConfig(bits=8).bits == 8 and HashConfig(bits=1024).bits == 1024
    with pytest.raises(ValueError, match="pooling must be one of"):
        HashConfig(pooling="median")
    assert HashConfig(pooling="max").pooling == "max"
    assert HashConfig(bits=16, embed_size=24).to_dict() == {"bits": 16, "embed_size": 24, "pooling": "query"}
    assert HashConfig().embed_size is None  # the matcher's, filled in by train_hash
    with pytest.raises(SettingError, match="^a hash module needs embed_size, its matcher's embedding size"):
        HashModule(HashConfig())


def test_max_and_attn_pooling_exact_on_a_tiny_example():
    # two items per instance, the second of instance 0 is padding for the captions
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [4.0, 0.0]]])
    assert torch.equal(pool_regions(x, "max"), torch.tensor([[1.0, 1.0], [4.0, 2.0]]))
    assert torch.equal(pool_words(x, torch.tensor([1, 2]), "max"), torch.tensor([[1.0, 0.0], [4.0, 2.0]]))
    # attn: for instance 0 both items have the same cosine to the mean -> the mean itself
    torch.testing.assert_close(pool_regions(x, "attn")[0], torch.tensor([0.5, 0.5]))
    # one real word: attention puts all weight on it
    torch.testing.assert_close(pool_words(x, torch.tensor([1, 2]), "attn")[0], torch.tensor([1.0, 0.0]))
    # instance 1: mean (3, 1); cos to (2,2) = 0.894427, to (4,0) = 0.948683; softmax at temperature 10
    c = torch.tensor([0.8944272, 0.9486833]) * 10
    w = torch.softmax(c, 0)
    torch.testing.assert_close(
        pool_regions(x, "attn")[1], w[0] * torch.tensor([2.0, 2.0]) + w[1] * torch.tensor([4.0, 0.0])
    )


def test_query_pooling_exact_on_a_tiny_example():
    """Regions by their mean; words by softmax(word . q) over the real words only."""
    mod = HashModule(HashConfig(bits=8, embed_size=2, pooling="query"))
    assert torch.allclose(mod.word_query.norm(), torch.tensor(5.0))  # initial norm
    with torch.no_grad():
        mod.word_query.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [4.0, 0.0]]])
    torch.testing.assert_close(mod.pool_images(x), x.mean(dim=1))
    got = mod.pool_captions(torch.cat([x, torch.full((2, 1, 2), 1e6)], 1), torch.tensor([1, 2]))
    w = torch.softmax(torch.tensor([2.0, 4.0]), 0)  # instance 1: word . q = 2, 4
    torch.testing.assert_close(got, torch.stack([x[0, 0], w[0] * x[1, 0] + w[1] * x[1, 1]]))
    got.sum().backward()  # the query learns
    assert mod.word_query.grad is not None and bool(mod.word_query.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="'query' pooling is learned"):
        pool_words(x, torch.tensor([1, 2]), "query")


# -- loss and scaling -------------------------------------------------------------------------

IMG = torch.tensor([[1.0, 0.5], [-0.5, 1.0]])
TXT = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
POS = torch.tensor([[True, False], [False, True]])
# h = IMG @ TXT.T / 2 = [[0.75, -0.25], [0.25, -0.5]]; matched term ((0.75-1)^2 + (-0.5-1)^2) / 2 = 1.15625


def test_hash_loss_exact_with_one_violating_negative():
    target = torch.tensor([[1.0, -0.5], [0.5, 1.0]])
    # negatives: (0, 1) h = -0.25 > -0.5 violates by 0.25 -> 0.0625; (1, 0) h = 0.25 <= 0.5 does not
    assert float(hash_loss(IMG, TXT, target, POS)) == 1.15625 + 0.0625


def test_hash_loss_exact_without_violations_keeps_a_gradient():
    target = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    img = IMG.clone().requires_grad_(True)
    loss = hash_loss(img, TXT, target, POS)
    assert float(loss.detach()) == 1.15625
    loss.backward()
    # d/dimg of mean((h_ii - 1)^2) with h = img @ txt.T / 2: row i gets (h_ii - 1) * txt_i / 2
    want = torch.stack([(0.75 - 1) * TXT[0] / 2, (-0.5 - 1) * TXT[1] / 2])
    torch.testing.assert_close(img.grad, want, atol=0, rtol=0)


def test_hash_loss_a_tie_is_not_a_violation():
    target = torch.tensor([[1.0, -0.25], [-1.0, 1.0]])
    # (0, 1): h = -0.25 equals its target, no violation; (1, 0): (0.25 + 1)^2 = 1.5625, the only one
    assert float(hash_loss(IMG, TXT, target, POS)) == 1.15625 + 1.5625


def test_hash_loss_never_counts_a_matched_pair_as_unmatched():
    target = torch.tensor([[0.25, -0.5], [0.5, 1.0]])
    # matched (0, 0): h = 0.75 above its target 0.25, but it is a positive; only (0, 1) violates
    assert float(hash_loss(IMG, TXT, target, POS)) == 1.15625 + 0.0625


def test_hash_loss_averages_violations():
    target = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    # both negatives violate: (-0.25 + 1)^2 = 0.5625 and (0.25 + 1)^2 = 1.5625, mean 1.0625
    assert float(hash_loss(IMG, TXT, target, POS)) == 1.15625 + 1.0625


def test_scale_scores_sends_min_to_minus_one_and_positive_mean_to_one():
    scores = torch.tensor([[3.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(scale_scores(scores, POS), torch.tensor([[1.0, -1.0], [-1 / 3, 1.0]]))
    # positives 2 and 4 (mean 3): 2 -> 1/3, 4 -> 5/3 clipped to 1, the minimum 0 -> -1
    scores = torch.tensor([[2.0, 0.0], [1.5, 4.0]])
    torch.testing.assert_close(scale_scores(scores, POS), torch.tensor([[1 / 3, -1.0], [0.0, 1.0]]))
    # affine: shifting and scaling the matcher's scores changes nothing
    torch.testing.assert_close(scale_scores(scores * 7 - 2, POS), scale_scores(scores, POS))
    # a batch scored all alike has no span: every target is -1, not NaN (0 / 0)
    torch.testing.assert_close(scale_scores(torch.full((2, 2), 3.0), POS), -torch.ones(2, 2))


# -- the training loop (fit_hash) on made-up scored batches -----------------------------------


def _records(ids_per_batch: list[list[int]], d: int = 8) -> th.HashRecords:
    """Scored batches of the given image ids (one caption per entry), random features and scores."""
    g = torch.Generator().manual_seed(0)
    batches, caption = [], 0
    for ids in ids_per_batch:
        b = len(ids)
        rows = np.arange(caption, caption + b)
        batches.append(
            {
                "ids": torch.tensor(ids),
                "scores": torch.rand((b, b), generator=g),
                "images": np.array(ids),
                "captions": rows,
            }
        )
        caption += b
    n_images = max(max(ids) for ids in ids_per_batch) + 1
    return th.HashRecords(
        batches, {"mean": torch.randn(n_images, d, generator=g)}, {"mean": torch.randn(caption, d, generator=g)}
    )


def _val_split() -> th.PooledSplit:
    """A validation split of 10 images for fit_hash where candidate_recall is replaced (read only
    for its image count)."""
    return th.PooledSplit("mean", torch.zeros(10, 8), np.repeat(np.arange(10), 5), captions=torch.zeros(50, 8))


def _fit(monkeypatch, records: th.HashRecords, epochs: int = 1, rank_weight: float = 1.0) -> dict:
    """fit_hash with a dev recall that is the same every epoch."""
    monkeypatch.setattr(th, "candidate_recall", lambda module, enc, n: {"t2i": 0.5, "i2t": 0.5, "n": 5})
    config = HashTrainConfig(epochs=epochs, rank_weight=rank_weight, batch_size=4)
    return th.fit_hash(records, _val_split(), HashConfig(bits=8, embed_size=8, pooling="mean"), config, log=pf.quiet)[1]


def test_fit_hash_pairs_every_caption_with_every_entry_of_its_image(monkeypatch):
    """Two captions of image 7 in one batch are both positives of it, not negatives of each other."""
    seen, real = [], th.hash_loss
    monkeypatch.setattr(th, "hash_loss", lambda i, t, target, pos: seen.append(pos.clone()) or real(i, t, target, pos))
    _fit(monkeypatch, _records([[7, 7, 3]]))
    assert seen[0].tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_fit_hash_weighs_the_ranking_term_and_records_the_mean_loss(monkeypatch):
    """Loss = HEI loss + rank_weight x ranking loss (here 0 and 1 in every batch), and the epoch's
    recorded loss is the mean over its 3 batches: 0.5, not 1.0 (weight dropped) or 1.5 (a sum)."""
    monkeypatch.setattr(th, "hash_loss", lambda i, t, target, pos: i.sum() * 0)
    monkeypatch.setattr(th, "code_ranking_loss", lambda i, t, pos: i.sum() * 0 + 1.0)
    history = _fit(monkeypatch, _records([[0, 1], [2, 3], [4, 5]]), rank_weight=0.5)["history"]
    assert history[0]["loss"] == 0.5


def test_fit_hash_keeps_the_first_of_equally_good_epochs(monkeypatch):
    assert _fit(monkeypatch, _records([[0, 1]]), epochs=3)["best_epoch"] == 1


# -- hash folders -----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, pipe):
    torch.manual_seed(1)
    mod = HashModule(HashConfig(bits=16, embed_size=4))  # query pooling: a learned word query besides the layers
    save_hash(mod, tmp_path / "h", {"matcher_sha256": "abc"})
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["config.json", "hash.safetensors"]
    assert (tmp_path / "h" / "hash.safetensors").stat().st_mode == (tmp_path / "h" / "config.json").stat().st_mode
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg == {
        "format_version": 1,
        "kind": "hei-hash",
        "hash": {"bits": 16, "embed_size": 4, "pooling": "query"},
        "info": {"matcher_sha256": "abc", "weights_sha256": hash_checksum(mod)},
    }
    loaded = load_hash(tmp_path / "h")
    assert torch.equal(loaded.module.word_query, mod.word_query)
    x = torch.randn(5, 4)
    np.testing.assert_array_equal(loaded.module.codes(x, "text"), mod.codes(x, "text"))
    np.testing.assert_array_equal(loaded.module.codes(x, "image"), mod.codes(x, "image"))
    with pytest.raises(ModelMismatchError, match="was trained next to matcher abc") as info:
        load_hash(tmp_path / "h", load_model(pipe.model_dir))
    assert str(info.value).endswith(
        f"({pipe.model_dir}): give the matcher it was trained next to, or train a hash module next to this one "
        f"(`heiindex train-hash --model {pipe.model_dir} --store STORE --out DIR`, STORE the store it trained on) "
        "and give that"
    )


def test_load_hash_refusals(tmp_path, pipe):
    with pytest.raises(DataError, match="no hash module config here"):
        load_hash(tmp_path / "none")
    with pytest.raises(DataError, match="is a matcher's config \\(kind 'scan'\\), not a hash module's"):
        load_hash(pipe.model_dir)  # a matcher folder is not a hash folder
    with pytest.raises(DataError, match="is a hash module's config \\(kind 'hei-hash'\\), not a matcher's"):
        load_model(pipe.hash_dir)  # nor the reverse
    shutil.copytree(pipe.hash_dir, tmp_path / "vse")
    with pf.edited_json(tmp_path / "vse" / "config.json") as cfg:
        cfg["kind"] = "vse"
    with pytest.raises(DataError, match="expected kind 'hei-hash'"):
        load_hash(tmp_path / "vse")
    shutil.copytree(pipe.hash_dir, tmp_path / "listed")
    with pf.edited_json(tmp_path / "listed" / "config.json") as cfg:
        cfg["info"] = []  # read as an object: a raw AttributeError
    with pytest.raises(DataError, match=r'listed/config.json: field "info" must be an object, got list'):
        load_hash(tmp_path / "listed", load_model(pipe.model_dir))
    for text, detail in (("{", "not valid JSON"), ("[1]", "must hold a JSON object, got list")):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text(text)
        with pytest.raises(DataError, match=rf"bad/config.json: {detail}"):
            load_hash(bad)


def test_a_missing_folder_names_what_a_killed_run_left_beside_it(tmp_path, pipe):
    # a swap killed between its two renames (where the one-step exchange is refused): the old
    # module was moved aside and the new one not yet put in place
    shutil.copytree(pipe.hash_dir, tmp_path / ".h.old-host-1-2-abcd")
    with pytest.raises(DataError, match="no hash module config here") as e:
        load_hash(tmp_path / "h")
    assert (
        "(a run replacing it was interrupted between two renames: the previous h is .h.old-host-1-2-abcd, "
        "beside it; rename it back to h)"
    ) in str(e.value)
    assert load_hash(tmp_path / ".h.old-host-1-2-abcd").module is not None  # the way back works
    # a first write killed before its output was put in place: its scratch only
    (tmp_path / ".m.partial-host-1-2-abcd").mkdir()
    with pytest.raises(DataError, match=r"no model config here.* \(a run writing it was interrupted: "):
        load_model(tmp_path / "m")
    with pytest.raises(DataError, match="no hash module config here$"):  # nothing left: nothing said
        load_hash(tmp_path / "none")


def test_load_hash_refuses_weights_other_than_those_its_config_records(tmp_path, pipe):
    """A hash folder recorded no checksum of its weights: replaced weights of the same shapes
    loaded without a word (an index built with them refused them only by its own record)."""
    shutil.copytree(pipe.hash_dir, tmp_path / "h")
    other = load_hash(tmp_path / "h").module
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    write_weights(other.state_dict(), tmp_path / "h" / "hash.safetensors")
    with pytest.raises(DataError, match=r"h/hash.safetensors: weights checksum differs from config.json; the folder"):
        load_hash(tmp_path / "h")
    with pf.edited_json(tmp_path / "h" / "config.json") as cfg:
        del cfg["info"]["weights_sha256"]  # written by a heiindex that recorded none: loaded as it is
    loaded = load_hash(tmp_path / "h").module.state_dict()
    assert all(torch.equal(loaded[name], t) for name, t in other.state_dict().items())  # the weights written


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("hash"), r': field "hash" is missing$'),
        (lambda c: c.update(hash="x"), r": field \"hash\" is not an object \(got 'x'\)$"),
        (lambda c: c["hash"].pop("embed_size"), r': field "hash.embed_size" is missing$'),
        (lambda c: c["hash"].update(depth=2), r": field \"hash\" holds unknown fields \['depth'\]; known: bits, "),
        (lambda c: c["hash"].update(bits=12), r': field "hash" is not a valid hash config \(bits \(the code length'),
    ],
    ids=["missing", "not_object", "no_embed_size", "unknown_field", "bits"],
)
def test_a_hash_config_is_refused_by_file_and_field(tmp_path, edit, message):
    """These named a bare key ('hash'), HashConfig's own ** or __init__, or (embed_size) no file."""
    save_hash(HashModule(HashConfig(bits=16, embed_size=4)), tmp_path / "h", {})
    with pf.edited_json(tmp_path / "h" / "config.json") as cfg:
        edit(cfg)
    with pytest.raises(DataError, match=message) as e:
        load_hash(tmp_path / "h")
    assert e.value.path == tmp_path / "h" / "config.json"


def test_load_hash_refuses_weights_holding_inf(tmp_path):
    mod = HashModule(HashConfig(bits=16, embed_size=4))
    with torch.no_grad():
        mod.image_hash.bias[3] = float("inf")
    save_hash(mod, tmp_path / "h", {})
    with pytest.raises(DataError, match=r'h/hash.safetensors: tensor "image_hash.bias" holds NaN or inf values'):
        load_hash(tmp_path / "h")


def test_load_hash_names_missing_unreadable_and_misfitting_weights(tmp_path):
    """As a matcher's folder names them (checkpoint.load_weights); all three were "cannot load
    hash weights", with safetensors' or torch's message."""
    save_hash(HashModule(HashConfig(bits=16, embed_size=4)), tmp_path / "h", {})
    weights = tmp_path / "h" / "hash.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"h/hash.safetensors: not a readable safetensors file"):
        load_hash(tmp_path / "h")
    write_weights(HashModule(HashConfig(bits=24, embed_size=4)).state_dict(), weights)
    with pytest.raises(DataError, match=r"h/hash.safetensors: weights do not fit the config"):
        load_hash(tmp_path / "h")
    weights.unlink()
    with pytest.raises(DataError, match=r"h/hash.safetensors: weights file missing"):
        load_hash(tmp_path / "h")
    weights.write_bytes(saved)
    assert load_hash(tmp_path / "h").module.config.bits == 16


# -- training next to the matcher -------------------------------------------------------------


def test_trained_hash_folder_records_its_matcher_and_best_epoch(pipe):
    matcher = load_model(pipe.model_dir)
    h = load_hash(pipe.hash_dir, matcher)  # accepted next to its own matcher
    assert h.module.config == HashConfig(bits=pf.BITS, embed_size=pf.EMBED_SIZE)
    assert h.info["matcher_sha256"] == matcher.checksum
    hist = pipe.hash_result["history"]
    assert [r["epoch"] for r in hist] == list(range(1, 16))
    scores = [r["dev_candidate_recall"]["t2i"] + r["dev_candidate_recall"]["i2t"] for r in hist]
    best = int(np.argmax(scores))  # the first best
    assert h.info["best_epoch"] == pipe.hash_result["best_epoch"] == best + 1
    assert h.info["dev_candidate_recall"] == hist[best]["dev_candidate_recall"]
    # the kept module reproduces its recorded dev candidate recall exactly
    dev = encode_split(matcher.model, SplitStore.open(pipe.root, "dev"))
    assert candidate_recall(h.module, dev, 5) == h.info["dev_candidate_recall"]
    with pytest.raises(ModelMismatchError):
        load_hash(pipe.hash_dir, load_model(pipe.other_model_dir))


def test_candidate_recall_counts_ground_truth_among_the_nearest_codes(pipe):
    matcher = load_model(pipe.model_dir)
    h = load_hash(pipe.hash_dir)
    enc = encode_split(matcher.model, SplitStore.open(pipe.root, "test"))
    full = candidate_recall(h.module, enc, 1000)
    assert full["n"] == 24 and full["t2i"] == 1.0  # every image is a candidate
    img = h.module.codes(pool_regions(enc.regions), "image")
    cap = h.module.codes(h.module.pool_captions(enc.words.padded(), enc.lengths), "text")
    index = faiss.IndexBinaryFlat(pf.BITS)
    index.add(img)
    _, ids = index.search(cap, 3)
    want = float(np.mean([enc.caption_image[q] in ids[q] for q in range(len(cap))]))
    got = candidate_recall(h.module, enc, 3)
    assert got["t2i"] == want
    captions = faiss.IndexBinaryFlat(pf.BITS)  # and image to text: any of the image's 5 captions
    captions.add(cap)
    _, cids = captions.search(img, 3)
    want_i2t = float(np.mean([i in enc.caption_image[cids[i]] for i in range(len(img))]))
    assert got["i2t"] == want_i2t and 0 < want_i2t < 1  # a nearest-only count would differ


@pytest.mark.parametrize("pooling", ["query", "mean"])
def test_train_hash_trains_each_pooling_and_records_its_recall(pipe, tmp_path, pooling):
    """The learned query (the default) is trained and saved with the layers; a parameter-free
    pooling (mean) trains from pooled records and saves no query; either reproduces its recall."""
    matcher = load_model(pipe.model_dir)
    cfg = HashConfig(bits=pf.BITS, embed_size=pf.EMBED_SIZE, pooling=pooling)
    res = train_hash(
        matcher,
        pipe.root,
        tmp_path / "h",
        cfg,
        HashTrainConfig(epochs=3, batch_size=32, lr=1e-2, rounds=1, val_candidates=5),
        log=pf.quiet,
    )
    h = load_hash(tmp_path / "h", matcher)
    assert h.module.config == cfg
    if pooling == "query":
        assert h.module.word_query.shape == (pf.EMBED_SIZE,)
        torch.manual_seed(0)  # the query's initial value, as train_hash draws it (seed 0)
        assert not torch.equal(h.module.word_query, HashModule(cfg).word_query)  # trained, and saved
    else:
        assert not hasattr(h.module, "word_query")
    dev = encode_split(matcher.model, SplitStore.open(pipe.root, "dev"))
    assert candidate_recall(h.module, dev, 5) == h.info["dev_candidate_recall"] == res["dev_candidate_recall"]


def test_training_records_keep_each_image_and_caption_once_as_encoded(pipe):
    """collect_batches keeps pooled features per image and caption (mean) and every caption's
    words once (query), equal to encoding them directly; batches point at them by row."""
    from heiindex.train_hash import collect_batches

    matcher = load_model(pipe.model_dir)
    model = matcher.model.eval()
    store = SplitStore.open(pipe.root, "train")
    caps = store.captions()
    cfg = HashTrainConfig(batch_size=32, rounds=2)
    recs = collect_batches(model, store, cfg, ("mean", "query"))
    assert len(recs) == 2 * -(-len(caps) // 32) and set(recs.captions) == {"mean"}
    image_ids = np.unique(caps.image_ids)
    for batch in recs.batches:  # rows and ids agree; every caption once per round
        np.testing.assert_array_equal(image_ids[batch["images"]], batch["ids"].numpy())
        np.testing.assert_array_equal(caps.image_ids[batch["captions"]], batch["ids"].numpy())
    rows = np.concatenate([b["captions"] for b in recs.batches])
    assert sorted(rows.tolist()) == sorted(2 * list(range(len(caps))))
    with torch.no_grad():
        lens = torch.from_numpy(caps.lengths)
        words = model.encode_captions(torch.from_numpy(caps.tokens), lens)
        regions = torch.cat([model.encode_images(torch.from_numpy(f)) for _, f in store.iter_image_blocks()])
    block_ids = np.concatenate([i for i, _ in store.iter_image_blocks()])
    order = np.searchsorted(image_ids, block_ids)
    torch.testing.assert_close(recs.images["mean"][order], pool_regions(regions, "mean"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recs.images["query"], recs.images["mean"])  # query pooling: regions by the mean
    torch.testing.assert_close(recs.captions["mean"], pool_words(words, lens, "mean"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recs.words.padded(), words[:, : int(lens.max())], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recs.words.lengths, lens)
    with pytest.raises(ValueError, match=r"collected for poolings \['mean', 'query'\], not 'max'"):
        recs.features(recs.batches[0], HashModule(HashConfig(bits=16, embed_size=pf.EMBED_SIZE, pooling="max")))
    # what fit_hash trains on: a batch's features, pooled as the module pools its own items
    row_of_id = {int(i): k for k, i in enumerate(block_ids)}
    for pooling in ("mean", "query"):
        module = HashModule(HashConfig(bits=16, embed_size=pf.EMBED_SIZE, pooling=pooling))
        for batch in recs.batches[:3]:
            img, cap = recs.features(batch, module)
            own = regions[[row_of_id[int(i)] for i in batch["ids"]]]
            torch.testing.assert_close(img, pool_regions(own, "mean"), rtol=1e-5, atol=1e-6)
            rows = torch.from_numpy(batch["captions"])
            want = module.pool_captions(words[rows], lens[rows])
            torch.testing.assert_close(cap, want, rtol=1e-5, atol=1e-6)


def test_caption_words_file_reserves_its_space_and_names_tmpdir_when_full(monkeypatch):
    import errno
    import os

    from heiindex.train_hash import _word_file

    words = _word_file(np.array([2, 3]), 4)
    assert words.flat.shape == (5, 4) and float(words._flat.abs().sum()) == 0  # zeroed, zero row included

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(
        HeiindexError, match=r"cannot reserve 96 bytes .*No space left on device.*set TMPDIR"
    ):  # read "0.0 GB"
        _word_file(np.array([2, 3]), 4)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)  # a file system that cannot reserve: mapped anyway
    assert _word_file(np.array([2, 3]), 4).flat.shape == (5, 4)
    monkeypatch.delattr(os, "posix_fallocate")  # macOS, Windows: an AttributeError, with the default pooling
    assert _word_file(np.array([2, 3]), 4).flat.shape == (5, 4)


def _mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files of this process's mappings that hold ``tensor``'s first byte (Linux)."""
    address = tensor.data_ptr()
    names = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi and len(fields) > 5:
                names.append(" ".join(fields[5:]))
    return names


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_training_records_keep_what_grows_with_the_split_in_mapped_files(pipe):
    """The batches' score matrices, the pooled features and the words lie in unlinked temporary
    files, mapped (they were ~1.2 GB of scores in memory at COCO train): one file of scores for
    every batch, each batch a view of its own stretch of it, in order."""
    store = SplitStore.open(pipe.root, "train")
    recs = th.collect_batches(
        load_model(pipe.model_dir).model.eval(), store, HashTrainConfig(batch_size=32, rounds=2), ("mean", "query")
    )
    for tensor in (recs.batches[0]["scores"], recs.images["mean"], recs.captions["mean"], recs.words.flat):
        (name,) = _mapped_files(tensor)
        assert name.startswith(tempfile.gettempdir()) and name.endswith("(deleted)")  # not the heap
    base = recs.batches[0]["scores"].untyped_storage().data_ptr()
    ends = [b["scores"].data_ptr() - base for b in recs.batches]
    sizes = [4 * b["scores"].numel() for b in recs.batches]
    assert ends == list(np.cumsum([0, *sizes[:-1]]))  # one buffer, batch after batch
    assert all(b["scores"].untyped_storage().data_ptr() == base for b in recs.batches)


def test_pooled_split_pools_each_image_once_as_encoding_the_split_does(pipe):
    """Validation keeps each dev image's pooled regions, not its regions, and pools them once;
    encoded a block at a time (the regions never all in memory) it gives exactly what pooling an
    encoded split gives, and so exactly the same candidate recall."""
    matcher = load_model(pipe.model_dir)
    store = SplitStore.open(pipe.root, "dev")
    enc = encode_split(matcher.model, store)
    for pooling in ("query", "mean", "attn"):
        module = HashModule(HashConfig(bits=pf.BITS, embed_size=pf.EMBED_SIZE, pooling=pooling))
        blockwise = th.PooledSplit.encode(matcher.model, store, store.captions(), pooling, block_images=5)
        whole = th.PooledSplit.of(enc, pooling)
        assert blockwise.images.shape == (store.n_images, pf.EMBED_SIZE)
        assert torch.equal(blockwise.images, whole.images)
        np.testing.assert_array_equal(blockwise.caption_image, enc.caption_image)
        if pooling == "query":
            assert blockwise.captions is None and torch.equal(blockwise.words.flat, enc.words.flat)
        else:
            assert blockwise.words is None and torch.equal(blockwise.captions, whole.captions)
            want = pool_words(enc.words.padded(), enc.lengths, pooling)
            torch.testing.assert_close(blockwise.captions, want, rtol=1e-5, atol=1e-6)
        assert candidate_recall(module, blockwise, 5) == candidate_recall(module, enc, 5)
        img, cap = blockwise.codes(module)
        np.testing.assert_array_equal(img, module.image_codes(enc.regions))
    other = HashModule(HashConfig(bits=pf.BITS, embed_size=pf.EMBED_SIZE, pooling="mean"))
    with pytest.raises(ValueError, match="pooled for 'query', the module pools by 'mean'"):
        th.PooledSplit.of(enc, "query").codes(other)


def test_train_hash_refuses_a_train_split_without_negatives(pipe, tmp_path, monkeypatch):
    """One training image: every pair of a batch matched, no unmatched pair for the loss (a module
    was written all the same). No batch at all (buffers of one caption are skipped): a
    ZeroDivisionError after the whole scoring pass."""
    from heiindex.ingest import ingest

    one = tmp_path / "one"
    pf.write_learnable_precomp(one / "precomp", {"train": 1, "dev": 3})
    matcher = load_model(pipe.model_dir)
    root = one / "store"
    for split in ("train", "dev"):  # tokenised with the matcher's vocabulary
        ingest(one / "precomp", split, root, vocab=matcher.vocab, regions=None, feature_dim=None)
    with pytest.raises(HeiindexError, match="^the train split has 1 image: the hash loss needs unmatched pairs"):
        train_hash(matcher, root, tmp_path / "h", None, HashTrainConfig(epochs=1), log=pf.quiet)
    monkeypatch.setattr(th, "collect_batches", lambda *a, **k: th.HashRecords([], {}, {}))
    with pytest.raises(HeiindexError, match="^the train split gave no batch of 2 or more captions to train on"):
        train_hash(matcher, pipe.root, tmp_path / "h", None, HashTrainConfig(epochs=1), log=pf.quiet)
    assert not (tmp_path / "h").exists()


def test_train_hash_stops_when_the_loss_is_not_finite(pipe, tmp_path, monkeypatch):
    real = th.hash_loss
    monkeypatch.setattr(th, "hash_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    cfg = HashConfig(bits=pf.BITS, embed_size=pf.EMBED_SIZE)
    tcfg = HashTrainConfig(epochs=3, batch_size=32, lr=1e-2, rounds=1, val_candidates=5)
    detail = "the loss is nan at epoch 1, batch 1; no hash module was written"
    with pytest.raises(HeiindexError, match=f"^training diverged: {detail}"):
        train_hash(load_model(pipe.model_dir), pipe.root, tmp_path / "h", cfg, tcfg, log=pf.quiet)
    assert not (tmp_path / "h").exists()


def test_train_hash_refuses_validation_depths_that_take_every_dev_image(pipe, tmp_path):
    """--val-candidates was capped at the dev images: recall@N was then 100% t2i every epoch, and
    the best epoch was chosen on that."""
    cfg = HashConfig(bits=pf.BITS, embed_size=pf.EMBED_SIZE)
    for n in (24, 200):
        with pytest.raises(SettingError, match=f"^val_candidates {n} must be below the 24 images of the dev split"):
            train_hash(load_model(pipe.model_dir), pipe.root, tmp_path / "h", cfg, HashTrainConfig(val_candidates=n))
    assert not (tmp_path / "h").exists()


def test_the_default_validation_depth_fits_a_small_dev_split():
    """The default N (100) is refused nowhere: on a dev split of 100 images or fewer it becomes a
    tenth of them, said in a line; the module's info records the number used. This was done by
    the CLI alone, so that train_hash from Python refused its own default on such a split."""
    said = []
    assert HashTrainConfig().val_candidates is None
    assert HashTrainConfig().resolved(1000, log=said.append).val_candidates == 100 and said == []
    assert HashTrainConfig().resolved(101).val_candidates == 100
    assert HashTrainConfig().resolved(100, log=said.append).val_candidates == 10
    assert said == [
        "validating by candidate recall@10: a tenth of the 100 images of the dev split "
        "(the default, 100, needs more; a number given replaces it)"
    ]
    assert HashTrainConfig().resolved(5).val_candidates == 1
    assert HashTrainConfig(val_candidates=7).resolved(24).val_candidates == 7
    # a split of one image cannot choose (recall@1 of 1 image is 100%); the split's size is checked
    with pytest.raises(HeiindexError, match="^the dev split has 1 image: too few to choose the best epoch"):
        HashTrainConfig().resolved(1)
    # the split validated on is the one named (it said "give a larger dev split" of any)
    with pytest.raises(HeiindexError, match=r"^the val split has 1 image: .*; give a larger val split$"):
        HashTrainConfig().resolved(1, "val")
    with pytest.raises(SettingError, match=r"^val_candidates 5000 must be below the 5,000 images of the dev split it "):
        HashTrainConfig(val_candidates=5000).resolved(5000)
    for bad in (0, -5, True, 50.0, None, "100"):
        with pytest.raises(SettingError, match="^n_val_images must be a whole number"):
            HashTrainConfig().resolved(bad)


def test_train_hash_takes_the_matchers_embed_size_and_refuses_another(pipe, tmp_path):
    """HashConfig(bits=16) alone, as a Python user writes it, trains next to a matcher of
    embed_size 24 (the default embed_size was 256, refused as another); one given that differs
    is refused. The validation split given is the one recorded (the record named no split). The
    matcher may be given as its folder (it failed on the path's .model)."""
    got = train_hash(
        pipe.model_dir,
        pipe.root,
        tmp_path / "ok",
        HashConfig(bits=16),
        HashTrainConfig(epochs=1),
        val_split="test",
        log=pf.quiet,
    )
    kept = load_hash(tmp_path / "ok")
    assert kept.module.config == HashConfig(bits=16, embed_size=24)
    assert kept.info["splits"] == {"train": "train", "dev": "test"}
    assert kept.info["data"]["dev"] == SplitStore.open(pipe.root, "test").checksum
    assert got["best_epoch"] == 1  # of 1
    with pytest.raises(SettingError, match="hash embed_size 8 != matcher embed_size 24: leave embed_size unset"):
        train_hash(
            load_model(pipe.model_dir),
            pipe.root,
            tmp_path / "h",
            HashConfig(bits=16, embed_size=8),
            HashTrainConfig(epochs=1),
            log=pf.quiet,
        )
    assert not (tmp_path / "h").exists()


def test_train_hash_holds_its_output_for_the_whole_run(pipe, tmp_path, monkeypatch):
    """Two train-hash runs of one --out both trained and both said they wrote it; the one that
    finished first was lost. The output's lock is now held from before the work to the save: a
    second writer is refused while the first trains, and a held lock refuses a run before it
    collects a batch."""
    from heiindex.atomic import LockHeld, exclusive, lock_file

    out = tmp_path / "h"
    real, held = th.fit_hash, []

    def fit(*args, **kwargs):  # the first run, training: another writer of its output is refused
        with pytest.raises(LockHeld), exclusive(lock_file(out)):
            pass
        held.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(th, "fit_hash", fit)
    train_hash(pipe.model_dir, pipe.root, out, HashConfig(bits=16), HashTrainConfig(epochs=1), log=pf.quiet)
    assert held and load_hash(out).module.config.bits == 16
    assert not lock_file(out).exists()
    pf.forbid(monkeypatch, "no batch is collected for a refused run", (th, "collect_batches"))
    with exclusive(lock_file(out)):  # another command writes it now
        with pytest.raises(DataError, match=r"another heiindex command is writing it now \(it holds \.h\.lock"):
            train_hash(pipe.model_dir, pipe.root, out, HashConfig(bits=8), HashTrainConfig(epochs=1), log=pf.quiet)
    assert load_hash(out).module.config.bits == 16  # the first run's module stands


def test_code_ranking_loss_exact():
    # h = IMG @ TXT.T / 2 = [[0.75, -0.25], [0.25, -0.5]], diagonal (0.75, -0.5), margin 0.2
    # image 0 vs caption 1: 0.2 - 0.25 - 0.75 < 0 -> 0; image 1 vs caption 0: 0.2 + 0.25 + 0.5 = 0.95
    # caption 0 vs image 1: 0.2 + 0.25 - 0.75 < 0 -> 0; caption 1 vs image 0: 0.2 - 0.25 + 0.5 = 0.45
    loss = code_ranking_loss(IMG, TXT, POS, margin=0.2)
    assert loss.item() == pytest.approx((0.95 + 0.45) / 2)
    assert code_ranking_loss(IMG, TXT, POS).item() == loss.item()  # 0.2 is the default fit_hash relies on
    # same-image pairs are never negatives
    assert code_ranking_loss(IMG, TXT, torch.ones(2, 2, dtype=torch.bool)).item() == 0.0


@pf.needs_cuda
def test_cuda_collect_batches_scores_where_the_matcher_is(pipe):
    """A matcher on a GPU was handed the batches' CPU tensors (a device error at its first layer);
    its scores and pooled features now come back to the CPU, as the CPU's within float32 noise."""
    store = SplitStore.open(pipe.root, "train")
    config = HashTrainConfig(rounds=1, batch_size=32)
    cpu = th.collect_batches(load_model(pipe.model_dir).model.eval(), store, config, ("query", "mean"))
    gpu = th.collect_batches(load_model(pipe.model_dir).model.cuda().eval(), store, config, ("query", "mean"))
    for a, b in zip(cpu.batches, gpu.batches, strict=True):
        assert b["scores"].device.type == "cpu"
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.images["mean"], cpu.images["mean"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.words.flat, cpu.words.flat, rtol=1e-4, atol=1e-5)


def test_fit_hash_losses_of_a_small_set_are_pinned(monkeypatch):
    """The real HEI loss (no stubs): matcher scores scaled, the image layer on images, the text
    layer on captions, the ranking term weighted. Values from this code (a mutation review found
    four changes to the loss that no test noticed: 1.07406, 1.45942, 1.43284 instead of 1.47753)."""
    history = _fit(monkeypatch, _records([[0, 1, 2, 3], [4, 5, 6, 7]]), epochs=2, rank_weight=0.0)["history"]
    assert [h["loss"] for h in history] == pytest.approx([1.4775251150131226, 1.4519118070602417], rel=1e-5)
    history = _fit(monkeypatch, _records([[0, 1, 2, 3], [4, 5, 6, 7]]), epochs=2, rank_weight=1.0)["history"]
    assert [h["loss"] for h in history] == pytest.approx([2.875141978263855, 2.792022228240967], rel=1e-5)


def test_fit_hash_keeps_the_epoch_of_the_best_summed_recall_of_both_directions(monkeypatch):
    """Epoch 2 (0.4 + 0.4) beats epoch 1 (0.5 + 0.1): not picked by text-to-image alone."""
    recalls = iter([{"t2i": 0.5, "i2t": 0.1, "n": 5}, {"t2i": 0.4, "i2t": 0.4, "n": 5}])
    monkeypatch.setattr(th, "candidate_recall", lambda module, enc, n: next(recalls))
    config = HashTrainConfig(epochs=2, batch_size=4)
    got = th.fit_hash(
        _records([[0, 1]]), _val_split(), HashConfig(bits=8, embed_size=8, pooling="mean"), config, log=pf.quiet
    )
    assert got[1]["best_epoch"] == 2
    with pytest.raises(HeiindexError, match=r"^val_enc must be the validation split .*, got NoneType: its candidate"):
        th.fit_hash(_records([[0, 1]]), None, HashConfig(bits=8, embed_size=8, pooling="mean"), config)


def test_the_hash_training_defaults_are_those_documented():
    """README and train_hash's docstring: 80 epochs, ranking weight 1, 4 rounds, lr 3e-3."""
    config = HashTrainConfig()
    assert (config.epochs, config.rank_weight, config.rounds, config.lr) == (80, 1.0, 4, 3e-3)
