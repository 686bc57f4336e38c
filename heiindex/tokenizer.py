"""Caption tokenisation compatible with SCAN's vocabulary files.

SCAN lower-cases a caption and splits it with NLTK's ``word_tokenize``, which first splits
sentences with the punkt model (a download) and then runs the Treebank-style word tokenizer on
each sentence. We use the same word tokenizer (``NLTKWordTokenizer``, rules only, no data
files) and replace punkt by the one thing it does on captions: a period that ends a sentence
inside the line becomes its own token. What this module must not do: map words to ids (that is
``heiindex.vocab``).

SCAN's vocabulary files were built with the NLTK of 2017-2018, whose word tokenizer differs
from today's in two rules that captions reach: it left a run of two periods on its word
("table.." one token) and did not split a leading apostrophe ("'stop" one token). We follow
today's rules, as SCAN's own code does when run with a current NLTK (``tests/test_tokenizer.py``
pins both).
"""

from __future__ import annotations

import re
from functools import lru_cache

from nltk.tokenize import NLTKWordTokenizer

__all__ = ["tokenize"]

# A period glued to a word and followed by more text ("grass. a dog"): punkt would end the
# sentence there, so the period becomes a token. Abbreviations with inner periods ("u.s.") and
# numbers ("1.5") keep theirs, and so do the abbreviations punkt knows ("st.", "dr.") and initials.
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "ave", "jr", "sr", "vs", "mt")
_SENTENCE_END = re.compile(
    "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS)  # punkt keeps "st." / "dr." whole
    + r"(?<!\b[^\W\d_])"  # and initials ("w.")
    + r"(?<!\.[^\W\d_])(?<=[^\W\d_)\]\"'])\.(?=\s+\S)"  # letters: any alphabet's ("café. a dog")
)


@lru_cache(maxsize=1)
def _word_tokenizer() -> NLTKWordTokenizer:
    return NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of one caption, as SCAN's vocabulary expects them.

    >>> tokenize("A dog's toy, on the grass.")
    ['a', 'dog', "'s", 'toy', ',', 'on', 'the', 'grass', '.']
    """
    text = _SENTENCE_END.sub(" .", text.lower().strip())
    return _word_tokenizer().tokenize(text)
