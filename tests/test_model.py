"""heiindex.model: the SCAN encoders, bi-GRU averaging, padding, configs and the ensemble."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from heiindex.attention import AttentionConfig, score_block
from heiindex.model import Ensemble, ImageEncoder, ScanConfig, ScanModel, TextEncoder, l2norm

ATOL = 1e-6


def _tiny_config(**kw) -> ScanConfig:
    base = {"vocab_size": 30, "embed_size": 6, "word_dim": 5, "img_dim": 10}
    base.update(kw)
    return ScanConfig(**base)


def _model(seed: int, **kw) -> ScanModel:
    torch.manual_seed(seed)
    return ScanModel(_tiny_config(**kw)).eval()


def _captions():
    """Three captions of real lengths 4, 2, 6, padded to 9 with non-zero garbage ids."""
    tokens = torch.tensor(
        [
            [1, 5, 7, 2, 9, 9, 9, 9, 9],
            [1, 2, 4, 4, 4, 4, 4, 4, 4],
            [1, 8, 11, 12, 13, 2, 17, 17, 17],
        ]
    )
    return tokens, torch.tensor([4, 2, 6])


# -- encoders ---------------------------------------------------------------------------------


def test_l2norm_is_scan_formula():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2norm(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], torch.zeros(2))  # eps keeps a zero vector at zero


def test_image_encoder_shape_unit_norms_and_linear_map():
    torch.manual_seed(0)
    enc = ImageEncoder(img_dim=10, embed_size=7)
    r = math.sqrt(6.0) / math.sqrt(10 + 7)
    assert float(enc.fc.weight.detach().abs().max()) <= r  # Xavier-uniform, as SCAN
    assert torch.equal(enc.fc.bias, torch.zeros(7))
    x = torch.randn(3, 5, 10)
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (3, 5, 7)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 5), atol=ATOL, rtol=0)
    raw = (x @ enc.fc.weight.T + enc.fc.bias).detach()
    torch.testing.assert_close(out, raw / raw.norm(dim=-1, keepdim=True), atol=ATOL, rtol=0)

    plain = ImageEncoder(img_dim=10, embed_size=7, no_imgnorm=True)
    plain.load_state_dict(enc.state_dict())
    with torch.no_grad():
        unnormed = plain(x)
    torch.testing.assert_close(unnormed, raw, atol=ATOL, rtol=0)
    assert not torch.allclose(unnormed.norm(dim=-1), torch.ones(3, 5))


def test_text_encoder_shape_unit_norms_and_zero_padding():
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=30, word_dim=5, embed_size=6).eval()
    tokens, lengths = _captions()
    with torch.no_grad():
        out = enc(tokens, lengths)
    assert out.shape == (3, 6, 6)  # (captions, longest real length, d)
    norms = out.norm(dim=-1)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(norms[i, :n], torch.ones(n), atol=ATOL, rtol=0)
        assert torch.equal(out[i, n:], torch.zeros(6 - n, 6))


def _split_gru(enc: TextEncoder) -> tuple[nn.GRU, nn.GRU]:
    """Two one-direction GRUs carrying the forward and the reverse weights of ``enc.rnn``."""
    sd = enc.rnn.state_dict()
    fwd = nn.GRU(enc.rnn.input_size, enc.embed_size, batch_first=True)
    bwd = nn.GRU(enc.rnn.input_size, enc.embed_size, batch_first=True)
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    fwd.load_state_dict({k: sd[k] for k in names})
    bwd.load_state_dict({k: sd[k + "_reverse"] for k in names})
    return fwd, bwd


@pytest.mark.parametrize("txtnorm", [False, True])
def test_bi_gru_averages_forward_and_backward_over_real_words(txtnorm):
    torch.manual_seed(1)
    enc = TextEncoder(vocab_size=30, word_dim=5, embed_size=6, no_txtnorm=not txtnorm).eval()
    tokens, lengths = _captions()
    fwd, bwd = _split_gru(enc)
    with torch.no_grad():
        out = enc(tokens, lengths)
        for i, n in enumerate(lengths.tolist()):
            x = enc.embed(tokens[i : i + 1, :n])  # the real words only
            f = fwd(x)[0][0]
            b = bwd(x.flip(1))[0][0].flip(0)  # the reverse direction starts at the last real word
            want = (f + b) / 2
            if txtnorm:
                want = want / want.norm(dim=-1, keepdim=True)
            torch.testing.assert_close(out[i, :n], want, atol=ATOL, rtol=0)


def test_unidirectional_gru_is_the_forward_pass():
    torch.manual_seed(2)
    enc = TextEncoder(vocab_size=30, word_dim=5, embed_size=6, bi_gru=False, no_txtnorm=True).eval()
    tokens, lengths = _captions()
    with torch.no_grad():
        out = enc(tokens, lengths)
        for i, n in enumerate(lengths.tolist()):
            want = enc.rnn(enc.embed(tokens[i : i + 1, :n]))[0][0]
            torch.testing.assert_close(out[i, :n], want, atol=ATOL, rtol=0)


def test_padding_invariance_of_words_and_scores():
    """A caption encodes and scores the same alone, or padded beside longer captions with any
    garbage token ids beyond its length."""
    model = _model(3)
    tokens, lengths = _captions()
    other = tokens.clone()
    other[0, 4:] = 0
    other[1, 2:] = 29
    other[2, 6:] = 3
    images = torch.randn(4, 5, 10)
    with torch.no_grad():
        words = model.encode_captions(tokens, lengths)
        words2 = model.encode_captions(other, lengths)
        regions = model.encode_images(images)
        scores = model.score(words, lengths, regions)
        torch.testing.assert_close(words, words2, atol=0, rtol=0)
        for i, n in enumerate(lengths.tolist()):
            alone = model.encode_captions(tokens[i : i + 1, :n], lengths[i : i + 1])
            torch.testing.assert_close(alone[0], words[i, :n], atol=ATOL, rtol=0)
            s_alone = model.score(alone, lengths[i : i + 1], regions)
            torch.testing.assert_close(s_alone[0], scores[i], atol=ATOL, rtol=0)
    assert scores.shape == (3, 4)


def test_score_is_the_attention_score_of_the_config():
    model = _model(4, attention=AttentionConfig(cross_attn="i2t", agg="mean", lambda_softmax=4.0))
    tokens, lengths = _captions()
    with torch.no_grad():
        words = model.encode_captions(tokens, lengths)
        regions = model.encode_images(torch.randn(2, 5, 10))
        got = model.score(words, lengths, regions)
    want = score_block(AttentionConfig(cross_attn="i2t", agg="mean", lambda_softmax=4.0), words, lengths, regions)
    assert torch.equal(got, want)


def test_parameter_names_match_scan_state_dicts():
    names = set(_model(0).state_dict())
    assert names == {
        "img_enc.fc.weight",
        "img_enc.fc.bias",
        "txt_enc.embed.weight",
        "txt_enc.rnn.weight_ih_l0",
        "txt_enc.rnn.weight_hh_l0",
        "txt_enc.rnn.bias_ih_l0",
        "txt_enc.rnn.bias_hh_l0",
        "txt_enc.rnn.weight_ih_l0_reverse",
        "txt_enc.rnn.weight_hh_l0_reverse",
        "txt_enc.rnn.bias_ih_l0_reverse",
        "txt_enc.rnn.bias_hh_l0_reverse",
    }
    m = _model(0)
    assert m.img_enc.fc.weight.shape == (6, 10)
    assert m.txt_enc.embed.weight.shape == (30, 5)
    assert m.txt_enc.rnn.weight_ih_l0.shape == (3 * 6, 5)


# -- config -----------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = _tiny_config(no_imgnorm=True, attention=AttentionConfig("i2t", "l1norm", "max", 5.0, 4.0))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["attention"] == {
        "cross_attn": "i2t",
        "raw_feature_norm": "l1norm",
        "agg": "max",
        "lambda_lse": 5.0,
        "lambda_softmax": 4.0,
    }
    assert ScanConfig.from_dict(d) == cfg
    assert ScanConfig.from_dict({"vocab_size": 7}) == ScanConfig(vocab_size=7)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown model config fields: \['bogus'\]"):
        ScanConfig.from_dict({"vocab_size": 7, "bogus": 1})


# -- ensemble ---------------------------------------------------------------------------------


def test_ensemble_of_two_is_the_mean_of_their_score_matrices():
    a, b = _model(10), _model(11)
    tokens, lengths = _captions()
    images = torch.randn(5, 5, 10)
    with torch.no_grad():
        sa = a.score(a.encode_captions(tokens, lengths), lengths, a.encode_images(images))
        sb = b.score(b.encode_captions(tokens, lengths), lengths, b.encode_images(images))
    got = Ensemble([a, b]).score_raw(images, tokens, lengths)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, (sa + sb) / 2, atol=ATOL, rtol=0)
    assert not torch.allclose(sa, sb, atol=1e-3)  # the members really differ
    torch.testing.assert_close(Ensemble([a]).score_raw(images, tokens, lengths), sa, atol=0, rtol=0)


def test_ensemble_needs_a_member():
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])


def test_word_embeddings_start_uniform_in_plus_minus_0_1_as_scan():
    torch.manual_seed(0)
    model = ScanModel(ScanConfig(vocab_size=6, embed_size=8, word_dim=6, img_dim=4))
    assert float(model.txt_enc.embed.weight.detach().abs().max()) <= 0.1


@pytest.mark.parametrize("field", ["vocab_size", "embed_size", "word_dim", "img_dim", "num_layers"])
def test_zero_sizes_are_refused(field):
    kw = {"vocab_size": 10, field: 0}
    with pytest.raises(ValueError, match=field):
        ScanConfig(**kw)
