"""PDF files: each page's text layer (pypdf), its printed number (/PageLabels, or the running heads), and a
readable reason for every file that cannot be read."""
from __future__ import annotations

import io

from pypdf import PdfReader

from .document import DocumentError, Section
from .running import numbering, page_label, printed_numbers, strip_running_lines


def read_pdf(name: str, data: bytes, log: list[str]) -> tuple[str, list[Section]]:
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
    numbers = numbering(texts)
    texts = strip_running_lines(texts, numbers.offsets)
    try:
        title = str((reader.metadata or {}).get("/Title") or "").strip()
    except Exception:  # broken metadata is not worth refusing the book for
        title = ""
    printed = printed_numbers(numbers.pages, _page_labels(reader, log))
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


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
