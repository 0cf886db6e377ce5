"""What a question asks: one document, several, or the whole library. The one parser of it, for the command
line (`ask 1,3 "..."`), the page (the dropdown's value, the documents ticked) and the service."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from storage.library import Library

from .errors import ReadingError

ALL = "all"         # every document of the library


@dataclass(frozen=True)
class Asked:
    ids: tuple[int, ...] | None     # the documents named, ascending; None: every document of the library

    @property
    def one(self) -> bool:
        """One document named: its own conversations, its quote and citation without its title."""
        return self.ids is not None and len(self.ids) == 1

    @property
    def scope(self) -> int | str:
        """The key of its conversations: a document's id, "all", or several ids as "1,3" (Library.conversation)."""
        if self.ids is None:
            return ALL
        return self.ids[0] if self.one else ",".join(map(str, self.ids))


def parse(ref: int | str | Sequence[int | str] | Asked, library: Library) -> Asked:
    """What a person names: "all" (any case), ids as "1,3" or a list, or one document's id or title. Each
    document named must be in the library (LibraryError names the one that is not); one named twice, or one
    ticked alone, is that document."""
    if isinstance(ref, Asked):
        return ref
    if isinstance(ref, str) and ref.strip().lower() == ALL:
        return Asked(None)
    if isinstance(ref, str) and "," in ref and all(p.strip().isdigit() for p in ref.split(",")):
        refs: list = [int(p) for p in ref.split(",")]
    elif isinstance(ref, (list, tuple)):
        refs = list(ref)
    else:
        refs = [ref]
    if not refs:
        raise ReadingError("name a document to ask, or several")
    return Asked(tuple(sorted({int(library.document(r)["id"]) for r in refs})))
