"""The first stage: a file (PDF, EPUB, text, Markdown, HTML) becomes a Document, its text with its pages.

Readers of each kind sit in their own module (pdf, epub, markup, text); a PDF's running heads and printed
page numbers beside the PDF reader (running), its pages as pictures (page_images). Nothing here stores
anything: the library (storage/) keeps the files and the rows.
"""
from .document import Document, DocumentError, Page
from .read import MAX_BYTES, SUPPORTED, file_type, read_document

__all__ = ["MAX_BYTES", "SUPPORTED", "Document", "DocumentError", "Page", "file_type", "read_document"]
