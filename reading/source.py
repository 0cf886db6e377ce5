"""Where a quote or an evidence span is in its document: its page, as a picture with the passage highlighted
(a PDF whose file is kept), or as text around it. What a reader checks an answer against."""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from documents import page_images
from storage.library import Library

from .errors import ReadingError
from .quotes import page_of

CONTEXT = 1500      # characters of the page's text shown around a passage where there is no page picture


@dataclass
class Source:
    """A quote's or a passage's place in its document, to show beside the answer."""

    title: str                        # the document's
    page: dict                        # its pages row (label, physical, ...)
    passage: str                      # the text shown highlighted
    image: page_images.PageImage | None = None         # the PDF page, the passage highlighted
    excerpt: tuple[str, str, str] | None = None        # else the page's text: before, the passage, after


def locate(library: Library, doc_ref: int | str, chars: Sequence[int] | None = None, span: int | None = None) -> Source:
    """The source of a quote (its characters [a, b) in the document's text) or of an evidence span."""
    doc = library.document(doc_ref)
    pages, stored = library.pages(doc["id"]), library.text(doc["id"])
    if chars is not None and stored is not None:
        text, starts = stored
        a, b = chars
        if not 0 <= a < b <= len(text):
            raise ReadingError(f"“{doc['title']}” has no characters {a}–{b}")
        page = page_of(pages, bisect.bisect_right(starts, a) - 1)
        passage = text[a:b]
    elif span is not None:
        spans = library.spans(doc["id"])
        if not 0 <= span < len(spans):
            raise ReadingError(f"“{doc['title']}” has no passage {span}")
        page, passage = pages[spans[span]["first_page"] - 1], spans[span]["text"] or ""
        if stored is not None:
            text, starts = stored
            a = starts[min(spans[span]["start_token"], len(starts) - 1)]
            b = starts[spans[span]["end_token"]] if spans[span]["end_token"] < len(starts) else len(text)
    else:
        raise ReadingError("say which quote or passage to show")
    upload = library.upload_path(doc["id"])
    if doc["kind"] == "pdf" and upload is not None and page.get("physical"):
        return Source(doc["title"], page, passage, page_images.render(upload, page["physical"], passage))
    if stored is None or page.get("start_char") is None:
        return Source(doc["title"], page, passage)
    lo, hi = max(page["start_char"], a - CONTEXT), min(page["end_char"], b + CONTEXT)
    return Source(doc["title"], page, passage, excerpt=(text[lo:a], text[a:b], text[b:hi]))
