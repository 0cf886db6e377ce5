"""When a streamed answer ends early: it has started to loop.

Greedy decoding with a 135M model drifts into loops on vague questions ("commands that produce
commands that produce commands ..."). transformers' no-repeat n-gram guard (config.no_repeat_ngram)
forbids exact token repeats, so the loop comes back with other tokens for the same words. Here a
phrase of PHRASE words that comes back for the REPEATS-th time ends the answer, just before it.
"""
from __future__ import annotations

import re

PHRASE = 4
REPEATS = 3
_WORD = re.compile(r"\w+")


def loop_start(text: str, phrase: int = PHRASE, repeats: int = REPEATS) -> int | None:
    """Where the first phrase of `phrase` words that text says `repeats` times starts for that time, or None.

    Only complete words count (a word at the very end may still grow), compared ignoring case.
    """
    words = [(m.start(), m.group().lower()) for m in _WORD.finditer(text)]
    if words and words[-1][0] + len(words[-1][1]) == len(text):
        words.pop()
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - phrase + 1):
        key = tuple(w for _, w in words[i: i + phrase])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == repeats:
            return words[i][0]
    return None


def settled(text: str, phrase: int = PHRASE) -> int:
    """How much of a growing text can be shown: all but its last `phrase` words, which a loop found later
    may still take back (its start lies within them)."""
    starts = [m.start() for m in _WORD.finditer(text)]
    return starts[-phrase - 1] if len(starts) > phrase else 0
