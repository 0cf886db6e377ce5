"""A PDF page as a picture, with a passage of its text highlighted: what a reader checks a quote against.

PDFium (pypdfium2) renders the page and knows where each of its characters sits. The passage comes
from our own text (pypdf's extraction, cleaned), which spells some things otherwise (ligatures, line
breaks, hyphens), so both are compared squashed: NFKC, lower case, without spaces or hyphens.
Rendering a page of lshort.pdf at 1.5x and encoding it takes about 0.1 s on this project's CPU.
"""
from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pypdfium2 as pdfium

from .document import DocumentError


SCALE = 1.5                 # 72 dpi x 1.5: an A4 page is 893 x 1263 pixels
HIGHLIGHT = (255, 214, 0, 110)
PROBE = 48                  # squashed characters tried from each end when the whole passage is not found


@dataclass
class PageImage:
    png: bytes
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]   # highlighted rectangles, in pixels (x0, y0, x1, y1)


def squash(text: str) -> tuple[str, list[int]]:
    """text without spaces and hyphens, NFKC-folded and lower case, and for each of its characters the
    index of the character of `text` it came from."""
    flat, where = [], []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKC", ch).lower():
            if not c.isspace() and c not in "-\u00ad\u2010\u2011\ufffe":
                flat.append(c)
                where.append(i)
    return "".join(flat), where


def find(haystack: str, needle: str) -> tuple[int, int] | None:
    """[a, b) of haystack where needle is, squashed; where it is not found whole, from its first PROBE
    characters to its last (or either alone)."""
    flat, where = squash(haystack)
    want, _ = squash(needle)
    if not want:
        return None
    at = flat.find(want)
    if at >= 0:
        return where[at], where[at + len(want) - 1] + 1
    head, tail = flat.find(want[:PROBE]), flat.find(want[-PROBE:])
    if head >= 0 and tail >= head:
        return where[head], where[tail + min(PROBE, len(want)) - 1] + 1
    if head >= 0:
        return where[head], where[min(len(flat), head + PROBE) - 1] + 1
    if tail >= 0:
        return where[tail], where[tail + min(PROBE, len(want)) - 1] + 1
    return None


def render(path: Path, physical: int, passage: str | None = None) -> PageImage:
    """Page `physical` (1-based) of the PDF at path as a PNG, with `passage` highlighted where it is found."""
    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as err:
        raise DocumentError(f"the kept copy of this document cannot be opened: {err}") from err
    try:
        if not 1 <= physical <= len(pdf):
            raise DocumentError(f"the document has no page {physical}")
        page = pdf[physical - 1]
        image = page.render(scale=SCALE).to_pil().convert("RGBA")
        boxes = _boxes(page, passage) if passage else []
    finally:
        pdf.close()
    if boxes:
        from PIL import Image, ImageDraw

        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        for box in boxes:
            draw.rectangle(box, fill=HIGHLIGHT)
        image = Image.alpha_composite(image, overlay)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG", compress_level=1)
    return PageImage(out.getvalue(), image.width, image.height, boxes)


def _boxes(page, passage: str) -> list[tuple[float, float, float, float]]:
    """The passage's line rectangles on the page, in pixels of a SCALE rendering (PDF y runs upwards)."""
    text = page.get_textpage()
    found = find(text.get_text_range(), passage)
    if found is None:
        return []
    a, b = found
    height = page.get_size()[1]
    pad = 1.5
    return [((x0 - pad) * SCALE, (height - y1 - pad) * SCALE, (x1 + pad) * SCALE, (height - y0 + pad) * SCALE)
            for x0, y0, x1, y1 in (text.get_rect(i) for i in range(text.count_rects(a, b - a)))]
