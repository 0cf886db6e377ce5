"""A document as the app reads it: its text, cleaned, and its pages (a PDF's) or sections (chapters of an EPUB,
HTML or Markdown headings), each a stretch of that text. Every token and memory block is later traced back
to a page through Document.pages and Document.page_at."""
from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field


class DocumentError(ValueError):
    """A problem with the user's file, worded so it can be shown to them as is.

    Every message names the file once (the name given to read_document, never a storage path)
    and never carries a library's exception text: it stands alone as one line for the user.
    """


@dataclass(slots=True)
class Page:
    number: int  # 1-based: physical page for PDFs, position for chapters and sections
    label: str   # what a citation shows: "p. 56" (the printed number where the PDF has one), a chapter's title
    start: int  # [start, end) into Document.text
    end: int
    printed: str | None = None  # a PDF page's printed number ("56", "xii"), where the PDF says or shows it


@dataclass
class Document:
    title: str
    source_name: str
    kind: str
    text: str
    pages: list[Page]
    sha256: str
    log: list[str] = field(default_factory=list)

    def page_at(self, offsets: Sequence[int]) -> list[int]:
        """Index into `pages` for each character offset; gaps belong to the preceding page."""
        starts = [p.start for p in self.pages]
        return [max(bisect_right(starts, o) - 1, 0) for o in offsets]


def clean_text(text: str) -> str:
    """Normalise extracted text while keeping paragraph breaks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Only join when a lowercase letter continues the word: "exam-\nple", but keep "Anglo-\nSaxon".
    text = re.sub(r"(?<=[^\W\d_])-[ \t]*\n[ \t]*(?=([^\W\d_]))",
                  lambda m: "" if m.group(1).islower() else m.group(0), text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# A section is (number, label, raw text) or, for a PDF page, (number, label, raw text, printed number);
# text is cleaned in assemble.
Section = tuple[int, str, str] | tuple[int, str, str, str | None]


def assemble(sections: Sequence[Section]) -> tuple[str, list[Page]]:
    parts: list[str] = []
    pages: list[Page] = []
    pos = 0
    for number, label, raw, *printed in sections:
        body = clean_text(raw)
        if not body:
            continue
        if parts:
            parts.append("\n\n")  # the gap between pages; page_at maps it to the page before
            pos += 2
        parts.append(body)
        pages.append(Page(number=number, label=label, start=pos, end=pos + len(body),
                          printed=printed[0] if printed else None))
        pos += len(body)
    return "".join(parts), pages
