"""The library: documents, their pages and memory on disk, conversations. SQL through sqlite-utils.

Memory files of document N live in <data>/memory/N/:
  <field>.<dtype>.raw         [block, layer, *row]   one per block field the engine names (its K/V
                              int8, their scales, representatives), append-only, memory-mapped on load
  state-<tokens>.safetensors  sinks, window and scores at the last commit (a new file each commit)
Documents read before memory format 2 have blocks_{k,v,reprs}.raw in their compute dtype instead
(documents.memory_format says which); the reading package converts them.
A commit appends blocks and writes the new state file first, then updates SQLite in one transaction,
then removes the previous state file. Whatever a killed run wrote past the last commit is cut off
when the ingest resumes, so a half-written document never counts as read.
"""
from __future__ import annotations

import bisect
import hashlib
import json
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

from . import lexical, tensors
from .errors import LibraryError
from .readers import file_type
from .schema import migrate

__all__ = ["Library", "LibraryError", "Status"]


class Status(StrEnum):
    """A document's status column. A StrEnum: rows read back from SQLite compare equal to it."""

    READING = "reading"     # being read, or paused (the app stopped): reading it again resumes
    READY = "ready"         # fully read: it can be asked
    FAILED = "failed"       # the last reading failed (documents.error says why); reading it again resumes


class Library:
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

    # -- uploads ----------------------------------------------------------------------------------
    def keep_upload(self, source: Path, name: str) -> Path:
        """Copy an uploaded file into the library as <sha256>.<ext>: its own name never becomes a path.

        An unsupported type raises DocumentError, the same message that reading it would give.
        """
        suffix = file_type(name)
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

    # -- memory on disk ---------------------------------------------------------------------------
    def memory_dir(self, doc_id: int) -> Path:
        return self.dir / "memory" / str(int(doc_id))

    def commit(self, doc_id: int, state: dict[str, torch.Tensor], new_blocks: dict[str, torch.Tensor],
               read_tokens: int, seconds: float) -> None:
        """Make reading progress durable: new blocks ("{layer}.{field}" rows) + the current state."""
        doc = self.document(doc_id)
        folder = self.memory_dir(doc_id)
        by_field = _by_field(new_blocks)
        added = next(iter(by_field.values())).shape[0] if by_field else 0
        for name, rows in by_field.items():
            path = folder / _block_file(name, rows.dtype)
            tensors.truncate_rows(path, tuple(rows.shape[1:]), rows.dtype, doc["n_blocks"])  # a killed run's rest
            if added:
                tensors.append_rows(path, rows)
        state_file = f"state-{read_tokens}.safetensors"
        tensors.write(folder / state_file, state)
        with self.db.conn:
            self.db["documents"].update(doc_id, {
                "read_tokens": read_tokens, "n_blocks": doc["n_blocks"] + added, "state_file": state_file,
                "read_seconds": doc["read_seconds"] + seconds, "bytes": _folder_bytes(folder)})
        if doc["state_file"] and doc["state_file"] != state_file:
            (folder / doc["state_file"]).unlink(missing_ok=True)

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
            self.db["documents"].update(doc_id, {"status": Status.READY, "bytes": _folder_bytes(self.memory_dir(doc_id))})

    def load(self, doc_id: int, shapes: dict, files: dict[str, str] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The committed memory as (state, blocks) for engine.snapshot.restore; block arrays stay mapped.

        shapes: {"layers": L, field: (row shape per layer, dtype), ...} (engine.snapshot.block_shapes).
        Cuts off anything a killed run wrote past the last commit.
        """
        doc = self.document(doc_id)
        if not doc["state_file"]:
            raise LibraryError(f"document {doc_id} has no memory yet")
        state, _ = tensors.read(self.memory_dir(doc_id) / doc["state_file"])
        return state, self.map_blocks(doc_id, shapes, files)

    def map_blocks(self, doc_id: int, shapes: dict, files: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The committed blocks, memory-mapped, per layer ("{layer}.{field}"); see load.

        files: a field's file name when it is not the default <field>.<dtype>.raw (old formats).
        """
        doc = self.document(doc_id)
        folder, n, n_layers = self.memory_dir(doc_id), doc["n_blocks"], shapes["layers"]
        blocks = {}
        for name, (shape, dtype) in ((k, v) for k, v in shapes.items() if k != "layers"):
            path = folder / (files or {}).get(name, _block_file(name, dtype))
            if n and not path.exists():
                raise LibraryError(f"the memory of document {doc_id} is missing {path.name}; read it again")
            tensors.truncate_rows(path, (n_layers, *shape), dtype, n)
            mapped = tensors.map_rows(path, (n_layers, *shape), dtype, n)
            for i in range(n_layers):
                blocks[f"{i}.{name}"] = mapped[:, i]
        return blocks

    def replace_memory(self, doc_id: int, state: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor],
                       memory_format: int, config_hash: str) -> None:
        """Swap a ready document's memory for another form of it (a format upgrade), all or nothing:
        the new files are written beside the old ones, SQLite switches in one transaction, then the
        old files go."""
        doc = self.document(doc_id)
        folder = self.memory_dir(doc_id)
        staging = folder / "upgrade"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name, rows in _by_field(blocks).items():
            tensors.append_rows(staging / _block_file(name, rows.dtype), rows)
        state_file = f"state-{doc['read_tokens']}-f{memory_format}.safetensors"
        tensors.write(staging / state_file, state)
        old = {p.name for p in folder.iterdir() if p.is_file()}
        new = {p.name for p in staging.iterdir()}
        for name in new:
            (staging / name).replace(folder / name)
        staging.rmdir()
        with self.db.conn:
            self.db["documents"].update(doc_id, {"state_file": state_file, "memory_format": memory_format,
                                                 "config_hash": config_hash})
        for name in old - new:
            (folder / name).unlink(missing_ok=True)
        with self.db.conn:
            self.db["documents"].update(doc_id, {"bytes": _folder_bytes(folder)})

    # -- conversations ----------------------------------------------------------------------------
    def new_conversation(self, scope: int | str, title: str) -> int:
        """A conversation about a document (its id) or a shelf of them ("all", or ids as "1,3": shelf_key)."""
        row = {"document_id": scope} if isinstance(scope, int) else {"shelf": scope}
        with self.db.conn:
            return self.db["conversations"].insert({**row, "title": title[:200]}).last_pk

    def conversations(self, scope: int | str) -> list[dict]:
        column = "document_id" if isinstance(scope, int) else "shelf"
        return list(self.db.query(f"SELECT * FROM conversations WHERE {column} = ? ORDER BY id", [scope]))

    def conversation(self, conversation_id: int, scope: int | str) -> dict:
        """A conversation of the given document or shelf; LibraryError when there is none, or it asks another."""
        row = next(self.db.query("SELECT * FROM conversations WHERE id = ?", [conversation_id]), None)
        if row is None:
            raise LibraryError(f"there is no conversation {conversation_id}; start a new one")
        if (row["document_id"] if isinstance(scope, int) else row["shelf"]) != scope:
            raise LibraryError(f"conversation {conversation_id} is about other documents; start a new one to ask "
                               "this")
        return row

    def add_message(self, conversation_id: int, scope: int | str, role: str, content: str, method: str | None = None,
                    trace: dict | None = None, timings: dict | None = None, quote: dict | None = None) -> int:
        """A message of a conversation about `scope` (conversation()): one about another is refused (LibraryError)."""
        self.conversation(conversation_id, scope)
        with self.db.conn:
            return self.db["messages"].insert(dict(
                conversation_id=conversation_id, role=role, content=content, method=method,
                **{name: json.dumps(value) if value is not None else None
                   for name, value in (("trace", trace), ("timings", timings), ("quote", quote))})).last_pk

    def messages(self, conversation_id: int) -> list[dict]:
        rows = self.db.query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", [conversation_id])
        return [{**r, **{name: json.loads(r[name]) if r[name] else None for name in ("trace", "timings", "quote")}}
                for r in rows]


def _by_field(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """"{layer}.{field}" tensors [n, *row] -> per field, the rows as a block file holds them: [n, layer, *row]."""
    n_layers = 1 + max((int(k.split(".")[0]) for k in blocks), default=-1)
    fields = sorted({k.split(".", 1)[1] for k in blocks})
    return {name: torch.stack([blocks[f"{i}.{name}"] for i in range(n_layers)], dim=1) for name in fields}


def _block_file(field: str, dtype: torch.dtype) -> str:
    return f"{field}.{str(dtype).removeprefix('torch.')}.raw"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.is_file())
