"""Tests for storage.readers. Every fixture file is generated at run time under tmp_path."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import warnings
import zipfile
from pathlib import Path

import pypdf
import pytest

from storage import readers
from storage.readers import SUPPORTED, Document, DocumentError, Page, clean_text, read_document, \
    strip_running_lines


# ---------------------------------------------------------------- fixture builders

def _pdf_string(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str] | str], title: str | None = None, xref_shift: int = 0) -> bytes:
    """A minimal valid PDF written by hand, since pypdf cannot lay out text.

    A page given as a list of strings gets one Helvetica text line per entry; a page given as a
    str is used as its raw content stream (e.g. a drawing with no text). `xref_shift` moves every
    xref offset to make pypdf repair the file and log warnings about it.
    """
    objs: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
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


def make_epub(path: Path, extra: dict[str, str] | None = None) -> Path:
    """A small EPUB 2: chapter 1 is in the TOC, chapter 2 only has an <h1>, chapter 3 neither."""
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
            z.writestr(name, text, compress_type=zipfile.ZIP_DEFLATED)
    return path


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
    pages = [f"Header\nbody {n}\nPage {n}" for n in range(1, 5)]
    assert strip_running_lines(pages) == [f"body {n}" for n in range(1, 5)]


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


def test_epub_font_obfuscation_is_not_drm(tmp_path: Path):
    xml = ENCRYPTION_XML.format(algorithm="http://www.idpf.org/2008/embedding", uri="OEBPS/font.otf")
    doc = read_document(make_epub(tmp_path / "fonts.epub", {"META-INF/encryption.xml": xml}))
    assert len(doc.pages) == 3


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
    _raises(write(tmp_path / "cut.pdf", data[: len(data) // 2]), "is not a readable PDF")


def test_binary_renamed_to_pdf(tmp_path: Path):
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)
    _raises(write(tmp_path / "image.pdf", data), "is not a readable PDF")


def test_zero_page_pdf(tmp_path: Path):
    path = tmp_path / "nothing.pdf"
    pypdf.PdfWriter().write(path)
    _raises(path, "has no pages")


def test_scanned_pdf_without_text_layer(tmp_path: Path):
    # pages that only draw (an image stand-in), as a scanner's output would
    path = write(tmp_path / "scan.pdf", make_pdf(["0 0 612 792 re f"] * 2))
    _raises(path, "has no text layer; it looks scanned")


def test_drm_epub_encryption_xml(tmp_path: Path):
    xml = ENCRYPTION_XML.format(algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc", uri="OEBPS/ch1.xhtml")
    _raises(make_epub(tmp_path / "drm.epub", {"META-INF/encryption.xml": xml}), "is DRM-protected")


def test_drm_epub_rights_xml(tmp_path: Path):
    _raises(make_epub(tmp_path / "adobe.epub", {"META-INF/rights.xml": "<rights/>"}), "is DRM-protected")


def test_non_zip_epub(tmp_path: Path):
    _raises(write(tmp_path / "fake.epub", "just text, not a zip"), "is not a readable EPUB")


def test_zip_without_epub_structure(tmp_path: Path):
    path = tmp_path / "archive.epub"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "a plain zip, no container.xml")
    _raises(path, "is not a readable EPUB")


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
