"""Plain text and Markdown: their encoding found (a byte-order mark, UTF-8, Windows-1252), form feeds as
pages, Markdown's level-1 and level-2 headings as sections; and the test for bytes that are not text."""
from __future__ import annotations

import codecs
import re
from pathlib import Path

from .document import DocumentError, Section, clean_text

# Byte-order marks, UTF-32 before UTF-16 (the UTF-32-LE mark starts with the UTF-16-LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Control bytes that do not occur in text (tab, newlines, form feed and escape do).
_BINARY_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b") + b"\x7f"
_TEXT_BYTES = bytes(b for b in range(256) if b not in _BINARY_BYTES)


def read_plain(kind: str, text: str) -> tuple[str, list[Section]]:
    if kind == "txt":
        if "\f" not in text:
            return "", [(1, "text", text)]
        return "", [(i + 1, f"p. {i + 1}", page) for i, page in enumerate(text.split("\f"))]
    # Markdown: split before level-1/2 headings (like h1/h2 for HTML), never inside code fences.
    chunks, current, fenced = [], [], False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and re.match(r"#{1,2}\s+\S", line) and current:
            chunks.append("\n".join(current))
            current = []
        current.append(line)
    chunks.append("\n".join(current))
    first_h1 = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.M)
    title = first_h1.group(1) if first_h1 else ""
    labelled = []
    for chunk in chunks:
        head = re.match(r"#{1,2}\s+(.+?)\s*#*\s*$", chunk.split("\n", 1)[0])
        labelled.append((head.group(1) if head else "start", chunk))
    return title, number(labelled)


def number(chunks: list[tuple[str, str]]) -> list[Section]:
    """Number the (label, text) chunks that have text, 1-based."""
    kept = [(label, text) for label, text in chunks if clean_text(text)]
    return [(i + 1, label, text) for i, (label, text) in enumerate(kept)]


def decode(name: str, data: bytes, log: list[str]) -> str:
    """Text from a byte-order mark's encoding, else UTF-8, else Windows-1252, else Latin-1."""
    codec = bom_codec(data)
    if codec:
        text = data.decode(codec, errors="replace")
        if "\ufffd" in text:
            log.append(f"file is not valid {codec.upper().removesuffix('-SIG')}; bad bytes replaced")
        return text
    if looks_binary(data):
        raise DocumentError(f"{name} does not look like a text file: it contains binary data "
                            f"(perhaps another kind of file renamed to {Path(name).suffix}).")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:  # Windows' superset of Latin-1: curly quotes and dashes instead of control codes
        text = data.decode("cp1252")
        log.append("file is not valid UTF-8; decoded as Windows-1252 (Latin-1)")
    except UnicodeDecodeError:  # bytes 0x81, 0x8D, 0x8F, 0x90, 0x9D are unassigned in cp1252
        text = data.decode("latin-1")
        log.append("file is not valid UTF-8; decoded as Latin-1")
    return text


def bom_codec(data: bytes) -> str | None:
    return next((codec for bom, codec in _BOMS if data.startswith(bom)), None)


def looks_binary(data: bytes) -> bool:
    """More than 1% control bytes that text never has (NUL among them): not text, not XHTML.

    Text with a byte-order mark (UTF-16 and UTF-32 are full of NULs) counts as text.
    """
    if bom_codec(data):
        return False
    sample = data[:65536]
    return len(sample.translate(None, _TEXT_BYTES)) * 100 > len(sample)
