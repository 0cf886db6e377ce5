"""The library: documents, their pages, texts and spans, searched by their words. SQL through sqlite-utils.

A Library is one folder: library.db (storage.schema), the kept uploads (uploads/<sha256>.<ext>), and each
document's memory (storage.memory_files); its conversations are storage.conversations'. Each connection
is a thread's own: the page reads while the model thread writes (WAL allows both).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
import shutil
import sqlite3
import sys
import threading
from array import array
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

import torch
from sqlite_utils import Database

from . import lexical
from .conversations import Conversations
from .memory_files import MemoryFiles, folder_bytes
from .errors import LibraryError
from .schema import migrate

__all__ = ["Library", "LibraryError", "Status"]


class Status(StrEnum):
    """A document's status column. A StrEnum: rows read back from SQLite compare equal to it."""

    READING = "reading"     # being read, or paused (the app stopped): reading it again resumes
    READY = "ready"         # fully read: it can be asked
    FAILED = "failed"       # the last reading failed (documents.error says why); reading it again resumes


class Library(MemoryFiles, Conversations):
    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.db.execute("PRAGMA journal_mode = WAL")
        migrate(self.db)

    @property
    def db(self) -> Database:
        """One connection per thread: the UI reads while a background ingest writes (WAL allows both)."""
        if not hasattr(self._local, "db"):
            self._local.db = Database(self.dir / "library.db")
            self._local.db.execute("PRAGMA foreign_keys = ON")
        return self._local.db

    # -- documents --------------------------------------------------------------------------------
    def documents(self) -> list[dict]:
        """Every document's row, with the mode it was read in ("method", from its config)."""
        return list(self.db.query("SELECT *, json_extract(config, '$.method') AS method FROM documents ORDER BY id"))

    def document(self, ref: int | str) -> dict:
        """A document by id, or by title (exact, then unique prefix)."""
        rows = []
        if isinstance(ref, int) or str(ref).isdigit():
            rows = list(self.db.query("SELECT * FROM documents WHERE id = ?", [int(ref)]))
        if not rows:
            rows = list(self.db.query("SELECT * FROM documents WHERE title = ?", [str(ref)]))
        if not rows:
            rows = list(self.db.query("SELECT * FROM documents WHERE title LIKE ? || '%'", [str(ref)]))
        if len(rows) != 1:
            raise LibraryError(f"no document {ref!r} in the library" if not rows else
                               f"{ref!r} matches {len(rows)} documents; use its id")
        return rows[0]

    def find(self, sha256: str, fingerprint: str, config_hash: str) -> dict | None:
        rows = list(self.db.query(
            "SELECT * FROM documents WHERE sha256 = ? AND model_fingerprint = ? AND config_hash = ?",
            [sha256, fingerprint, config_hash]))
        return rows[0] if rows else None

    def add(self, *, title: str, source_name: str, kind: str, sha256: str, fingerprint: str, config_hash: str,
            config: dict, tokens: int, pages: list[dict], memory_format: int, upload: str | None = None,
            text: str | None = None, token_starts: Sequence[int] | None = None) -> int:
        """A new document in status 'reading', with its pages (rows of the pages table: label, start_token,
        end_token, physical, printed, start_char, end_char) and its text with where each token starts."""
        with self.db.conn:
            doc_id = self.db["documents"].insert(dict(
                title=title, source_name=source_name, kind=kind, sha256=sha256, model_fingerprint=fingerprint,
                config_hash=config_hash, config=json.dumps(config), status=Status.READING, pages=len(pages), tokens=tokens,
                upload=upload, memory_format=memory_format)).last_pk
            self.db["pages"].insert_all(dict(page, document_id=doc_id, number=i + 1) for i, page in enumerate(pages))
            if text is not None:
                self._insert_text(doc_id, text, token_starts)
        self.memory_dir(doc_id).mkdir(parents=True, exist_ok=True)
        return doc_id

    def pages(self, doc_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM pages WHERE document_id = ? ORDER BY number", [doc_id]))

    def text(self, doc_id: int) -> tuple[str, array] | None:
        """The document's text and where each token starts in it (int32), or None (read before they were kept)."""
        row = next(self.db.query("SELECT text, token_starts FROM texts WHERE document_id = ?", [doc_id]), None)
        if row is None:
            return None
        starts = array("i")
        starts.frombytes(row["token_starts"])
        if sys.byteorder != "little":
            starts.byteswap()
        return row["text"], starts

    def set_text(self, doc_id: int, text: str, token_starts: Sequence[int], pages: list[dict]) -> None:
        """Give a document read before texts were kept its text, and its pages their columns (reading.ingest.backfill).

        pages: the columns to set on each stored page, in order (as Library.add takes them)."""
        with self.db.conn:
            self._insert_text(doc_id, text, token_starts)
            self._update_pages(doc_id, pages)

    def set_pages(self, doc_id: int, pages: list[dict]) -> None:
        """Set columns of a document's stored pages, in order (an empty dict leaves a page as it is)."""
        with self.db.conn:
            self._update_pages(doc_id, pages)

    def _update_pages(self, doc_id: int, pages: list[dict]) -> None:
        for number, page in enumerate(pages, 1):
            if page:
                self.db["pages"].update((doc_id, number), page)

    def _insert_text(self, doc_id: int, text: str, token_starts: Sequence[int]) -> None:
        starts = array("i", token_starts)
        if sys.byteorder != "little":
            starts.byteswap()
        self.db["texts"].insert({"document_id": doc_id, "text": text, "token_starts": starts.tobytes()}, replace=True)

    def blocks(self, doc_id: int) -> list[dict]:
        """The memory blocks: row i is block i of every layer."""
        return list(self.db.query("SELECT * FROM blocks WHERE document_id = ? AND in_memory ORDER BY block", [doc_id]))

    def spans(self, doc_id: int) -> list[dict]:
        """The memory blocks, then the block-sized spans of the local window (in_memory 0): what can be cited."""
        return list(self.db.query("SELECT * FROM blocks WHERE document_id = ? ORDER BY block", [doc_id]))

    def meaning(self, doc_id: int, encoder: str) -> torch.Tensor | None:
        """[spans, dim] float16 the document's spans' embeddings by `encoder`, or None (not made yet)."""
        row = next(self.db.query("SELECT dim, vectors FROM meanings WHERE document_id = ? AND encoder = ?",
                                 [doc_id, encoder]), None)
        if row is None:
            return None
        vectors = torch.frombuffer(bytearray(row["vectors"]), dtype=torch.float16)
        if sys.byteorder != "little":
            vectors = vectors.view(torch.int16).byteswap().view(torch.float16)
        return vectors.view(-1, row["dim"])

    def set_meaning(self, doc_id: int, encoder: str, vectors: torch.Tensor) -> None:
        """Keep the document's spans' embeddings [spans, dim] (stored as float16: 2 bytes a number)."""
        data = vectors.detach().to(torch.float16).contiguous().cpu().numpy()
        if sys.byteorder != "little":
            data = data.byteswap()
        with self.db.conn:
            self.db["meanings"].upsert({"document_id": doc_id, "encoder": encoder, "dim": vectors.shape[1],
                                        "vectors": data.tobytes()}, pk="document_id")

    def search(self, doc_ids: Sequence[int], question: str, limit: int = 32) -> dict[int, dict[int, float]]:
        """Document -> span number (as in spans()) -> BM25 score of the `limit` best spans of these documents
        that share words with the question, from one query (the scores compare)."""
        return lexical.search(self.db, list(doc_ids), question, limit)

    def delete(self, doc_id: int) -> None:
        upload = self.document(doc_id)["upload"]
        with self.db.conn:
            self.db.execute("DELETE FROM documents WHERE id = ?", [doc_id])
            self.db.execute("DELETE FROM span_words WHERE document_id = ?", [doc_id])
        shutil.rmtree(self.memory_dir(doc_id), ignore_errors=True)
        if upload and not list(self.db.query("SELECT id FROM documents WHERE upload = ?", [upload])):
            (self.dir / "uploads" / upload).unlink(missing_ok=True)

    def finish(self, doc_id: int, block_spans: list[tuple[int, int]], texts: list[str] | None = None,
               n_memory: int | None = None) -> None:
        """Mark a fully read document ready, with each span's tokens mapped to pages (and its text).

        The first n_memory spans (default: all) are memory blocks; the rest are pieces of the local window.
        """
        n_memory = len(block_spans) if n_memory is None else n_memory
        pages = self.pages(doc_id)
        starts = [p["start_token"] for p in pages]
        def page_of(token: int) -> int:
            return max(1, bisect.bisect_right(starts, token))
        with self.db.conn:
            self.db["blocks"].insert_all(
                dict(document_id=doc_id, block=i, start_token=a, end_token=b, first_page=page_of(a),
                     last_page=page_of(b - 1), text=texts[i] if texts else None, in_memory=int(i < n_memory))
                for i, (a, b) in enumerate(block_spans))
            if texts:
                self.db["span_words"].insert_all(dict(text=t, document_id=doc_id, span=i) for i, t in enumerate(texts))
            self.db["documents"].update(doc_id, {"status": Status.READY, "bytes": folder_bytes(self.memory_dir(doc_id))})

    # -- uploads ----------------------------------------------------------------------------------
    def keep_upload(self, source: Path, suffix: str) -> Path:
        """Copy an uploaded file into the library as <sha256><suffix> (".pdf": documents.file_type gives it): its
        own name never becomes a path."""
        if not re.fullmatch(r"\.[a-z0-9]{1,8}", suffix):
            raise LibraryError(f"{suffix!r} is not a file type")
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        folder = self.dir / "uploads"
        folder.mkdir(exist_ok=True)
        kept = folder / f"{digest.hexdigest()}{suffix}"
        if not kept.exists():
            partial = kept.with_suffix(".partial")
            shutil.copyfile(source, partial)
            partial.replace(kept)
        return kept

    def upload_path(self, doc_id: int) -> Path | None:
        upload = self.document(doc_id)["upload"]
        path = self.dir / "uploads" / upload if upload else None
        return path if path is not None and path.exists() else None

    def to_upgrade(self) -> list[dict]:
        """The documents that reading.upgrade has work on (schema step 9)."""
        return list(self.db.query("SELECT * FROM documents WHERE upgrade ORDER BY id"))

    def upgraded(self, doc_id: int) -> None:
        with self.db.conn:
            self.db["documents"].update(doc_id, {"upgrade": 0})

    def set_config_hash(self, doc_id: int, config_hash: str) -> None:
        """Re-key a document (its config's hash rule changed); skipped where the new key is taken."""
        try:
            with self.db.conn:
                self.db["documents"].update(doc_id, {"config_hash": config_hash})
        except sqlite3.IntegrityError:
            pass

    def restart(self, doc_id: int, memory_format: int) -> None:
        """Forget a document's partial memory (its reading starts again from the first token, in the
        given memory format); its pages, upload and conversations stay."""
        with self.db.conn:
            self.db["documents"].update(doc_id, {"read_tokens": 0, "n_blocks": 0, "state_file": None, "bytes": 0,
                                                 "read_seconds": 0, "memory_format": memory_format})
            self.db.execute("DELETE FROM blocks WHERE document_id = ?", [doc_id])
            self.db.execute("DELETE FROM span_words WHERE document_id = ?", [doc_id])
            self.db.execute("DELETE FROM meanings WHERE document_id = ?", [doc_id])
        folder = self.memory_dir(doc_id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    def fail(self, doc_id: int, error: str) -> None:
        with self.db.conn:
            self.db["documents"].update(doc_id, {"status": Status.FAILED, "error": error})

    def resume(self, doc_id: int) -> None:
        """A failed or paused document is being read again: it is 'reading' (not deletable) meanwhile."""
        with self.db.conn:
            self.db["documents"].update(doc_id, {"status": Status.READING, "error": None})
