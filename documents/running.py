"""A printed book's running heads and feet, and the page numbers they print: dropped from the text, kept as
the pages' printed numbers (what a citation shows: "p. 56", not the PDF's 77th page)."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence


EDGE_LINES = 3   # a page's running lines sit among its first and last three lines


def running_offsets(pages: Sequence[str]) -> list[int]:
    """Offsets d (physical page - printed number) that the pages' edge lines show, most pages first.

    A running head or foot prints the page's number first or last ("56 Concepts \\ §4", "Descriptions
    of the commands 3", "- 12 -"). Where one offset recurs on >= a quarter of the pages with text (and on
    >= 3), the numbers are the book's own page numbers, d pages after the PDF's. Draft marks with the
    PDF's own number ("TeX for the Impatient No 77") give offset 0.
    """
    counts: Counter[int] = Counter()
    texts = 0
    for i, page in enumerate(pages):
        lines = [line for line in page.split("\n") if line.strip()]
        texts += bool(lines)
        edge = lines[:EDGE_LINES] + lines[-EDGE_LINES:] if len(lines) > 2 * EDGE_LINES else lines
        counts.update({i + 1 - n for line in edge for n in _edge_numbers(line)})
    need = max(3, texts // 4)
    return [d for d, c in counts.most_common() if c >= need]


def _edge_numbers(line: str) -> set[int]:
    """The integers a line starts or ends with (what a running head's page number looks like)."""
    words = line.replace("\u2013", " ").replace("-", " ").split()
    return {int(w) for w in (words[:1] + words[-1:]) if w.isdigit() and len(w) <= 5}


def strip_running_lines(pages: Sequence[str], offsets: Sequence[int] | None = None) -> list[str]:
    """Drop running heads and feet: the lines at a page's top and bottom (up to EDGE_LINES each, from the
    edge inwards) that repeat on many pages with only their digits changed, or that carry the page's number.

    Repeated: on >= 3 pages and >= half of all pages, or of the odd or the even pages (a book's verso and
    recto heads differ). Numbered: the line starts or ends with the page's number under one of `offsets`
    (running_offsets, computed when not given), so a head that names the chapter goes too.
    """
    offsets = running_offsets(pages) if offsets is None else offsets
    split = [[line for line in page.split("\n")] for page in pages]
    for lines in split:  # blank edge lines would hide the real header/footer
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()

    def key(line: str) -> str:
        return re.sub(r"\d+", "#", " ".join(line.split()))

    with_text = [i for i, lines in enumerate(split) if lines]
    seen: Counter[tuple[str, int]] = Counter()          # (key, parity) -> pages whose edge lines hold it
    for i in with_text:
        lines = split[i]
        for k in {key(line) for line in lines[:EDGE_LINES] + lines[-EDGE_LINES:]}:
            seen[k, i % 2] += 1
    halves = [sum(1 for i in with_text if i % 2 == parity) for parity in (0, 1)]

    def repeated(k: str) -> bool:
        both = seen[k, 0] + seen[k, 1]
        return both >= 3 and (2 * both >= len(with_text) or any(
            seen[k, parity] >= 3 and 2 * seen[k, parity] >= halves[parity] for parity in (0, 1)))

    def running(line: str, physical: int) -> bool:
        return repeated(key(line)) or any(physical - n in offsets for n in _edge_numbers(line))

    for i in with_text:
        lines = split[i]
        for end in (0, -1):
            for _ in range(EDGE_LINES):
                if lines and running(lines[end], i + 1):
                    lines.pop(end)
                else:
                    break
    return ["\n".join(lines) for lines in split]


def printed_numbers(count: int, offsets: Sequence[int], labels: Sequence[str] | None = None) -> list[str | None]:
    """Each page's printed number: the PDF's /PageLabels where it has them, else the number its running
    heads show (the most common offset but 0, which is the PDF's own numbering), else None."""
    if labels is not None:
        return [str(label) for label in labels]
    shift = next((d for d in offsets if d != 0), None)
    if shift is None:
        return [None] * count
    return [str(i + 1 - shift) if i + 1 > shift else None for i in range(count)]


def page_label(physical: int, printed: str | None, numbered: bool) -> str:
    """A PDF page's citation label: "p. 56" with its printed number, "PDF p. 5" for a page without one in a
    book whose other pages have one (front matter), "p. 5" where the book prints none."""
    if printed:
        return f"p. {printed}"
    return f"PDF p. {physical}" if numbered else f"p. {physical}"
