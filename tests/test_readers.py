"""Tests for documents/: each kind of file to text with pages. Every fixture file is generated at run time under tmp_path."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import shutil
import subprocess
import tarfile
import warnings
import zipfile
from pathlib import Path

import pypdf
import pytest

from documents import SUPPORTED, Document, DocumentError, Page, read_document
from documents import read as readers
from documents.document import clean_text
from documents.running import numbering, page_label, printed_numbers, strip_running_lines


# ---------------------------------------------------------------- fixture builders

def _pdf_string(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str] | str], title: str | None = None, xref_shift: int = 0,
             page_labels: list[tuple[int, str, int]] | None = None) -> bytes:
    """A minimal valid PDF written by hand, since pypdf cannot lay out text.

    A page given as a list of strings gets one Helvetica text line per entry; a page given as a
    str is used as its raw content stream (e.g. a drawing with no text). `xref_shift` moves every
    xref offset to make pypdf repair the file and log warnings about it. page_labels: /PageLabels ranges,
    each (first page index, style "D" | "r" | "R" | ..., first number): [(0, "r", 1), (2, "D", 1)] prints
    i, ii, 1, 2, ...
    """
    labels = b""
    if page_labels:
        ranges = b" ".join(b"%d << /S /%s /St %d >>" % (i, style.encode(), first) for i, style, first in page_labels)
        labels = b" /PageLabels << /Nums [%s] >>" % ranges
    objs: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R%s >>" % labels, b"",
                         b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for page in pages:
        if isinstance(page, str):
            stream = page.encode("latin-1")
        else:
            ops = ["BT /F1 12 Tf 72 720 Td"]
            ops += [("0 -14 Td " if i else "") + f"({_pdf_string(line)}) Tj" for i, line in enumerate(page)]
            stream = "\n".join(ops + ["ET"]).encode("latin-1")
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                    b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % len(objs))
        kids.append(len(objs))
    objs[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    info = b""
    if title:
        objs.append(b"<< /Title (%s) >>" % _pdf_string(title).encode("latin-1"))
        info = b" /Info %d 0 R" % len(objs)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % (off + xref_shift) for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, info, xref)
    return bytes(out)


def book_pages() -> list[list[str]]:
    """Five pages with a running header, a 'Page N' footer and a word hyphenated across lines."""
    bodies = [
        ["Chapter one begins here.", "Alpha text on the first page."],
        ["This is an exam-", "ple of a hyphenated word.", "Beta text."],
        ["Gamma text on page three."],
        ["Delta text on page four."],
        ["Epsilon text on the last page."],
    ]
    return [["My Book Title", *body, f"Page {n}"] for n, body in enumerate(bodies, 1)]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


CONTAINER = """<?xml version="1.0" encoding="UTF-8"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"""


def make_epub(path: Path, extra: dict[str, str | bytes] | None = None, drop: tuple[str, ...] = (),
              locked: bool = False) -> Path:
    """A small EPUB 2: chapter 1 is in the TOC, chapter 2 only has an <h1>, chapter 3 neither.

    `extra` adds or replaces files, `drop` leaves files out, `locked` marks every file as
    zip-encrypted (the flag only: reading one then asks for a password).
    """
    chapters = [
        ("ch1.xhtml", "Chapter One: Arrival",
         "<h1>Chapter One: Arrival</h1>\n<p>She walked\n   into the <em>old</em> house.</p>"
         "<p>It was quiet.</p>"),
        ("ch2.xhtml", None, "<h1>Departure</h1><p>He left at dawn.<br/>Nobody waved.</p>"),
        ("ch3.xhtml", None, "<p>An untitled coda.</p>"),
    ]
    manifest = "".join(f'<item id="c{i}" href="{f}" media-type="application/xhtml+xml"/>'
                       for i, (f, _, _) in enumerate(chapters, 1))
    spine = "".join(f'<itemref idref="c{i}"/>' for i in range(1, len(chapters) + 1))
    opf = f"""<?xml version="1.0" encoding="UTF-8"?>
<package xmlns="http://www.idpf.org/2007/opf" version="2.0" unique-identifier="bookid">
  <metadata xmlns:dc="http://purl.org/dc/elements/1.1/">
    <dc:title>My EPUB Book</dc:title><dc:identifier id="bookid">urn:uuid:1234</dc:identifier>
    <dc:language>en</dc:language>
  </metadata>
  <manifest><item id="ncx" href="toc.ncx" media-type="application/x-dtbncx+xml"/>{manifest}</manifest>
  <spine toc="ncx">{spine}</spine>
</package>"""
    points = "".join(f'<navPoint id="n{i}" playOrder="{i}"><navLabel><text>{t}</text></navLabel>'
                     f'<content src="{f}"/></navPoint>' for i, (f, t, _) in enumerate(chapters, 1) if t)
    ncx = f"""<?xml version="1.0" encoding="UTF-8"?>
<ncx xmlns="http://www.daisy.org/z3986/2005/ncx/" version="2005-1">
  <head><meta name="dtb:uid" content="urn:uuid:1234"/></head>
  <docTitle><text>My EPUB Book</text></docTitle><navMap>{points}</navMap>
</ncx>"""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip")  # first and stored
        files = {"META-INF/container.xml": CONTAINER, "OEBPS/content.opf": opf, "OEBPS/toc.ncx": ncx}
        for name, _, body in chapters:
            # <title> repeats the book title, as many converters do; it must not become the label
            files[f"OEBPS/{name}"] = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                                      '<html xmlns="http://www.w3.org/1999/xhtml"><head>'
                                      f"<title>My EPUB Book</title></head><body>{body}</body></html>")
        files.update(extra or {})
        for name, text in files.items():
            if name not in drop:
                z.writestr(name, text, compress_type=zipfile.ZIP_DEFLATED)
    if locked:  # zipfile writes no encrypted entries: set bit 0 of the flags in both headers
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                data[info.header_offset + 6] |= 0x1
        at = data.find(b"PK\x01\x02")
        while at != -1:
            data[at + 8] |= 0x1
            at = data.find(b"PK\x01\x02", at + 4)
        path.write_bytes(bytes(data))
    return path


def encrypted(n: int = 600, seed: int = 12) -> bytes:
    """What a cipher leaves of a file: bytes that look random."""
    return random.Random(seed).randbytes(n)


ENCRYPTION_XML = """<?xml version="1.0"?>
<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container"
            xmlns:enc="http://www.w3.org/2001/04/xmlenc#">
  <enc:EncryptedData>
    <enc:EncryptionMethod Algorithm="{algorithm}"/>
    <enc:CipherData><enc:CipherReference URI="{uri}"/></enc:CipherData>
  </enc:EncryptedData>
</encryption>"""


@pytest.fixture
def book_pdf(tmp_path: Path) -> Path:
    return write(tmp_path / "book.pdf", make_pdf(book_pages(), title="A Hand-Made Book"))


# ---------------------------------------------------------------- the fixture builder itself

def test_make_pdf_is_read_back_by_pypdf(book_pdf: Path):
    reader = pypdf.PdfReader(book_pdf)
    assert len(reader.pages) == 5
    assert reader.metadata.title == "A Hand-Made Book"
    assert reader.pages[2].extract_text().splitlines() == ["My Book Title", "Gamma text on page three.", "Page 3"]


# ---------------------------------------------------------------- text helpers

def test_clean_text_joins_hyphenated_words_and_normalises_whitespace():
    raw = "An exam-\nple \t of  text.   \nNext line\n\n\n\nNew para.\n"
    assert clean_text(raw) == "An example of text.\nNext line\n\nNew para."


def test_clean_text_keeps_hyphen_before_capitalised_word_and_paragraph_breaks():
    assert clean_text("Anglo-\nSaxon\r\n\r\nend") == "Anglo-\nSaxon\n\nend"


def test_strip_running_lines_ignores_digits_and_keeps_body():
    words = ["ant", "bee", "cat", "dog"]
    pages = [f"Header\nthe {w} ran\nPage {n}" for n, w in enumerate(words, 1)]
    assert strip_running_lines(pages) == [f"the {w} ran" for w in words]


def running_head_pages(n: int = 12, skip: int = 4, plate: int | None = None) -> tuple[list[str], list[str]]:
    """Pages laid out as TeX for the Impatient's are: a draft mark that counts the sheets, a timestamp, then a
    running head with the printed number (skip pages before page 1) and a chapter name that changes; verso
    heads put the number first, recto heads last. plate: an unnumbered page (a map, no mark, no head) is
    inserted after that many pages, so every sequence goes on one page later. Returns (pages, their body
    lines)."""
    words = "ant bee cat dog eel fox gnu hen ibis jay kiwi lark mole newt owl pig ram seal toad vole wasp yak".split()
    pages, bodies = [], []
    for i in range(n):
        chapter = "Concepts \\ §4" if i < n // 2 else "Descriptions of the commands"
        printed = i + 1 - skip
        head = f"{printed} {chapter}" if i % 2 else f"{chapter} {printed}"
        body = [f"The {words[i % len(words)]} sat on the {words[-1 - i % len(words)]} for {3 * i + 7} minutes.",
                f"Then {words[i % len(words)]} left."]
        pages.append("\n".join([f"TeX for the Impatient No {i + 1}", "3 Jan 2020 2:18 p.m."]
                               + ([head] if printed > 0 else []) + body))
        bodies.append("\n".join(body))
    if plate is not None:
        pages.insert(plate, "A map of the island of Tex.\nThe harbour lies to the north.")
        bodies.insert(plate, pages[plate])
    return pages, bodies


def test_strip_running_lines_drops_heads_that_carry_the_page_number_and_repeated_stamps():
    pages, bodies = running_head_pages()
    assert numbering(pages).offsets == [0, 4]            # the draft mark's PDF numbers, and the printed ones
    assert strip_running_lines(pages) == bodies


def test_printed_numbers_follow_the_running_heads_or_the_pdfs_labels():
    pages, _ = running_head_pages(skip=4)
    printed = printed_numbers(numbering(pages).pages)
    assert printed == [None] * 4 + [str(n) for n in range(1, 9)]
    assert printed_numbers([0, 0, 0]) == [None, None, None]               # only the PDF's own numbers: none
    assert printed_numbers([2, 2, 2], ["i", "ii", "1"]) == ["i", "ii", "1"]  # /PageLabels win
    assert [page_label(5, p, True) for p in ("56", None)] == ["p. 56", "PDF p. 5"]
    assert page_label(5, None, False) == "p. 5"


def test_pdf_cites_the_printed_page_of_its_running_heads(tmp_path: Path):
    pages, bodies = running_head_pages()
    doc = read_document(write(tmp_path / "impatient.pdf", make_pdf([p.split("\n") for p in pages])))
    assert [p.label for p in doc.pages] == [f"PDF p. {n}" for n in range(1, 5)] + [f"p. {n}" for n in range(1, 9)]
    assert [p.number for p in doc.pages] == list(range(1, 13))            # the physical number stays
    assert "Impatient" not in doc.text and "p.m." not in doc.text and "Concepts" not in doc.text
    assert all(body in doc.text for body in bodies)


@pytest.mark.parametrize("plate", [3, 20, 36])
def test_an_unnumbered_page_inserted_mid_book_shifts_the_numbering_only_after_it(plate):
    """A plate inserted after `plate` pages: before it the heads' offset is 20, after it 21, and the sheet
    counter goes 0 then 1. The book's numbers come from the heads, run by run; the plate prints none."""
    pages, bodies = running_head_pages(n=40, skip=20, plate=plate)
    printed = printed_numbers(numbering(pages).pages)
    want = [str(i + 1 - 20) if i + 1 > 20 else None for i in range(40)]
    want.insert(plate, None)
    assert printed == want
    assert strip_running_lines(pages) == bodies                 # every head and mark goes, before and after


def test_a_book_numbered_by_its_sheets_alone_is_numbered_by_them_run_by_run():
    """"Page N" on every page from the first (offset 0: the PDF's own numbers) and a plate after page 6: the
    pages after it print one less than their place in the file."""
    pages = [f"Some text about {w}.\nMore of it.\nPage {n}" for n, w in enumerate("abcdefghijkl", 1)]
    pages.insert(6, "A map, unnumbered.")
    printed = printed_numbers(numbering(pages).pages)
    assert printed == [None] * 7 + [str(n) for n in range(7, 13)]


def test_pdf_cites_its_page_labels(tmp_path: Path, book_pdf: Path):
    writer = pypdf.PdfWriter(clone_from=book_pdf)
    writer.set_page_label(0, 1, "/r")                   # i, ii
    writer.set_page_label(2, 4, "/D", start=1)          # 1, 2, 3
    writer.write(tmp_path / "labelled.pdf")
    doc = read_document(tmp_path / "labelled.pdf")
    assert [(p.number, p.label, p.printed) for p in doc.pages] == [
        (1, "p. i", "i"), (2, "p. ii", "ii"), (3, "p. 1", "1"), (4, "p. 2", "2"), (5, "p. 3", "3")]


def test_strip_running_lines_keeps_a_number_that_does_not_follow_the_pages():
    pages = [f"Chapter text {w}\n{n} apples were sold\nthe end of {w}" for n, w in zip((7, 3, 12, 5), "abcd")]
    assert numbering(pages).offsets == []
    assert strip_running_lines(pages) == pages


def test_strip_running_lines_needs_three_pages():
    pages = ["Header\nbody one\n1", "Header\nbody two\n2"]
    assert strip_running_lines(pages) == pages


def test_strip_running_lines_needs_half_the_pages():
    # "Header" heads 3 of 7 pages: under half, so it stays
    words = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
    pages = [("Header\n" if n < 3 else "") + f"the {w}\nsaw a {w}" for n, w in enumerate(words)]
    assert strip_running_lines(pages) == pages


def test_page_at_maps_gaps_to_preceding_page_and_clamps():
    doc = Document(title="t", source_name="t.txt", kind="txt", text="aaaa\n\nbbbb",
                   pages=[Page(1, "p. 1", 0, 4), Page(2, "p. 2", 6, 10)], sha256="", log=[])
    assert doc.page_at([0, 3, 4, 5, 6, 9, 10, 99]) == [0, 0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- PDF

def test_pdf_drops_running_header_and_footer(book_pdf: Path):
    doc = read_document(book_pdf)
    assert "My Book Title" not in doc.text
    assert "Page " not in doc.text
    assert "Gamma text on page three." in doc.text


def test_pdf_joins_word_hyphenated_across_lines(book_pdf: Path):
    assert "This is an example of a hyphenated word." in read_document(book_pdf).text


def test_pdf_pages_labels_offsets_and_page_at(book_pdf: Path):
    doc = read_document(book_pdf)
    assert (doc.kind, doc.title, doc.source_name) == ("pdf", "A Hand-Made Book", "book.pdf")
    assert [(p.number, p.label) for p in doc.pages] == [(n, f"p. {n}") for n in range(1, 6)]
    assert doc.text[doc.pages[2].start:doc.pages[2].end] == "Gamma text on page three."
    offsets = [doc.text.index(w) for w in ("Alpha", "example", "Gamma", "Delta", "Epsilon")]
    assert doc.page_at(offsets) == [0, 1, 2, 3, 4]
    assert doc.sha256 == hashlib.sha256(book_pdf.read_bytes()).hexdigest()


def test_pdf_skips_blank_page_and_keeps_physical_numbers(tmp_path: Path):
    path = write(tmp_path / "gap.pdf", make_pdf([["first"], "", ["third"]]))
    doc = read_document(path)
    assert doc.title == "gap"  # no metadata title: the file stem
    assert [(p.number, p.label) for p in doc.pages] == [(1, "p. 1"), (3, "p. 3")]


def test_pdf_empty_user_password_is_opened(tmp_path: Path, book_pdf: Path):
    writer = pypdf.PdfWriter(clone_from=book_pdf)
    writer.encrypt(user_password="", owner_password="owner")
    path = tmp_path / "owner_only.pdf"
    writer.write(path)
    assert pypdf.PdfReader(path).is_encrypted
    assert "Gamma text on page three." in read_document(path).text


def test_pdf_xref_warnings_go_to_log_not_console(tmp_path: Path, caplog, capsys):
    path = write(tmp_path / "bent.pdf", make_pdf([["repaired text"]], xref_shift=3))
    pypdf_logger = logging.getLogger("pypdf")
    before = (pypdf_logger.propagate, list(pypdf_logger.handlers), pypdf_logger.level)
    with caplog.at_level(logging.DEBUG):
        doc = read_document(path)
    assert doc.text == "repaired text"
    assert any("wrong pointing object" in m for m in doc.log)
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
    assert capsys.readouterr().err == ""
    assert (pypdf_logger.propagate, list(pypdf_logger.handlers), pypdf_logger.level) == before


def test_capture_collects_library_warnings_and_repeats_once():
    log: list[str] = []
    with readers._capture_library_logs(log):
        warnings.warn("odd glyph", UserWarning)
        for _ in range(3):
            logging.getLogger("pypdf._cmap").warning("font %s is odd", "F1")
    assert "UserWarning: odd glyph" in log
    assert readers._dedupe(log).count("pypdf._cmap: font F1 is odd (x3)") == 1


# ---------------------------------------------------------------- EPUB

def test_epub_chapters_labels_and_text(tmp_path: Path):
    doc = read_document(make_epub(tmp_path / "book.epub"))
    assert (doc.kind, doc.title) == ("epub", "My EPUB Book")
    assert [p.label for p in doc.pages] == ["Chapter One: Arrival", "Departure", "Chapter 3"]
    first = doc.text[doc.pages[0].start:doc.pages[0].end]
    assert first == "Chapter One: Arrival\n\nShe walked into the old house.\n\nIt was quiet."
    assert "He left at dawn.\nNobody waved." in doc.text
    assert doc.page_at([doc.text.index("coda")]) == [2]


@pytest.mark.parametrize("algorithm", ["http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"])
def test_epub_font_obfuscation_is_not_drm(tmp_path: Path, algorithm: str):
    # EPUB 3.3 (OCF, font obfuscation): the IDPF algorithm, and Adobe's older one, hide fonts only
    xml = ENCRYPTION_XML.format(algorithm=algorithm, uri="OEBPS/font.otf")
    doc = read_document(make_epub(tmp_path / "fonts.epub", {"META-INF/encryption.xml": xml,
                                                            "OEBPS/font.otf": encrypted()}))
    assert len(doc.pages) == 3


def test_epub_malformed_encryption_xml_is_not_taken_for_drm(tmp_path: Path):
    # a font-obfuscation manifest cut short: the chapters are plain XHTML, so the book reads
    xml = ENCRYPTION_XML.format(algorithm="http://www.idpf.org/2008/embedding", uri="OEBPS/font.otf")
    doc = read_document(make_epub(tmp_path / "fonts.epub", {"META-INF/encryption.xml": xml[:150]}))
    assert len(doc.pages) == 3


def test_epub_damaged_chapter_is_skipped_and_logged(tmp_path: Path):
    doc = read_document(make_epub(tmp_path / "book.epub", {"OEBPS/ch2.xhtml": encrypted()}))
    assert [p.label for p in doc.pages] == ["Chapter One: Arrival", "Chapter 2"]
    assert doc.text.endswith("An untitled coda.")
    assert "ch2.xhtml: not text (encrypted or damaged), skipped" in doc.log


# ---------------------------------------------------------------- text, Markdown, HTML

def test_txt_without_form_feeds_is_one_page(tmp_path: Path):
    doc = read_document(write(tmp_path / "notes.txt", "Just   some\nnotes.\n"))
    assert (doc.kind, doc.title, doc.text) == ("txt", "notes", "Just some\nnotes.")
    assert [(p.number, p.label, p.start, p.end) for p in doc.pages] == [(1, "text", 0, len(doc.text))]


def test_txt_form_feeds_split_pages(tmp_path: Path):
    doc = read_document(write(tmp_path / "pages.txt", "one\fthe second\f\fthe fourth\f"))
    assert [(p.number, p.label) for p in doc.pages] == [(1, "p. 1"), (2, "p. 2"), (4, "p. 4")]
    assert doc.page_at([doc.text.index("fourth")]) == [2]


def test_txt_latin1_fallback_is_logged(tmp_path: Path):
    doc = read_document(write(tmp_path / "old.txt", "café crème".encode("latin-1")))
    assert doc.text == "café crème"
    assert any("Latin-1" in m for m in doc.log)


def test_txt_windows_1252_quotes_and_dashes(tmp_path: Path):
    doc = read_document(write(tmp_path / "old.txt", "“Café” – crème".encode("cp1252")))
    assert doc.text == "“Café” – crème"
    assert doc.log == ["file is not valid UTF-8; decoded as Windows-1252 (Latin-1)"]


@pytest.mark.parametrize("codec", ["utf-16", "utf-32"])
def test_txt_utf16_and_utf32_with_byte_order_mark(tmp_path: Path, codec: str):
    doc = read_document(write(tmp_path / "wide.txt", "Grüße aus Köln.\nZweite Zeile.".encode(codec)))
    assert doc.text == "Grüße aus Köln.\nZweite Zeile."


def test_md_sections_at_headings(tmp_path: Path):
    md = "Preamble line.\n\n# Intro\nHello.\n\n## Details\nMore.\n```\n# not a heading\n```\n### Minor\nStill details.\n"
    doc = read_document(write(tmp_path / "readme.md", md))
    assert doc.title == "Intro"
    assert [p.label for p in doc.pages] == ["start", "Intro", "Details"]
    details = doc.text[doc.pages[2].start:doc.pages[2].end]
    assert details.startswith("## Details") and details.endswith("Still details.")


def test_html_sections_at_h1_and_h2(tmp_path: Path):
    html = ("<html><head><title>Web Page</title><style>p {color: red}</style></head><body>"
            "<p>Lead in.</p><h1>First</h1><p>One\n  two.</p><!-- hidden comment -->"
            "<h2>Second <em>part</em></h2><p>Three.</p><h3>Sub</h3><p>Four.</p>"
            "<script>var x = 1;</script></body></html>")
    doc = read_document(write(tmp_path / "page.htm", html))
    assert (doc.kind, doc.title) == ("html", "Web Page")
    assert [p.label for p in doc.pages] == ["start", "First", "Second part"]
    assert doc.text == "Lead in.\n\nFirst\n\nOne two.\n\nSecond part\n\nThree.\n\nSub\n\nFour."


# ---------------------------------------------------------------- bad input

# What a message must never show: a Python exception's wording or a library's.
PYTHON_WORDS = ("NoneType", "object has no attribute", "not iterable", "Error", "Exception", "errno",
                "line 1, column", "There is no item named", "Stream has ended", "startxref")


def assert_plain(message: str, name: str) -> None:
    """A message the user can read alone: the file named once, no Python or library wording."""
    assert message.count(name) == 1, message
    assert not [w for w in PYTHON_WORDS if w in message], message


def _raises(path: Path, *words: str, **kwargs) -> str:
    with pytest.raises(DocumentError) as info:
        read_document(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path: Path):
    _raises(tmp_path / "nope.pdf", "does not exist")


def test_directory(tmp_path: Path):
    _raises(tmp_path, "is a directory")


def test_unsupported_extension_lists_supported(tmp_path: Path):
    _raises(write(tmp_path / "report.docx", "x"), "unsupported", ".docx", *SUPPORTED)


@pytest.mark.parametrize("name", ["photo.txt", "photo.md", "photo.html"])
def test_binary_renamed_to_text_or_html(tmp_path: Path, name: str):
    data = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + encrypted(2000)
    kind = "an HTML" if name.endswith(".html") else "a text"
    assert _raises(write(tmp_path / name, data)) == (
        f"{name} does not look like {kind} file: it contains binary data "
        f"(perhaps another kind of file renamed to {Path(name).suffix}).")


def test_zero_byte_file(tmp_path: Path):
    _raises(write(tmp_path / "empty.pdf", b""), "is empty")


def test_whitespace_only_text_is_empty(tmp_path: Path):
    _raises(write(tmp_path / "blank.md", " \n\t\n\n"), "is empty")


def test_file_over_limit_gives_size_and_limit(tmp_path: Path):
    path = write(tmp_path / "big.txt", b"a" * (3 * 2**20))
    _raises(path, "3 MB", "2 MB limit", max_bytes=2 * 2**20)


def test_encrypted_pdf(tmp_path: Path, book_pdf: Path):
    writer = pypdf.PdfWriter(clone_from=book_pdf)
    writer.encrypt(user_password="secret")
    path = tmp_path / "locked.pdf"
    writer.write(path)
    _raises(path, "is encrypted")


def test_truncated_pdf(tmp_path: Path):
    data = make_pdf(book_pages())
    message = _raises(write(tmp_path / "cut.pdf", data[: len(data) // 2]))
    assert message == "cut.pdf is not a readable PDF: the file is cut short (perhaps an unfinished download)."


def test_binary_renamed_to_pdf(tmp_path: Path):
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)
    message = _raises(write(tmp_path / "image.pdf", data))
    assert message == ("image.pdf is not a readable PDF: it is not a PDF at all "
                       "(perhaps another kind of file renamed to .pdf).")


def test_damaged_pdf(tmp_path: Path):
    data = b"%PDF-1.4\n" + encrypted(3000) + b"\n%%EOF\n"  # whole, but nothing inside is PDF
    assert _raises(write(tmp_path / "bad.pdf", data)) == "bad.pdf is not a readable PDF: the file is damaged."


def test_zero_page_pdf(tmp_path: Path):
    path = tmp_path / "nothing.pdf"
    pypdf.PdfWriter().write(path)
    _raises(path, "has no pages")


def test_scanned_pdf_without_text_layer(tmp_path: Path):
    # pages that only draw (an image stand-in), as a scanner's output would
    path = write(tmp_path / "scan.pdf", make_pdf(["0 0 612 792 re f"] * 2))
    _raises(path, "has no text layer; it looks scanned")


DRM_MESSAGE = ("{name} is DRM-protected{scheme}, so its text is encrypted and cannot be read. "
               "Use a DRM-free copy of the book instead.")
AES = "http://www.w3.org/2001/04/xmlenc#aes128-cbc"


def test_drm_epub_encryption_xml(tmp_path: Path):
    xml = ENCRYPTION_XML.format(algorithm=AES, uri="OEBPS/ch1.xhtml")
    path = make_epub(tmp_path / "drm.epub", {"META-INF/encryption.xml": xml, "OEBPS/ch1.xhtml": encrypted()})
    assert _raises(path) == DRM_MESSAGE.format(name="drm.epub", scheme="")


def test_drm_epub_rights_xml(tmp_path: Path):
    path = make_epub(tmp_path / "adobe.epub", {"META-INF/rights.xml": "<rights/>"})
    assert _raises(path) == DRM_MESSAGE.format(name="adobe.epub", scheme=" (Adobe DRM)")


def test_drm_epub_readium_lcp(tmp_path: Path):
    xml = ENCRYPTION_XML.format(algorithm="http://www.w3.org/2001/04/xmlenc#aes256-cbc", uri="OEBPS/ch2.xhtml")
    path = make_epub(tmp_path / "lcp.epub", {"META-INF/encryption.xml": xml, "META-INF/license.lcpl": "{}",
                                             "OEBPS/ch2.xhtml": encrypted()})
    assert _raises(path) == DRM_MESSAGE.format(name="lcp.epub", scheme=" (Readium LCP)")


def test_issue12_drm_epub_gets_the_drm_message_not_a_python_error(tmp_path: Path):
    """Issue 12: "drm.epub is not a readable EPUB ('NoneType' object has no attribute 'get')".

    Its encryption.xml left the XML-Encryption namespace off its elements, so DRM went unnoticed
    and ebooklib choked on the encrypted package file. Namespaces no longer matter.
    """
    entries = "".join(f'<EncryptedData><EncryptionMethod Algorithm="{AES}"/><CipherData>'
                      f'<CipherReference URI="OEBPS/{f}"/></CipherData></EncryptedData>'
                      for f in ("content.opf", "ch1.xhtml", "ch2.xhtml", "ch3.xhtml"))
    xml = f'<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container">{entries}</encryption>'
    files = {f"OEBPS/{f}": encrypted(seed=i) for i, f in enumerate(("content.opf", "ch1.xhtml", "ch2.xhtml",
                                                                     "ch3.xhtml"))}
    path = make_epub(tmp_path / "drm.epub", {"META-INF/encryption.xml": xml, **files})
    message = _raises(path)
    assert message == DRM_MESSAGE.format(name="drm.epub", scheme="")
    assert_plain(message, "drm.epub")


def test_epub_encrypted_without_saying_so(tmp_path: Path):
    # e.g. a store's DRM that keeps its keys elsewhere: no encryption.xml, every chapter is noise
    files = {f"OEBPS/ch{i}.xhtml": encrypted(seed=i) for i in (1, 2, 3)}
    message = _raises(make_epub(tmp_path / "kobo.epub", files))
    assert message == ("kobo.epub cannot be read: its chapters are encrypted or damaged. "
                       "If the book came with DRM, use a DRM-free copy of the book instead.")


def test_non_zip_epub(tmp_path: Path):
    _raises(write(tmp_path / "fake.epub", "just text, not a zip"), "is not a readable EPUB")


def test_zip_without_epub_structure(tmp_path: Path):
    path = tmp_path / "archive.epub"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "a plain zip, no container.xml")
    _raises(path, "is not a readable EPUB")


def _opf(tmp_path: Path, pattern: str, replacement: str) -> str:
    """make_epub's package file with `pattern` replaced."""
    with zipfile.ZipFile(make_epub(tmp_path / "base.epub")) as z:
        return re.sub(pattern, replacement, z.read("OEBPS/content.opf").decode(), flags=re.S)


BROKEN_EPUBS = {  # id: (how to build it from tmp_path and the path, what follows "x.epub is not a readable EPUB: ")
    "no container.xml": (lambda t, p: make_epub(p, drop=("META-INF/container.xml",)),
                         "it has no META-INF/container.xml, the file that says where the book's contents are."),
    "container.xml garbage": (lambda t, p: make_epub(p, {"META-INF/container.xml": encrypted()}),
                              "its META-INF/container.xml is damaged (it does not say where the book's "
                              "contents are)."),
    "package file missing": (lambda t, p: make_epub(p, drop=("OEBPS/content.opf",)),
                             "its package file OEBPS/content.opf, which lists the book's contents, is missing."),
    "package file garbage": (lambda t, p: make_epub(p, {"OEBPS/content.opf": encrypted()}),
                             "its package file OEBPS/content.opf, which lists the book's contents, is damaged."),
    "package file empty": (lambda t, p: make_epub(p, {"OEBPS/content.opf": ""}),
                           "its package file OEBPS/content.opf, which lists the book's contents, is damaged."),
    "no metadata": (lambda t, p: make_epub(p, {"OEBPS/content.opf": _opf(t, r"<metadata.*</metadata>", "")}),
                    "its package file OEBPS/content.opf, which lists the book's contents, is damaged."),
    "no spine": (lambda t, p: make_epub(p, {"OEBPS/content.opf": _opf(t, r"<spine.*</spine>", "")}),
                 "its package file OEBPS/content.opf, which lists the book's contents, is damaged."),
    "chapter missing": (lambda t, p: make_epub(p, drop=("OEBPS/ch2.xhtml",)),
                        "OEBPS/ch2.xhtml is listed in it but missing from the file (it may be incomplete)."),
    "zip password": (lambda t, p: make_epub(p, locked=True), "its contents are locked with a zip password."),
    "cut short": (lambda t, p: write(p, make_epub(t / "whole.epub").read_bytes()[:700]),
                  "the file is cut short or damaged (perhaps an unfinished download)."),
}


@pytest.mark.parametrize("case", BROKEN_EPUBS)
def test_broken_epub_says_what_is_wrong_in_plain_words(tmp_path: Path, case: str):
    build, why = BROKEN_EPUBS[case]
    message = _raises(build(tmp_path, tmp_path / "broken.epub"))
    assert message == f"broken.epub is not a readable EPUB: {why}"
    assert_plain(message, "broken.epub")


def test_epub_with_damaged_compressed_data(tmp_path: Path):
    path = make_epub(tmp_path / "crc.epub")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("OEBPS/ch1.xhtml")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF  # zlib or the CRC check notices
    message = _raises(write(path, bytes(data)))
    assert message == "crc.epub is not a readable EPUB: its compressed data is damaged."


def test_epub_with_an_empty_spine(tmp_path: Path):
    opf = _opf(tmp_path, r"<spine(.*?)>.*</spine>", r"<spine\1></spine>")
    message = _raises(make_epub(tmp_path / "nothing.epub", {"OEBPS/content.opf": opf}))
    assert message == "nothing.epub has no chapters to read: the reading order (spine) in OEBPS/content.opf is empty."


def _locked_pdf(tmp_path: Path) -> bytes:
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(make_pdf(book_pages())))
    writer.encrypt(user_password="secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _no_page_pdf(tmp_path: Path) -> bytes:
    out = io.BytesIO()
    pypdf.PdfWriter().write(out)
    return out.getvalue()


def _epub_bytes(**kwargs):
    return lambda t: make_epub(t / "built.epub", **kwargs).read_bytes()


UNREADABLE = {  # id: (suffix, the file's bytes from tmp_path; None: no file; "dir": a directory)
    "missing": (".pdf", None),
    "directory": (".pdf", "dir"),
    "unsupported type": (".docx", lambda t: b"x"),
    "empty": (".pdf", lambda t: b""),
    "over the limit": (".txt", lambda t: b"a" * (2 * 2**20)),
    "blank text": (".md", lambda t: b" \n\t\n"),
    "binary text": (".txt", lambda t: encrypted()),
    "binary html": (".html", lambda t: encrypted()),
    "encrypted pdf": (".pdf", _locked_pdf),
    "cut pdf": (".pdf", lambda t: make_pdf(book_pages())[:600]),
    "renamed pdf": (".pdf", lambda t: encrypted()),
    "no page pdf": (".pdf", _no_page_pdf),
    "scanned pdf": (".pdf", lambda t: make_pdf(["0 0 612 792 re f"])),
    "not a zip epub": (".epub", lambda t: b"just text"),
    "drm epub": (".epub", _epub_bytes(extra={"META-INF/rights.xml": "<rights/>"})),
    "broken epub": (".epub", _epub_bytes(extra={"OEBPS/content.opf": encrypted()})),
    "encrypted chapters epub": (".epub", _epub_bytes(extra={f"OEBPS/ch{i}.xhtml": encrypted() for i in (1, 2, 3)})),
    "empty spine epub": (".epub", lambda t: make_epub(t / "built.epub", {"OEBPS/content.opf": _opf(
        t, r"<spine(.*?)>.*</spine>", r"<spine\1></spine>")}).read_bytes()),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_every_message_names_the_upload_once_never_its_stored_path(tmp_path: Path, case: str):
    """The library stores an upload as <sha256>.<ext> and passes its original name: messages show that."""
    suffix, build = UNREADABLE[case]
    stored = tmp_path / "library" / f"{hashlib.sha256(case.encode()).hexdigest()}{suffix}"
    stored.parent.mkdir()
    if build == "dir":
        stored.mkdir()
    elif build is not None:
        stored.write_bytes(build(tmp_path))
    name = f"Révision finale (v2){suffix}"
    with pytest.raises(DocumentError) as info:
        read_document(stored, max_bytes=2**20, name=name)
    message = str(info.value)
    assert_plain(message, name)
    assert stored.stem not in message and str(tmp_path) not in message


# ---------------------------------------------------------------- a real book

LSHORT_SYSTEM = Path("/usr/share/doc/texlive-doc/latex/lshort-english/lshort.pdf")


def _fetch_lshort(dest: Path) -> None:
    """Download Debian's texlive-lang-english (~180 MB .deb) and pull lshort.pdf out of it.

    Only the one member is extracted, streaming the package's data tarball, so nothing near
    the package's 200 MB unpacked size touches the disk.
    """
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        pytest.skip("apt-get/dpkg-deb not available to fetch lshort.pdf")
    work = dest.parent / "lshort-download"
    work.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "texlive-lang-english"], cwd=work, check=True,
                       capture_output=True, timeout=120)
        deb = next(work.glob("texlive-lang-english_*.deb"))
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=unpack.stdout, mode="r|") as tar:
            for member in tar:
                if member.name.endswith("lshort-english/lshort.pdf"):
                    dest.write_bytes(tar.extractfile(member).read())
                    break
        unpack.stdout.close()
        unpack.kill()
        unpack.wait(timeout=30)
    except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError) as exc:
        pytest.skip(f"could not fetch lshort.pdf: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not dest.exists():
        pytest.skip("lshort.pdf not found inside texlive-lang-english")


def test_real_book_lshort(request, capsys):
    """lshort.pdf, 'The Not So Short Introduction to LaTeX', about 150 pages.

    Looked for at LSHORT_PDF (if set), the Debian doc path, then the pytest cache
    (.pytest_cache, gitignored); fetched with apt-get into the cache otherwise, or skipped.
    """
    env = os.environ.get("LSHORT_PDF")
    cached = Path(env) if env else request.config.cache.mkdir("readers") / "lshort.pdf"
    path = next((p for p in (cached, LSHORT_SYSTEM) if p.is_file()), None)
    if path is None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _fetch_lshort(cached)
        path = cached
    doc = read_document(path)
    assert len(doc.pages) > 100
    assert "LaTeX" in doc.title or "LaTeX" in doc.text
    middle = doc.pages[doc.page_at([len(doc.text) // 2])[0]]
    last = doc.pages[-1].number
    assert last * 0.25 < middle.number < last * 0.75
    assert doc.page_at([doc.pages[-1].end - 1]) == [len(doc.pages) - 1]
    assert "fontTools" not in capsys.readouterr().err  # pypdf's font warnings stay in doc.log
