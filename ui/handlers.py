"""What the page does, as plain functions: the layout (ui/layout.py) only wires them to components.

Each takes the App (the reading service, and each browser session's stop button) and the components'
values, and adapts them to the service and its results back to components: rows, HTML, chat messages.
Here the library panel (upload, read again, delete, the poll); the chat's in ui/chat.py. Formatting lives
in ui/formatting.py; what a question asks is parsed by reading.asked. Errors a user can cause come back
as UserError with a readable message.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from infllm_engine import EngineError, InfLLMConfig
from infllm_engine.config import METHODS
from reading.asked import ALL
from reading.service import ANSWER_TOKENS, USER_ERRORS, ReadingService
from reading.worker import JobState
from storage.library import Status
from documents import SUPPORTED

from . import formatting as fmt

ACCEPTED = list(SUPPORTED)          # file types the upload box offers
TABLE_HEADERS = ["id", "title", "mode", "status", "pages", "tokens", "disk"]
SEVERAL = "several"                 # the dropdown's choice that asks the documents ticked in a second box
Target = int | str | list[int]      # the chat's choice: a document's id, ALL, or several ids (target())


class UserError(ValueError):
    """Something the user can fix; shown as a message, never as a traceback."""


@dataclass(slots=True, frozen=True)
class Settings:
    """The knobs the page exposes. The mode and window apply to reading; topk to answering."""

    method: str = "infllm"
    topk: int = InfLLMConfig().topk
    n_local: int = InfLLMConfig().n_local
    max_new_tokens: int = ANSWER_TOKENS

    def config(self, base: InfLLMConfig) -> InfLLMConfig:
        if self.method not in METHODS:
            raise UserError(f"unknown mode {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 1 <= int(self.max_new_tokens) <= 2048:
            raise UserError(f"answer length must be between 1 and 2048 tokens, got {self.max_new_tokens}")
        try:
            return base.replace(method=self.method, topk=int(self.topk), n_local=int(self.n_local))
        except EngineError as err:
            raise UserError(str(err).replace("invalid engine config: ", "invalid settings: ")) from err


@dataclass
class App:
    """The page's view of the reading service, and each browser session's stop button."""

    service: ReadingService
    stops: dict[str, threading.Event] = field(default_factory=dict)   # per browser session

    @property
    def library(self):
        return self.service.library

    @property
    def worker(self):
        return self.service.worker


# -- library panel ---------------------------------------------------------------------------------
def library_rows(app: App) -> list[list]:
    rows = []
    for d in app.library.documents():
        status = d["status"]
        if status == Status.READING:
            job = app.service.reading_job(d["id"])
            share = (job.done / job.total) if job and job.total else d["read_tokens"] / max(d["tokens"], 1)
            status = f"reading {share:.0%}" if job else f"paused {share:.0%}"
        rows.append([d["id"], d["title"], d["method"], status, d["pages"], fmt.count(d["tokens"]),
                     fmt.size(d["bytes"])])
    return rows


def document_choices(app: App) -> list[tuple[str, int | str]]:
    """The chat's dropdown: ready documents labelled with the mode they were read in, and above them, once
    there are two, "All documents" and "Several documents…" (the ones ticked in the box it shows)."""
    docs = ready_documents(app)
    return [("All documents", ALL), ("Several documents…", SEVERAL), *docs] if len(docs) > 1 else docs


def ready_documents(app: App) -> list[tuple[str, int]]:
    return [(f"{d['title']} · {d['method']}", d["id"]) for d in app.library.documents() if d["status"] == Status.READY]


def target(doc: int | str | None, several: Sequence[int] | None = None) -> Target | None:
    """The chat's choice, from the dropdown's value and the ids ticked for "Several documents…"."""
    return list(several or []) if doc == SEVERAL else doc


def upload(app: App, files: Sequence[str] | None, settings: Settings) -> str:
    """Queue dropped files for reading; returns a Markdown note. A file's name is kept only as text."""
    if not files:
        return ""
    cfg = settings.config(app.service.engine.cfg)
    notes = []
    for file in files:
        name = Path(file).name     # Gradio's temp copy keeps the original name; it is only shown
        try:
            notes.append(fmt.queued(app.service.read(Path(file), name, cfg)))
        except (*USER_ERRORS, OSError) as err:
            notes.append(f"✗ {fmt.markdown_text(str(err))}")
    return "\n\n".join(notes)


def read_again(app: App, doc_id: int | None, settings: Settings) -> str:
    """Queue a document's kept file for reading under the current settings (another mode, window...)."""
    doc = document(app, doc_id)
    with shown_as_user_error():
        return fmt.queued(app.service.read_again(doc["id"], settings.config(app.service.engine.cfg)))


def delete(app: App, doc_id: int | None) -> str:
    doc = document(app, doc_id)
    with shown_as_user_error():
        app.service.delete(doc["id"])
    return f"Deleted “{fmt.markdown_text(doc['title'])}” and its memory ({fmt.size(doc['bytes'])} freed)."


@dataclass(frozen=True)
class Refresh:
    """What the library panel shows after a poll; None where nothing changed."""

    rows: list[list] | None
    choices: list[tuple[str, int | str]] | None     # the dropdown's (document_choices)
    documents: list[tuple[str, int]] | None         # the "several documents" box's (ready_documents)
    chosen: int | None          # a document to choose in the chat's dropdown, or None to leave it
    version: int
    polling: bool               # whether the page should keep polling: only while something is read


def refresh(app: App, seen: int, current: int | None = None) -> Refresh:
    """The library panel when it changed since version `seen` (or while a document is read: its percentage).

    A document whose reading just ended is chosen for the chat, so the next question goes to it; so is
    the only ready document when none is chosen.
    """
    worker = app.worker
    version, reading = worker.version, bool(worker.active())
    if version == seen and not reading:
        return Refresh(None, None, None, None, seen, False)
    documents = ready_documents(app)
    ids = [d for _, d in documents]
    finished = [j.doc_id for j in worker.jobs if j.state == JobState.READY and j.ended > seen and j.doc_id in ids]
    chosen = finished[-1] if finished else ids[0] if current in (None, "") and len(ids) == 1 else None
    return Refresh(library_rows(app), document_choices(app), documents, chosen, version, reading)


def progress_html(app: App) -> str:
    return fmt.progress_html(app.worker.jobs, app.worker.answering)


# -- helpers ---------------------------------------------------------------------------------------
def document(app: App, doc_id: int | str | None) -> dict:
    if doc_id == ALL or doc_id == SEVERAL or isinstance(doc_id, list):
        raise UserError("this needs one document: choose it in the list")
    if doc_id is None or doc_id == "":
        # Only ready documents can be chosen: someone who drops a file and asks at once meets this,
        # before its reading has started (a queued job, no library row yet) or during it.
        unread = [d["title"] for d in app.library.documents() if d["status"] == Status.READING]
        unread += [j.name for j in app.service.worker.active() if j.doc_id is None]
        if unread:
            raise UserError(f"{unread[-1]!r} is not read to the end yet; ask about it once the library "
                            "shows it ready")
        raise UserError("choose a document first")
    try:
        return app.library.document(int(doc_id))
    except (*USER_ERRORS, ValueError) as err:
        raise UserError(f"no document {doc_id!r} in the library; it may have been deleted") from err


@contextmanager
def shown_as_user_error():
    try:
        yield
    except USER_ERRORS as err:
        raise UserError(str(err)) from err
