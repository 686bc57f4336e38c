"""The SCAN matcher: region and word encoders plus its cross-attention score.

Image encoder: ``Linear(img_dim -> d)`` per region, then per-region l2 norm (``no_imgnorm``
turns it off). Text encoder: ``Embedding(vocab, word_dim)`` -> GRU(word_dim -> d), with the two
directions of a bidirectional GRU averaged, then per-word l2 norm. Parameter names match
SCAN's state dicts (``fc.*`` for images; ``embed.*``, ``rnn.*`` for text) so that released
checkpoints load without renaming.

An ``Ensemble`` averages the score matrices of several matchers (SCAN's best published numbers
are a t2i and an i2t model averaged). What this module must not do: train, or read files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .attention import AttentionConfig, score_block
from .settings import settle, settle_flag

__all__ = ["Ensemble", "ImageEncoder", "ScanConfig", "ScanModel", "TextEncoder", "l2norm"]


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """SCAN's l2 normalisation: ``x / (|x| + eps)``."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


_SIZE_LIMITS = {"vocab_size": 1 << 24, "embed_size": 1 << 16, "word_dim": 1 << 16, "img_dim": 1 << 16, "num_layers": 32}


@dataclass(frozen=True)
class ScanConfig:
    """Hyper-parameters of one SCAN matcher (JSON-serialisable)."""

    vocab_size: int
    embed_size: int = 256
    word_dim: int = 300
    img_dim: int = 2048
    num_layers: int = 1
    bi_gru: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        # Upper bounds far above any SCAN model, below sizes that only exhaust memory: a config.json
        # saying embed_size 10**12 failed in torch's allocator, num_layers 10**9 built layers for ever.
        for name, most in _SIZE_LIMITS.items():
            settle(self, name, at_least=1, at_most=most, integer=True)
        for name in ("bi_gru", "no_imgnorm", "no_txtnorm"):  # "yes" reached the GRU's own TypeError
            settle_flag(self, name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention"] = self.attention.to_dict()
        return d

    def changes_from(self, other: ScanConfig, label: str = "other:") -> list[str]:
        """Each field where this config differs from ``other``, as "name value (label value)";
        attention fields are named as in ``to_dict`` (e.g. "lambda_softmax")."""

        def flat(config: ScanConfig) -> dict:
            d = config.to_dict()
            return {**{k: v for k, v in d.items() if k != "attention"}, **d["attention"]}

        mine, theirs = flat(self), flat(other)
        return [f"{name} {mine[name]} ({label} {theirs[name]})" for name in mine if mine[name] != theirs[name]]

    @classmethod
    def from_dict(cls, d: dict) -> ScanConfig:
        d = dict(d)
        att = d.pop("attention", {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(attention=AttentionConfig(**att), **d)


class ImageEncoder(nn.Module):
    """Regions ``(b, R, img_dim)`` -> ``(b, R, d)``."""

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.no_imgnorm = no_imgnorm
        r = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # Xavier, as SCAN
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor) -> Tensor:
        x = self.fc(images)
        return x if self.no_imgnorm else l2norm(x)


class TextEncoder(nn.Module):
    """Token ids ``(b, L)`` with lengths ``(b,)`` -> word features ``(b, L, d)`` (zero padding)."""

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_size: int,
        num_layers: int = 1,
        bi_gru: bool = True,
        no_txtnorm: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        self.bi_gru = bi_gru
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        length = int(lengths.max())
        x = self.embed(tokens[:, :length])
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        if self.bi_gru:
            out = (out[:, :, : self.embed_size] + out[:, :, self.embed_size :]) / 2
        return out if self.no_txtnorm else l2norm(out)


class ScanModel(nn.Module):
    """One SCAN matcher: ``img_enc``, ``txt_enc`` and an attention scoring function."""

    def __init__(self, config: ScanConfig) -> None:
        super().__init__()
        self.config = config
        self.img_enc = ImageEncoder(config.img_dim, config.embed_size, config.no_imgnorm)
        self.txt_enc = TextEncoder(
            config.vocab_size, config.word_dim, config.embed_size, config.num_layers, config.bi_gru, config.no_txtnorm
        )

    @property
    def attention(self) -> AttentionConfig:
        return self.config.attention

    def encode_images(self, images: Tensor) -> Tensor:
        return self.img_enc(images)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return self.txt_enc(tokens, lengths)

    def score(self, words: Tensor, lengths: Tensor, regions: Tensor, gram: Tensor | None = None) -> Tensor:
        """(n_caps, n_imgs) scores of encoded captions against encoded images."""
        return score_block(self.attention, words, lengths, regions, gram)


class Ensemble:
    """Averages the score matrices of several matchers on raw inputs.

    Each member encodes with its own weights; ``score_raw`` returns the mean of the members'
    (n_caps, n_imgs) matrices, as SCAN's published ensemble numbers do.
    """

    def __init__(self, members: list[ScanModel]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = members

    @torch.no_grad()
    def score_raw(self, images: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        total = None
        for m in self.members:
            s = m.score(m.encode_captions(tokens, lengths), lengths, m.encode_images(images))
            total = s if total is None else total + s
        return total / len(self.members)
