"""EPUB files: the chapters of the reading order (spine), labelled by the book's own contents; DRM and damage
said in words."""
from __future__ import annotations

import io
import posixpath
import re
import zipfile
import zlib

import ebooklib
from bs4 import BeautifulSoup
from ebooklib import epub
from lxml import etree

from .document import DocumentError, Section
from .markup import heading, html_text
from .text import looks_binary

# Font obfuscation is not DRM: DRM-free EPUBs list obfuscated fonts in encryption.xml too
# (EPUB 3.3 OCF, "Font obfuscation": the IDPF algorithm, and Adobe's older one).
_FONT_OBFUSCATION = {"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"}
# Files in META-INF that name a DRM scheme (lower case; the check ignores case).
_DRM_FILES = {"meta-inf/rights.xml": "Adobe DRM",          # Adobe ADEPT, and Barnes & Noble's
              "meta-inf/license.lcpl": "Readium LCP",
              "meta-inf/sinf.xml": "Apple FairPlay"}
_OPF_NS = "http://www.idpf.org/2007/opf"
_XML_PARSER = etree.XMLParser(recover=True, resolve_entities=False, no_network=True)  # as ebooklib's


def read_epub(name: str, data: bytes, log: list[str]) -> tuple[str, list[Section]]:
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
        if looks_binary(content):  # encrypted without saying so (or damaged): not XHTML
            unreadable += 1
            log.append(f"{item.get_name()}: not text (encrypted or damaged), skipped")
            continue
        soup = BeautifulSoup(content, "lxml")
        # The TOC is the author's own label; <title> often just repeats the book title.
        page_title = heading(soup, "title")
        label = (toc.get(item.get_name()) or heading(soup, "h1") or heading(soup, "h2")
                 or (page_title if page_title != title else ""))
        text = html_text(soup)
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
