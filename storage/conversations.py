"""Conversations about a document, or about several at once (a shelf: "all", or ids as "1,3"), and their
messages: each question, and each answer with its quote, its trace and its timings."""
from __future__ import annotations

import json

from .errors import LibraryError


class Conversations:
    """A Library's conversations (a mixin: it uses the library's db)."""

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
