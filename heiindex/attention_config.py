"""The settings of one SCAN scoring function: which side attends, the feature norm, the
aggregation and the two temperatures.

What this module is for: ``AttentionConfig`` and the values its fields take, read without torch
(``heiindex verify`` compares an index's recorded settings with its matcher's config.json).
What it must not do: score (``heiindex.attention`` does, and exports these names too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .settings import SettingError, settle

__all__ = ["AGGREGATIONS", "ATTENTION_FIELDS", "CROSS_ATTN", "RAW_FEATURE_NORMS", "AttentionConfig"]

RAW_FEATURE_NORMS = (
    "clipped_l2norm",
    "l2norm",
    "softmax",
    "clipped_l1norm",
    "l1norm",
    "clipped",
    "no_norm",
)
AGGREGATIONS = ("lse", "mean", "max", "sum")
CROSS_ATTN = ("t2i", "i2t")


@dataclass(frozen=True)
class AttentionConfig:
    """One SCAN cross-attention scoring function.

    ``cross_attn``: ``"t2i"`` (words attend over regions, aggregate over words) or ``"i2t"``
    (regions attend over words, aggregate over regions). This is a property of the model, not
    of the retrieval direction: either can rank images for a caption or captions for an image.
    """

    cross_attn: str = "t2i"
    raw_feature_norm: str = "clipped_l2norm"
    agg: str = "lse"
    lambda_lse: float = 6.0
    lambda_softmax: float = 9.0

    def __post_init__(self) -> None:
        if self.cross_attn not in CROSS_ATTN:
            raise SettingError("cross_attn", f"cross_attn must be one of {CROSS_ATTN}, got {self.cross_attn!r}")
        if self.raw_feature_norm not in RAW_FEATURE_NORMS:
            raise SettingError(
                "raw_feature_norm",
                f"raw_feature_norm must be one of {RAW_FEATURE_NORMS}, got {self.raw_feature_norm!r}",
            )
        if self.agg not in AGGREGATIONS:
            raise SettingError("agg", f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        settle(self, "lambda_softmax", above=0)
        settle(self, "lambda_lse", above=0 if self.agg == "lse" else None)

    def to_dict(self) -> dict:
        return asdict(self)


ATTENTION_FIELDS = tuple(AttentionConfig.__dataclass_fields__)  # what config.json's model.attention may hold
