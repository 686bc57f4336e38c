"""The word vocabulary: SCAN's JSON format, building one from captions, encoding tokens.

SCAN's vocab JSON is ``{"word2idx": {...}, "idx2word": {"0": ...}, "idx": n}`` with the specials
``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3. Encoded captions are wrapped in
``<start>`` ... ``<end>`` as SCAN does. Unknown words map to ``<unk>`` and are reported back.
What this module must not do: tokenise (``heiindex.tokenizer``) or read caption files.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_file
from .errors import DataError, counted, name_some
from .tokenizer import tokenize

__all__ = ["END", "MAX_CAPTION_WORDS", "PAD", "SPECIALS", "START", "UNK", "Encoded", "Vocab"]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
# Words (tokens) a caption may have, stored or asked: captions are encoded in batches padded to
# the longest, so one line of thousands of words took gigabytes (a query file: 4.5 GB where 256
# short lines take 0.6; an ingested one made build run out of memory). COCO's captions have at
# most 51 words (53 tokens with <start> and <end>, in its dev split).
MAX_CAPTION_WORDS = 128


@dataclass
class Encoded:
    """One caption as ids: ``ids`` includes ``<start>``/``<end>``; ``unknown`` lists OOV words."""

    ids: list[int]
    tokens: list[str]
    unknown: list[str] = field(default_factory=list)


class Vocab:
    """An ordered word list; the index of a word is its id."""

    def __init__(self, words: list[str]) -> None:
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat a word")
        self.words = list(words)
        self.word2idx = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    @property
    def checksum(self) -> str:
        return hashlib.sha256("\n".join(self.words).encode()).hexdigest()

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> Vocab:
        """SCAN's rule: the specials, then every token seen at least ``min_count`` times.

        Words are ordered by first appearance, so the result does not depend on hash seeds.
        """
        counts: Counter[str] = Counter()
        for text in captions:
            counts.update(tokenize(text))
        kept = [w for w, c in counts.items() if c >= min_count and w not in SPECIALS]
        return cls(list(SPECIALS) + kept)

    # -- SCAN JSON ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a SCAN vocab JSON; any malformation raises ``DataError`` naming the field."""
        path = Path(path)
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise DataError(path, "vocab file not found") from None
        except OSError as exc:  # a folder, an unreadable file
            raise DataError(path, f"cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except ValueError as exc:  # a text file given for the vocabulary said "not valid UTF-8 JSON"
            raise DataError(path, f"not valid JSON ({exc})") from None  # (or an integer of 4,300+ digits)
        except RecursionError:  # arrays nested 100,000 deep: a traceback
            raise DataError(path, "not valid JSON (nested too deeply to read)") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("word2idx"), dict):
            raise DataError(path, 'expected an object with a "word2idx" object (SCAN vocab format)')
        w2i = raw["word2idx"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in w2i.values()):
            raise DataError(path, 'field "word2idx": every value must be an integer id')
        n = len(w2i)
        if sorted(w2i.values()) != list(range(n)):
            times = Counter(w2i.values())
            wrong = [
                f"{what} {name_some([str(i) for i in found])}"
                for what, found in (
                    ("missing:", sorted(set(range(n)) - set(times))),
                    ("out of range:", sorted(i for i in times if not 0 <= i < n)),
                    ("repeated:", sorted(i for i, c in times.items() if c > 1)),
                )
                if found
            ]
            raise DataError(
                path,
                f'field "word2idx": the ids of its {counted(n, "word")} must be 0 to {n - 1}, each once '
                f"({'; '.join(wrong)})",
            )
        if "idx" in raw and raw["idx"] != n:
            raise DataError(path, f'field "idx" is {raw["idx"]!r}, expected {n} (the number of words)')
        words = [""] * n
        for w, i in w2i.items():
            words[i] = w
        if tuple(words[:4]) != SPECIALS:
            raise DataError(path, f'field "word2idx": ids 0-3 must be {list(SPECIALS)}, got {words[:4]}')
        i2w = raw.get("idx2word")
        if i2w is not None:
            if not isinstance(i2w, dict) or any(i2w.get(str(i)) != w for i, w in enumerate(words)):
                raise DataError(path, 'field "idx2word" disagrees with "word2idx"')
        return cls(words)

    def save(self, path: str | Path) -> None:
        """Write SCAN's JSON format, atomically."""
        with atomic_file(Path(path)) as tmp:
            tmp.write_text(self.to_json())

    def to_json(self) -> str:
        """The vocabulary in SCAN's JSON format, as ``save`` writes it."""
        data = {
            "word2idx": self.word2idx,
            "idx2word": {str(i): w for i, w in enumerate(self.words)},
            "idx": len(self.words),
        }
        return json.dumps(data, ensure_ascii=False)

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> Encoded:
        """Tokenise ``text`` and map it to ids wrapped in ``<start>``/``<end>``."""
        tokens = tokenize(text)
        unk = self.word2idx[UNK]
        ids = [self.word2idx[START]]
        unknown: list[str] = []
        for tok in tokens:
            i = self.word2idx.get(tok, unk)
            if i == unk:
                unknown.append(tok)
            ids.append(i)
        ids.append(self.word2idx[END])
        return Encoded(ids=ids, tokens=tokens, unknown=unknown)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]
