"""Turn a book-like file into clean text plus a map from character offsets to pages.

Every token and memory block the engine builds is later traced back to a page (PDF) or a
chapter/section (EPUB, HTML, Markdown, text) through `Document.pages` and `Document.page_at`.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import logging
import posixpath
import re
import warnings
import zipfile
import zlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ebooklib
from bs4 import BeautifulSoup, NavigableString
from ebooklib import epub
from lxml import etree
from pypdf import PdfReader

SUPPORTED = (".pdf", ".epub", ".txt", ".md", ".html", ".htm")
MAX_BYTES = 200 * 2**20     # the largest file read by default (the app's --max-upload-mb)

# Libraries whose log records belong in Document.log rather than on the user's console.
_LIBRARY_LOGGERS = ("pypdf", "ebooklib")
# Font obfuscation is not DRM: DRM-free EPUBs list obfuscated fonts in encryption.xml too
# (EPUB 3.3 OCF, "Font obfuscation": the IDPF algorithm, and Adobe's older one).
_FONT_OBFUSCATION = {"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"}
# Files in META-INF that name a DRM scheme (lower case; the check ignores case).
_DRM_FILES = {"meta-inf/rights.xml": "Adobe DRM",          # Adobe ADEPT, and Barnes & Noble's
              "meta-inf/license.lcpl": "Readium LCP",
              "meta-inf/sinf.xml": "Apple FairPlay"}
_OPF_NS = "http://www.idpf.org/2007/opf"
_XML_PARSER = etree.XMLParser(recover=True, resolve_entities=False, no_network=True)  # as ebooklib's
# Byte-order marks, UTF-32 before UTF-16 (the UTF-32-LE mark starts with the UTF-16-LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Control bytes that do not occur in text (tab, newlines, form feed and escape do).
_BINARY_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b") + b"\x7f"
_TEXT_BYTES = bytes(b for b in range(256) if b not in _BINARY_BYTES)
_BLOCK_TAGS = ("p", "div", "section", "article", "blockquote", "pre", "li", "tr", "table",
               "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "header", "footer",
               "h1", "h2", "h3", "h4", "h5", "h6", "hr")
_SECTION_MARK = "\x00section\x00"  # NULs do not occur in real HTML text, so splitting is safe


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


def file_type(name: str) -> str:
    """The lower-case suffix of a supported file name; DocumentError names the supported ones otherwise."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED:
        raise DocumentError(f"{name} has an unsupported file type '{suffix or '(none)'}'; "
                            f"supported types are {', '.join(SUPPORTED)}.")
    return suffix


def read_document(path: Path, max_bytes: int = MAX_BYTES, name: str | None = None) -> Document:
    """Read a PDF, EPUB, text, Markdown or HTML file; raise DocumentError on anything unusable.

    name: the name to show (an upload's original name) when the file is stored under another one.
    """
    path = Path(path)
    where = name or str(path)  # a missing path is best shown in full, unless it is a storage path
    name = name or path.name
    if not path.exists():
        raise DocumentError(f"{where} does not exist.")
    if path.is_dir():
        raise DocumentError(f"{where} is a directory, not a file.")
    suffix = file_type(name)
    size = path.stat().st_size
    if size == 0:
        raise DocumentError(f"{name} is empty (0 bytes).")
    if size > max_bytes:
        raise DocumentError(f"{name} is {_mb(size)} MB, over the {_mb(max_bytes)} MB limit.")
    try:
        data = path.read_bytes()
    except OSError as exc:  # str(exc) would show the storage path
        reason = (exc.strerror or "input/output error").lower()
        raise DocumentError(f"{name} could not be read ({reason}).") from exc
    kind = "html" if suffix == ".htm" else suffix[1:]
    log: list[str] = []
    with _capture_library_logs(log):
        if kind == "pdf":
            title, sections = _read_pdf(name, data, log)
        elif kind == "epub":
            title, sections = _read_epub(name, data, log)
        elif kind == "html":
            title, sections = _read_html(name, data)
        else:
            title, sections = _read_plain(kind, _decode(name, data, log))
    title = title or Path(name).stem
    text, pages = _assemble(sections)
    if not pages:
        raise DocumentError(f"{name} is empty: no text was found in it.")
    return Document(title=title, source_name=name, kind=kind, text=text, pages=pages,
                    sha256=hashlib.sha256(data).hexdigest(), log=_dedupe(log))


# A section is (number, label, raw text) or, for a PDF page, (number, label, raw text, printed number);
# text is cleaned in _assemble.
Section = tuple[int, str, str] | tuple[int, str, str, str | None]


def _assemble(sections: Sequence[Section]) -> tuple[str, list[Page]]:
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


def _read_pdf(name: str, data: bytes, log: list[str]) -> tuple[str, list[Section]]:
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:  # owner-password-only PDFs open with the empty user password
                opened = bool(reader.decrypt(""))
            except Exception as exc:  # e.g. an algorithm pypdf cannot handle without extras
                log.append(f"decrypt: {exc}")
                opened = False
            if not opened:
                raise DocumentError(f"{name} is encrypted; remove the password and try again.")
        count = len(reader.pages)
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises PdfReadError, PdfStreamError and plain errors alike
        raise DocumentError(f"{name} is not a readable PDF: {_pdf_problem(data)}.") from exc
    if count == 0:
        raise DocumentError(f"{name} has no pages.")
    texts: list[str] = []
    failures = 0
    for i in range(count):
        try:
            texts.append(reader.pages[i].extract_text() or "")
        except Exception as exc:  # one bad page should not cost the whole book
            log.append(f"p. {i + 1}: text extraction failed: {_short(exc)}")
            texts.append("")
            failures += 1
    if failures == count:
        raise DocumentError(f"{name} is not a readable PDF: none of its pages could be read "
                            "(the file is damaged).")
    if not any(t.strip() for t in texts):
        raise DocumentError(f"{name} has no text layer; it looks scanned. Run OCR on it first.")
    texts = [t.replace("\r\n", "\n").replace("\r", "\n") for t in texts]
    offsets = running_offsets(texts)
    texts = strip_running_lines(texts, offsets)
    try:
        title = str((reader.metadata or {}).get("/Title") or "").strip()
    except Exception:  # broken metadata is not worth refusing the book for
        title = ""
    printed = printed_numbers(count, offsets, _page_labels(reader, log))
    numbered = any(printed)
    return title, [(i + 1, page_label(i + 1, printed[i], numbered), t, printed[i]) for i, t in enumerate(texts)]


def _page_labels(reader: PdfReader, log: list[str]) -> list[str] | None:
    """The PDF's own page labels (/PageLabels: "i", "ii", ..., "1"), or None where it has none."""
    try:
        if "/PageLabels" not in reader.trailer["/Root"]:
            return None
        labels = list(reader.page_labels)
        return labels if len(labels) == len(reader.pages) and all(labels) else None
    except Exception as exc:  # a broken label tree costs the printed numbers, not the book
        log.append(f"page labels: {_short(exc)}")
        return None


def _pdf_problem(data: bytes) -> str:
    """Why pypdf could not open `data`, in words: not a PDF, cut short, or damaged."""
    if b"%PDF-" not in data[:1024]:  # readers accept junk before the header, up to 1 KB
        return "it is not a PDF at all (perhaps another kind of file renamed to .pdf)"
    if b"%%EOF" not in data[-2048:]:
        return "the file is cut short (perhaps an unfinished download)"
    return "the file is damaged"


def _read_epub(name: str, data: bytes, log: list[str]) -> tuple[str, list[Section]]:
    def broken(why: str) -> DocumentError:
        return DocumentError(f"{name} is not a readable EPUB: {why}.")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        if data.startswith(b"PK\x03\x04"):  # a zip's first entry, but no directory at the end
            raise broken("the file is cut short or damaged (perhaps an unfinished download)") from exc
        raise broken("it is not a zip archive, as every EPUB is") from exc
    with zf:
        if any(info.flag_bits & 0x1 for info in zf.infolist()):  # reading them raises RuntimeError
            raise broken("its contents are locked with a zip password")
        try:
            scheme = _epub_drm(zf, log)
            if scheme is not None:
                raise DocumentError(f"{name} is DRM-protected{f' ({scheme})' if scheme else ''}, so its text "
                                    "is encrypted and cannot be read. Use a DRM-free copy of the book instead.")
            _check_epub_package(name, zf, broken)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise broken(_epub_problem(exc)) from exc
    try:
        book = epub.read_epub(io.BytesIO(data))
    except Exception as exc:  # ebooklib raises EpubException, KeyError, AttributeError, lxml errors...
        raise broken(_epub_problem(exc)) from exc
    toc: dict[str, str] = {}
    _collect_toc(book.toc, toc)
    meta = book.get_metadata("DC", "title")
    title = str(meta[0][0]).strip() if meta else ""
    sections: list[Section] = []
    unreadable = 0
    for idref, _linear in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT or isinstance(item, epub.EpubNav):
            continue
        content = item.content or b""
        if _looks_binary(content):  # encrypted without saying so (or damaged): not XHTML
            unreadable += 1
            log.append(f"{item.get_name()}: not text (encrypted or damaged), skipped")
            continue
        soup = BeautifulSoup(content, "lxml")
        # The TOC is the author's own label; <title> often just repeats the book title.
        page_title = _heading(soup, "title")
        label = (toc.get(item.get_name()) or _heading(soup, "h1") or _heading(soup, "h2")
                 or (page_title if page_title != title else ""))
        text = _html_text(soup)
        if text.strip():
            number = len(sections) + 1
            sections.append((number, label or f"Chapter {number}", text))
    if not sections and unreadable:
        raise DocumentError(f"{name} cannot be read: its chapters are encrypted or damaged. "
                            "If the book came with DRM, use a DRM-free copy of the book instead.")
    if not sections:
        log.append("no chapter with text in the spine")
    return title, sections


def _epub_drm(zf: zipfile.ZipFile, log: list[str]) -> str | None:
    """The DRM protecting an EPUB ("" when it names no scheme), or None for a DRM-free book.

    DRM shows as META-INF/rights.xml (Adobe ADEPT) or as META-INF/encryption.xml encrypting files
    with a real cipher (Adobe, Readium LCP, Apple FairPlay...); encryption.xml that only obfuscates
    fonts is not DRM. Names are compared ignoring case, and namespaces ignored, to catch sloppy files.
    """
    names = {n.lower().lstrip("/"): n for n in zf.namelist()}
    schemes = [scheme for file, scheme in _DRM_FILES.items() if file in names]
    encryption = names.get("meta-inf/encryption.xml")
    if "meta-inf/rights.xml" in names or (encryption and _encrypts_content(zf.read(encryption), log)):
        return schemes[0] if schemes else ""
    return None


def _encrypts_content(xml: bytes, log: list[str]) -> bool:
    """Whether encryption.xml encrypts a file with anything but font obfuscation."""
    root = _parse_xml(xml)
    if root is None:  # the chapters themselves will show whether anything is encrypted
        log.append("META-INF/encryption.xml is not readable XML; ignored")
        return False
    for data in root.iter("{*}EncryptedData"):
        method = next(data.iter("{*}EncryptionMethod"), None)
        if method is None or method.get("Algorithm") not in _FONT_OBFUSCATION:
            return True
    return False


def _check_epub_package(name: str, zf: zipfile.ZipFile, broken) -> None:
    """Check what ebooklib reads first (container, package file, spine), to say what is wrong."""
    names = set(zf.namelist())
    if "META-INF/container.xml" not in names:
        raise broken("it has no META-INF/container.xml, the file that says where the book's contents are")
    container = _parse_xml(zf.read("META-INF/container.xml"))
    rootfiles = [] if container is None else [
        r.get("full-path") for r in container.iter("{*}rootfile")
        if r.get("media-type") == "application/oebps-package+xml" and r.get("full-path")]
    if not rootfiles:
        raise broken("its META-INF/container.xml is damaged (it does not say where the book's contents are)")
    opf = posixpath.normpath(rootfiles[-1])  # ebooklib takes the last one
    if opf not in names:
        raise broken(f"its package file {opf}, which lists the book's contents, is missing")
    package = _parse_xml(zf.read(opf))
    parts = [None if package is None else package.find(f"{{{_OPF_NS}}}{part}")
             for part in ("metadata", "manifest", "spine")]
    if any(part is None for part in parts):
        raise broken(f"its package file {opf}, which lists the book's contents, is damaged")
    if not len(parts[2]):
        raise DocumentError(f"{name} has no chapters to read: the reading order (spine) in {opf} is empty.")


def _epub_problem(exc: Exception) -> str:
    """What an exception from zipfile or ebooklib means for the user, without its wording."""
    missing = re.search(r"There is no item named '(.+?)' in the archive", str(exc))
    if isinstance(exc, KeyError) and missing:
        return f"{missing.group(1)} is listed in it but missing from the file (it may be incomplete)"
    if isinstance(exc, (zipfile.BadZipFile, zlib.error, EOFError)):  # e.g. "Bad CRC-32"
        return "its compressed data is damaged"
    if isinstance(exc, NotImplementedError):  # "That compression method is not supported"
        return "it is compressed with a method that is not supported"
    return "its structure is damaged"


def _parse_xml(data: bytes) -> etree._Element | None:
    """The root of an XML file, parsed as leniently as ebooklib does; None when there is none."""
    try:
        return etree.fromstring(data, _XML_PARSER)
    except etree.XMLSyntaxError:
        return None


def _collect_toc(entries: object, into: dict[str, str]) -> None:
    """Map file name -> title; a file's first TOC entry wins (later ones point at subsections)."""
    for entry in entries or []:
        children = None
        if isinstance(entry, tuple):  # ebooklib nests as (Section, [children])
            entry, children = entry
        href, title = getattr(entry, "href", None), getattr(entry, "title", None)
        if href and title:
            into.setdefault(href.split("#", 1)[0], " ".join(str(title).split()))
        if children:
            _collect_toc(children, into)


def _heading(soup: BeautifulSoup, tag: str) -> str:
    found = soup.find(tag)
    return " ".join(found.get_text(" ").split()) if found else ""


def _html_text(soup: BeautifulSoup, mark_sections: bool = False) -> str:
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


def _read_html(name: str, data: bytes) -> tuple[str, list[Section]]:
    if _looks_binary(data):
        raise DocumentError(f"{name} does not look like an HTML file: it contains binary data "
                            f"(perhaps another kind of file renamed to {Path(name).suffix}).")
    soup = BeautifulSoup(data, "lxml")  # bytes, so a <meta charset> is honoured
    title = _heading(soup, "title") or _heading(soup, "h1")
    first, *rest = _html_text(soup, mark_sections=True).split(_SECTION_MARK)
    # each later chunk starts with its heading's text, which is the section's label
    return title, _number([("start", first)] + [(c.strip().split("\n", 1)[0], c) for c in rest])


def _read_plain(kind: str, text: str) -> tuple[str, list[Section]]:
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
    return title, _number(labelled)


def _number(chunks: list[tuple[str, str]]) -> list[Section]:
    """Number the (label, text) chunks that have text, 1-based."""
    kept = [(label, text) for label, text in chunks if clean_text(text)]
    return [(i + 1, label, text) for i, (label, text) in enumerate(kept)]


def _decode(name: str, data: bytes, log: list[str]) -> str:
    """Text from a byte-order mark's encoding, else UTF-8, else Windows-1252, else Latin-1."""
    codec = _bom_codec(data)
    if codec:
        text = data.decode(codec, errors="replace")
        if "\ufffd" in text:
            log.append(f"file is not valid {codec.upper().removesuffix('-SIG')}; bad bytes replaced")
        return text
    if _looks_binary(data):
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


def _bom_codec(data: bytes) -> str | None:
    return next((codec for bom, codec in _BOMS if data.startswith(bom)), None)


def _looks_binary(data: bytes) -> bool:
    """More than 1% control bytes that text never has (NUL among them): not text, not XHTML.

    Text with a byte-order mark (UTF-16 and UTF-32 are full of NULs) counts as text.
    """
    if _bom_codec(data):
        return False
    sample = data[:65536]
    return len(sample.translate(None, _TEXT_BYTES)) * 100 > len(sample)


@contextmanager
def _capture_library_logs(log: list[str]) -> Iterator[None]:
    """Route library log records and warnings into `log` instead of the console, then restore."""

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record must not break reading
                message = str(record.msg)
            log.append(f"{record.name}: {message}")

    handler = ListHandler(logging.WARNING)
    saved = []
    for logger_name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(logger_name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)  # inherit nothing: a quiet root would hide warnings
    try:
        # Not thread-safe (a Python limitation of catch_warnings); reads are expected serially.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                log.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)


def _dedupe(log: list[str]) -> list[str]:
    """Per-glyph font warnings repeat hundreds of times; keep one line each with a count."""
    counts = Counter(log)
    return [m if counts[m] == 1 else f"{m} (x{counts[m]})" for m in dict.fromkeys(log)]


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}".removesuffix(".0")
