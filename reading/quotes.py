"""The sentence an answer quotes: the document's own words, chosen by the question's attention.

The question focus weighs every token of the best evidence spans by the attention the question's
words gave it in the voting layers (Focus.weigh_tokens). Here the document's characters give the
sentence bounds, a sentence weighs what its tokens got, and the best one, with the sentence beside
it, is shown verbatim with its page. The 135M model's answer is right less often than this sentence holds the answer
(bench/results/questions-cpu.md): the reader sees the book's words first.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from storage.lexical import STOPWORDS

MAX_SENTENCE = 400      # characters; a longer run without a full stop (a listing, a table) is cut at line ends
MAX_QUOTE = 300         # characters; two sentences longer than this are quoted one
PRONOUNS = ("it ", "its ", "this ", "these ", "they ", "that ", "such ", "there ")
WORD_MATCH = 1.0        # weight of the question's content words in a sentence, beside its share of the attention
# Weight of its cosine with the question (a sentence encoder's), where there is one. On the quotes' candidates
# for all 136 facts of lshort and TeX for the Impatient, asked paraphrased, the chosen sentence held the answer
# for 36 with 3, 31 with 2 and 22 without; in the book's words 130 with 3 and 131 without
# (bench/results/meaning-cpu.md).
MEANING = 3.0
REACH = 600             # characters looked at beyond a span's ends for the sentences that straddle them
# Words a full stop follows without ending a sentence.
ABBREVIATIONS = frozenset("e.g i.e etc cf vs fig figs eq eqs no nos p pp ch sec vol ed al dr mr mrs ms st approx".split())
_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s)")
_WORD_BEFORE = re.compile(r"([^\W\d_]+(?:\.[^\W\d_]+)*)\.$")


@dataclass
class Quote:
    text: str                   # verbatim, its line breaks as spaces
    page: str                   # the citation label of the page it starts on: "p. 56"
    physical: int | None        # that page's number in the file (None for documents read before pages had it)
    chars: tuple[int, int]      # [start, end) in the document's text
    span: int                   # the evidence span it was found in
    weight: float               # its score: share of the question's attention, plus of the question's words

    def to_dict(self) -> dict:
        return {**asdict(self), "chars": list(self.chars)}


def sentences(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Sentence bounds [a, b) covering text[lo:hi], each a stretch of the text's own characters.

    A sentence ends at . ! ? (not after an abbreviation or a single letter: "e.g.", "p. 5", "D. Knuth"),
    at a blank line, and after a short line without a full stop when a capital starts the next (a
    heading). Leading and trailing spaces are outside the bounds.
    """
    blank = text.rfind("\n\n", 0, lo)
    start = max(0 if blank < 0 else blank + 2, lo - REACH)
    stop = text.find("\n\n", hi)
    stop = min(len(text), hi + REACH) if stop < 0 else min(stop, hi + REACH)
    cuts = {start, stop}
    for m in _END.finditer(text, start, stop):
        word = _WORD_BEFORE.search(text, max(start, m.start() - 40), m.start() + 1)
        if m.group()[0] == "." and word and (word.group(1).lower() in ABBREVIATIONS or len(word.group(1)) == 1):
            continue
        cuts.add(m.end())
    for m in re.finditer(r"\n", text[start:stop]):
        at = start + m.start()
        line = text[text.rfind("\n", 0, at) + 1: at].strip()
        heading = line and len(line) < 45 and line[-1] not in ".,;:!?-" and text[at + 1: at + 2][:1].isupper()
        if "\n\n" == text[at: at + 2] or heading:
            cuts.add(at)
    points = sorted(cuts)
    # A list's number ("1.", "2)") starts a sentence rather than being one.
    points = [p for i, p in enumerate(points) if i in (0, len(points) - 1)
              or not re.fullmatch(r"\d{1,3}[.)]", text[points[i - 1]: p].strip())]
    bounds = []
    for a, b in zip(points, points[1:]):
        bounds.extend(_split_long(text, a, b))
    return [(a, b) for a, b in (_strip(text, a, b) for a, b in bounds) if a < b and b > lo and a < hi]


def _split_long(text: str, a: int, b: int) -> list[tuple[int, int]]:
    """[a, b) in pieces of at most MAX_SENTENCE characters, cut at the last line end (else space) before it."""
    pieces = []
    while b - a > MAX_SENTENCE:
        cut = text.rfind("\n", a + 1, a + MAX_SENTENCE)
        if cut < 0:
            cut = text.rfind(" ", a + 1, a + MAX_SENTENCE)
        if cut < 0:
            cut = a + MAX_SENTENCE
        pieces.append((a, cut))
        a = cut
    return pieces + [(a, b)]


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def choose(token_votes: dict[int, torch.Tensor], spans: Sequence[dict], text: str, starts: Sequence[int],
           pages: Sequence[dict], question: str = "",
           similar: Callable[[list[str]], list[float]] | None = None) -> Quote | None:
    """The sentence of the evidence spans that the question points to, with the sentence beside it (_pair).

    A sentence scores its tokens' share of the question's attention (the words' share less the template's,
    as a part of what all the candidate sentences drew) plus the share of the question's content words it
    holds (WORD_MATCH times it). The attention alone puts the wrong sentence of the right passage first
    where it spreads over the passage: with the words the quotes held the answer for 78 of 83 questions in
    the book's words on lshort.pdf and 53 of 53 on TeX for the Impatient, against 75 and 50 without
    (bench/results/questions-cpu.md).

    token_votes: span -> [2, n] (Answer.token_votes): each token's share of the words' attention and of the
    template's. spans: Library.spans rows; starts: where each token starts in text (Library.text); pages:
    Library.pages rows.
    """
    found = candidates(token_votes, spans, text, starts)
    if not found:
        return None
    score = scores(found, text, question, similar)
    best = max(range(len(found)), key=lambda i: score[i])
    a, b = _pair(text, found, best)
    page = page_of(pages, bisect.bisect_right(starts, a) - 1)
    return Quote(" ".join(text[a:b].split()), page["label"], page.get("physical"), (a, b), found[best][3],
                 score[best])


def candidates(token_votes: dict[int, torch.Tensor], spans: Sequence[dict], text: str,
               starts: Sequence[int]) -> list[tuple[int, int, float, int]]:
    """(start, end, attention, span) of each sentence of the weighed spans, in order: its characters [start,
    end) and the share of the question's attention its tokens got (the words' less the template's)."""
    weight: dict[int, float] = {}          # token position -> the words' share less the template's
    span_of: dict[int, int] = {}
    for span, votes in sorted(token_votes.items()):
        if span < len(spans):
            first = spans[span]["start_token"]
            for j, w in enumerate((votes[0] - votes[1]).tolist()):
                weight[first + j], span_of[first + j] = w, span
    found: list[tuple[int, int, float, int]] = []
    for lo, hi in _runs(sorted(weight)):
        for a, b in sentences(text, starts[lo], _end_char(text, starts, hi - 1)):
            # A token belongs to the sentence its first character is in.
            inside = [t for t in range(bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)) if t in weight]
            if inside and (not found or found[-1][:2] != (a, b)):
                found.append((a, b, sum(weight[t] for t in inside), span_of[inside[0]]))
    return found


def scores(found: list[tuple[int, int, float, int]], text: str, question: str,
           similar: Callable[[list[str]], list[float]] | None = None) -> list[float]:
    """Each candidate sentence's score: its part of the attention all the candidates drew, plus WORD_MATCH
    times the share of the question's content words it holds, plus MEANING times its cosine with the
    question (where `similar` gives one)."""
    total = sum(max(0.0, f[2]) for f in found) or 1.0
    asked = content_words(question)
    score = [f[2] / total + WORD_MATCH * len(asked & content_words(text[f[0]: f[1]])) / max(1, len(asked))
             for f in found]
    if similar is not None:
        score = [x + MEANING * c for x, c in zip(score, similar([" ".join(text[a:b].split()) for a, b, *_ in found]))]
    return score


def content_words(text: str) -> set[str]:
    """A text's words that say what it is about, cut to their first five letters ("commands" -> "comma")."""
    return {w[:5] for w in re.findall(r"[^\W_]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def _pair(text: str, found: list[tuple[int, int, float, int]], i: int) -> tuple[int, int]:
    """The best sentence with the one before it when it opens on a pronoun ("It separates the individual
    commands."), else with the one after it: a question echoes one sentence and its answer is often the
    next ("... is not satisfactory. At least 8 are needed."). On bench.questions this lifted the quotes that
    hold the answer from 64 to 75 of 83 questions in the book's words. Alone when the two pass MAX_QUOTE."""
    a, b = found[i][:2]
    before = i > 0 and _adjacent(text, found[i - 1], found[i]) and text[a:b].lower().startswith(PRONOUNS)
    j = i - 1 if before else i + 1
    if j >= len(found) or not _adjacent(text, found[min(i, j)], found[max(i, j)]):
        return a, b
    a2, b2 = min(a, found[j][0]), max(b, found[j][1])
    return (a2, b2) if b2 - a2 <= MAX_QUOTE else (a, b)


def _adjacent(text: str, first: tuple, second: tuple) -> bool:
    """Two sentences one after the other in one paragraph."""
    between = text[first[1]: second[0]]
    return 0 <= len(between) < 5 and "\n\n" not in between


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted token positions as runs of consecutive ones [lo, hi)."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [(a, b) for a, b in runs]


def _end_char(text: str, starts: Sequence[int], token: int) -> int:
    return starts[token + 1] if token + 1 < len(starts) else len(text)


def page_of(pages: Sequence[dict], token: int) -> dict:
    """The page holding a token (pages rows, in order, by start_token)."""
    i = bisect.bisect_right([p["start_token"] for p in pages], token) - 1
    return pages[max(0, i)]
