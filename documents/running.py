"""A printed book's running heads and feet, and the page numbers they print: dropped from the text, kept as
the pages' printed numbers (what a citation shows: "p. 56", not the PDF's 77th page)."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


EDGE_LINES = 3   # a page's running lines sit among its first and last three lines


GAP = 4          # pages without a number that a run of numbered pages may span (chapter openings, figures)
RUN = 3          # pages a run needs: fewer are numbers in the text, not a book's numbering


@dataclass
class Numbering:
    """How a book numbers its pages, as its running heads and feet show it, run by run.

    A running head or foot prints the page's number first or last ("56 Concepts \\ §4", "Descriptions of the
    commands 3", "- 12 -"): each page's offset d = its physical number - the printed one. A book keeps one
    offset over a run of pages and changes it where a page is inserted unnumbered (a plate, a map, a merged
    note), so the offsets are found per run, never one for the whole book. A line that counts sheets, the
    PDF's own page numbers ("TeX for the Impatient No 84": offset 0 where it starts), is used only where the
    book has no other numbering.
    """

    offsets: list[int]              # every offset that runs over RUN pages or more (their lines are running lines)
    pages: list[int | None]         # each page's offset; None: it prints no number of the book's


def numbering(pages: Sequence[str]) -> Numbering:
    """The book's numbering from its pages' texts (Numbering)."""
    found: list[list[tuple[int, str]]] = []          # each page's (offset, line key) from its edge lines
    for i, page in enumerate(pages):
        lines = [line for line in page.split("\n") if line.strip()]
        edge = lines[:EDGE_LINES] + lines[-EDGE_LINES:] if len(lines) > 2 * EDGE_LINES else lines
        found.append([(i + 1 - n, _key(line)) for line in edge for n in _edge_numbers(line)])
    first: dict[str, int] = {}                         # each line key's offset on the first page it numbers
    for marks in found:
        for d, k in marks:
            first.setdefault(k, d)
    sheets = {k for k, d in first.items() if d == 0}
    book = [{d for d, k in marks if k not in sheets} for marks in found]
    runs = _runs(book)
    if not runs:                                        # no numbering but the sheets': theirs, run by run
        book = [{d for d, _ in marks} for marks in found]
        runs = _runs(book)
    every = _runs([{d for d, _ in marks} for marks in found])
    return Numbering(sorted({d for d, _, _ in every}), _per_page(len(pages), book, runs))


def _runs(offsets: list[set[int]]) -> list[tuple[int, int, int]]:
    """(offset, first page, last page) of each run: RUN or more pages showing one offset, GAP apart at most."""
    at: dict[int, list[int]] = {}
    for i, ds in enumerate(offsets):
        for d in ds:
            at.setdefault(d, []).append(i)
    runs = []
    for d, where in at.items():
        start = prev = where[0]
        count = 1
        for i in where[1:] + [None]:
            if i is not None and i - prev <= GAP + 1:
                prev, count = i, count + 1
                continue
            if count >= RUN:
                runs.append((d, start, prev))
            if i is not None:
                start = prev = i
                count = 1
    return sorted(runs, key=lambda r: r[1])


def _per_page(n: int, offsets: list[set[int]], runs: list[tuple[int, int, int]]) -> list[int | None]:
    """Each page's offset: its run's (the longest run covering it, the one it shows itself first); a page
    between two runs continues the one before while its number stays below the next run's first; pages before
    the first run print none; after the last, it goes on."""
    out: list[int | None] = [None] * n
    for i in range(n):
        covering = sorted((r for r in runs if r[1] <= i <= r[2]), key=lambda r: (r[0] not in offsets[i], r[1] - r[2]))
        if covering:
            out[i] = covering[0][0]
    last = None
    for i in range(n):
        if out[i] is not None:
            last = i
            continue
        if last is None:
            continue
        nxt = next((j for j in range(i + 1, n) if out[j] is not None), None)
        d = out[last]
        if nxt is None or i + 1 - d < nxt + 1 - out[nxt]:
            out[i] = d
    return out


def _edge_numbers(line: str) -> set[int]:
    """The integers a line starts or ends with (what a running head's page number looks like)."""
    words = line.replace("\u2013", " ").replace("-", " ").split()
    return {int(w) for w in (words[:1] + words[-1:]) if w.isdigit() and len(w) <= 5}


def strip_running_lines(pages: Sequence[str], offsets: Sequence[int] | None = None) -> list[str]:
    """Drop running heads and feet: the lines at a page's top and bottom (up to EDGE_LINES each, from the
    edge inwards) that repeat on many pages with only their digits changed, or that carry the page's number.

    Repeated: on >= 3 pages and >= half of all pages, or of the odd or the even pages (a book's verso and
    recto heads differ). Numbered: the line starts or ends with the page's number under one of `offsets`
    (Numbering.offsets, found when not given), so a head that names the chapter goes too.
    """
    offsets = numbering(pages).offsets if offsets is None else offsets
    split = [[line for line in page.split("\n")] for page in pages]
    for lines in split:  # blank edge lines would hide the real header/footer
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()

    with_text = [i for i, lines in enumerate(split) if lines]
    seen: Counter[tuple[str, int]] = Counter()          # (key, parity) -> pages whose edge lines hold it
    for i in with_text:
        lines = split[i]
        for k in {_key(line) for line in lines[:EDGE_LINES] + lines[-EDGE_LINES:]}:
            seen[k, i % 2] += 1
    halves = [sum(1 for i in with_text if i % 2 == parity) for parity in (0, 1)]

    def repeated(k: str) -> bool:
        both = seen[k, 0] + seen[k, 1]
        return both >= 3 and (2 * both >= len(with_text) or any(
            seen[k, parity] >= 3 and 2 * seen[k, parity] >= halves[parity] for parity in (0, 1)))

    def running(line: str, physical: int) -> bool:
        return repeated(_key(line)) or any(physical - n in offsets for n in _edge_numbers(line))

    for i in with_text:
        lines = split[i]
        for end in (0, -1):
            for _ in range(EDGE_LINES):
                if lines and running(lines[end], i + 1):
                    lines.pop(end)
                else:
                    break
    return ["\n".join(lines) for lines in split]


def printed_numbers(offsets: Sequence[int | None], labels: Sequence[str] | None = None) -> list[str | None]:
    """Each page's printed number: the PDF's /PageLabels where it has them, else the number its running lines
    show (Numbering.pages; offset 0 is the PDF's own numbering, so no number of the book's), else None."""
    if labels is not None:
        return [str(label) for label in labels]
    return [str(i + 1 - d) if d and i + 1 > d else None for i, d in enumerate(offsets)]


def _key(line: str) -> str:
    """A line with its digits as #: a running line's shape, the same on every page it runs over."""
    return re.sub(r"\d+", "#", " ".join(line.split()))


def page_label(physical: int, printed: str | None, numbered: bool) -> str:
    """A PDF page's citation label: "p. 56" with its printed number, "PDF p. 5" for a page without one in a
    book whose other pages have one (front matter), "p. 5" where the book prints none."""
    if printed:
        return f"p. {printed}"
    return f"PDF p. {physical}" if numbered else f"p. {physical}"
