"""Read a file of any supported kind into a Document, or say in one line why it cannot be read."""
from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .document import Document, DocumentError, assemble
from .epub import read_epub
from .markup import read_html
from .pdf import read_pdf
from .text import decode, read_plain


SUPPORTED = (".pdf", ".epub", ".txt", ".md", ".html", ".htm")
MAX_BYTES = 200 * 2**20     # the largest file read by default (the app's --max-upload-mb)
# Libraries whose log records belong in Document.log rather than on the user's console.
_LIBRARY_LOGGERS = ("pypdf", "ebooklib")


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
            title, sections = read_pdf(name, data, log)
        elif kind == "epub":
            title, sections = read_epub(name, data, log)
        elif kind == "html":
            title, sections = read_html(name, data)
        else:
            title, sections = read_plain(kind, decode(name, data, log))
    title = title or Path(name).stem
    text, pages = assemble(sections)
    if not pages:
        raise DocumentError(f"{name} is empty: no text was found in it.")
    return Document(title=title, source_name=name, kind=kind, text=text, pages=pages,
                    sha256=hashlib.sha256(data).hexdigest(), log=_dedupe(log))


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


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}".removesuffix(".0")
