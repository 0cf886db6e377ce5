"""HTML and the XHTML of EPUB chapters as text: source line wraps become spaces, block elements paragraphs;
an HTML file's h1 and h2 headings start its sections."""
from __future__ import annotations

import re
from pathlib import Path

from bs4 import BeautifulSoup, NavigableString

from .document import DocumentError, Section
from .text import looks_binary, number


_BLOCK_TAGS = ("p", "div", "section", "article", "blockquote", "pre", "li", "tr", "table",
               "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "header", "footer",
               "h1", "h2", "h3", "h4", "h5", "h6", "hr")
_SECTION_MARK = "\x00section\x00"  # NULs do not occur in real HTML text, so splitting is safe


def heading(soup: BeautifulSoup, tag: str) -> str:
    found = soup.find(tag)
    return " ".join(found.get_text(" ").split()) if found else ""


def html_text(soup: BeautifulSoup, mark_sections: bool = False) -> str:
    """Text of an HTML tree: source line wraps become spaces, block elements become paragraphs."""
    for junk in soup(["script", "style", "head", "template", "noscript"]):
        junk.decompose()
    for s in soup.find_all(string=re.compile(r"\s")):
        # exact type: comments and doctypes are NavigableString subclasses we must leave alone
        if type(s) is NavigableString and s.find_parent("pre") is None:
            s.replace_with(re.sub(r"\s+", " ", str(s)))
    for br in soup("br"):
        br.replace_with("\n")
    for tag in soup(_BLOCK_TAGS):
        if mark_sections and tag.name in ("h1", "h2"):
            tag.insert_before(_SECTION_MARK)
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    return "\n".join(line.strip() for line in soup.get_text().split("\n"))


def read_html(name: str, data: bytes) -> tuple[str, list[Section]]:
    if looks_binary(data):
        raise DocumentError(f"{name} does not look like an HTML file: it contains binary data "
                            f"(perhaps another kind of file renamed to {Path(name).suffix}).")
    soup = BeautifulSoup(data, "lxml")  # bytes, so a <meta charset> is honoured
    title = heading(soup, "title") or heading(soup, "h1")
    first, *rest = html_text(soup, mark_sections=True).split(_SECTION_MARK)
    # each later chunk starts with its heading's text, which is the section's label
    return title, number([("start", first)] + [(c.strip().split("\n", 1)[0], c) for c in rest])
