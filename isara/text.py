"""The one definition of a "word" and of a normalised text, shared by the seed checks, the generate filters and the
data card. A contract: imports nothing from isara.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """Lowercase word tokens: runs of letters/digits/underscore, with inner apostrophes kept ("don't").

    Punctuation and whitespace separate tokens and are dropped. It serves the repetition and ROUGE-L filters,
    exact-duplicate detection (seeds and generated questions), distinct-n and the data card's word counts.
    """
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    """What two texts must share to count as the same (exact duplicates): their words, single-spaced."""
    return " ".join(words(text))
