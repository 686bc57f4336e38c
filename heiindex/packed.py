"""Caption word features without padding.

What this module is for: holding the word features of many captions as one flat
``(total_words, d)`` tensor plus offsets, so that a split's captions cost their real words in
memory rather than ``n_caps x longest caption``. COCO captions average ~13 tokens but reach 52
in the 5K test set: padded, 25,000 captions at d = 1024 take 5.3 GB; packed, 1.4 GB.

The attention scorers accept a ``PackedWords`` wherever they accept padded words; they only
ever ask for a gathered, zero-padded block of some captions (``gather``).
What it must not do: score, encode, or read files.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PackedWords", "integer_tensor", "word_mask"]


class PackedWords:
    """Word features of ``n`` captions, caption ``i`` being rows ``offsets[i]:offsets[i + 1]``.

    ``shape`` is that of the equivalent padded tensor, ``(n, longest, d)``.
    """

    def __init__(self, flat: Tensor, lengths: Tensor) -> None:
        if not isinstance(flat, Tensor) or flat.dim() != 2:
            raise ValueError(f"flat word features must be a 2-D tensor (total_words, d), got {_shape(flat)}")
        lengths = _checked_lengths(lengths, flat.device)
        total = int(lengths.sum())
        if total != flat.shape[0]:
            raise ValueError(f"lengths sum to {total} words but flat has {flat.shape[0]} rows")
        # One zero row after the last word: gathers point padding there and come back zeroed.
        self._adopt(torch.cat([flat, flat.new_zeros((1, flat.shape[1]))]), lengths)

    @classmethod
    def _wrap(cls, rows: Tensor, lengths: Tensor) -> PackedWords:
        """The captions of ``lengths`` over ``rows`` ``(total_words + 1, d)``, whose last row is
        already the zero row: taken as they are, not copied (for the methods here and readers in
        this package that build that tensor anyway; the constructor checks, this does not)."""
        words = cls.__new__(cls)
        words._adopt(rows, lengths)
        return words

    def _adopt(self, rows: Tensor, lengths: Tensor) -> None:
        self._flat = rows
        self.lengths = lengths
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.long, device=rows.device)
        self.offsets[1:] = torch.cumsum(lengths, 0)
        longest = int(lengths.max()) if lengths.numel() else 0
        self.shape = torch.Size((len(lengths), longest, rows.shape[1]))

    @classmethod
    def from_padded(cls, words: Tensor, lengths: Tensor) -> PackedWords:
        """Pack padded words ``(n, L, d)``; whatever sits beyond each length is dropped."""
        if not isinstance(words, Tensor) or words.dim() != 3:
            raise ValueError(f"expected words (n, L, d), got {_shape(words)}")
        lengths = _checked_lengths(lengths, words.device)
        if lengths.shape != (words.shape[0],):
            raise ValueError(f"expected words (n, L, d) and lengths (n,), got {_shape(words)} and {_shape(lengths)}")
        if lengths.numel() and int(lengths.max()) > words.shape[1]:
            raise ValueError(f"lengths must lie in [1, {words.shape[1]}]")
        real = word_mask(lengths, words.shape[1]).view(-1).nonzero().squeeze(1)
        if words.requires_grad and torch.is_grad_enabled():  # autograd has no out= index_select
            return cls(words.reshape(-1, words.shape[2]).index_select(0, real), lengths)
        rows = words.new_zeros((len(real) + 1, words.shape[2]))
        torch.index_select(words.reshape(-1, words.shape[2]), 0, real, out=rows[:-1])  # no second copy
        return cls._wrap(rows, lengths)

    @property
    def flat(self) -> Tensor:
        """The ``(total_words, d)`` word features."""
        return self._flat[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self._flat.dtype

    @property
    def device(self) -> torch.device:
        return self._flat.device

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, *args, **kwargs) -> PackedWords:
        """A copy on another device or dtype (``Tensor.to`` arguments); as ``Tensor.to``, the
        same words (not copied) where nothing changes."""
        rows = self._flat.to(*args, **kwargs)
        return PackedWords._wrap(rows, self.lengths.to(rows.device))

    def own_lengths(self, lengths: Tensor) -> Tensor:
        """``self.lengths``, where ``lengths`` (given beside these words, as the scorers and the
        hash module take them) are the same; ``ValueError`` naming the first difference else."""
        if lengths is self.lengths:
            return self.lengths
        given = integer_tensor("lengths", lengths, self.device)
        if given.shape != self.lengths.shape:
            raise ValueError(
                f"lengths (shape {tuple(given.shape)}) differ from the packed words' own lengths "
                f"(shape {tuple(self.lengths.shape)})"
            )
        if not torch.equal(given, self.lengths):
            i = int((given != self.lengths).nonzero()[0, 0])
            raise ValueError(
                f"lengths differ from the packed words' own lengths: caption {i} has "
                f"{int(self.lengths[i])} words, lengths say {int(given[i])}"
            )
        return self.lengths

    def gather(self, rows: Tensor, length: int) -> Tensor:
        """Words of captions ``rows`` as a ``(len(rows), length, d)`` tensor, zero beyond each
        caption's end (a caption longer than ``length`` is cut)."""
        return self.take(self.gather_index(rows, length))

    def gather_index(self, rows: Tensor, length: int) -> Tensor:
        """``(len(rows), length)`` row numbers for ``take``: each caption's words, then the zero
        row. Computed once, sliced many times: a scorer gathers a chunk's captions group by group."""
        pos = torch.arange(length, device=self.device).unsqueeze(0)
        lens = self.lengths.index_select(0, rows).unsqueeze(1)
        return torch.where(pos < lens, self.offsets.index_select(0, rows).unsqueeze(1) + pos, self._flat.shape[0] - 1)

    def take(self, index: Tensor, out: Tensor | None = None) -> Tensor:
        """The word rows ``index`` (from ``gather_index``) as an ``(*index.shape, d)`` tensor,
        written into ``out`` (``(index.numel(), d)``, contiguous) where given."""
        flat_index = index.reshape(-1)
        if out is None:
            return self._flat.index_select(0, flat_index).view(*index.shape, -1)
        torch.index_select(self._flat, 0, flat_index, out=out)
        return out.view(*index.shape, -1)

    def select(self, rows: Tensor) -> PackedWords:
        """The captions ``rows``, in that order, as a new ``PackedWords`` (their words copied), or
        these words themselves, not copied, where ``rows`` is every caption in order."""
        rows = torch.as_tensor(rows, device=self.device).long()
        if len(rows) == len(self) and torch.equal(rows, torch.arange(len(self), device=self.device)):
            return self
        lens = self.lengths.index_select(0, rows)
        starts = self.offsets.index_select(0, rows)
        first_of_row = torch.cumsum(lens, 0) - lens  # where each caption starts in the selection
        pos = torch.arange(int(lens.sum()), device=self.device)
        idx = torch.repeat_interleave(starts - first_of_row, lens) + pos
        idx = torch.cat([idx, idx.new_full((1,), self._flat.shape[0] - 1)])  # and the zero row
        return PackedWords._wrap(self._flat.index_select(0, idx), lens)

    @classmethod
    def cat(cls, parts: list[PackedWords]) -> PackedWords:
        """The captions of ``parts`` one after another."""
        if not parts:
            raise ValueError("nothing to concatenate")
        zero = parts[0]._flat[-1:]
        return cls._wrap(torch.cat([*(p.flat for p in parts), zero]), torch.cat([p.lengths for p in parts]))

    def padded(self) -> Tensor:
        """The equivalent zero-padded ``(n, longest, d)`` tensor."""
        return self.gather(torch.arange(len(self), device=self.device), self.shape[1])


def word_mask(lengths: Tensor, width: int) -> Tensor:
    """``(n, width)`` bool, True at the real words of captions with ``lengths`` (n,)."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def integer_tensor(name: str, x, device: torch.device | None = None) -> Tensor:
    """``x`` as a long tensor; floats and bools are refused (a length of 2.7 or an index of 1.9 is
    a caller's slip, not a number to cut down)."""
    t = torch.as_tensor(x, device=device)
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must hold whole numbers (an integer dtype), got {t.dtype}")
    return t.long()


def _checked_lengths(lengths, device: torch.device) -> Tensor:
    lengths = integer_tensor("lengths", lengths, device)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 1:
        raise ValueError("every caption must have at least one word (lengths >= 1)")
    return lengths


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
