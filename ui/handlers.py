"""What the page does, as plain functions: the layout (ui/layout.py) only wires them to components.

Each takes the App (the reading service, and each browser session's stop button) and plain values,
and returns plain values: rows, HTML, chat messages. Errors a user can cause come back as UserError
with a readable message.
"""
from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from infllm_engine import EngineError, InfLLMConfig
from infllm_engine.config import METHODS
from reading.ingest import stored_config
from reading.citations import short_title
from reading.service import ALL, ANSWER_TOKENS, USER_ERRORS, Answered, ReadingService
from reading.worker import Job, JobState, Queued
from storage.library import Status
from storage.readers import SUPPORTED

from . import evidence, source

ACCEPTED = list(SUPPORTED)          # file types the upload box offers
STREAM_INTERVAL_S = 0.5
TABLE_HEADERS = ["id", "title", "mode", "status", "pages", "tokens", "disk"]
SEVERAL = "several"                 # the dropdown's choice that asks the documents ticked in a second box
Target = int | str | list[int]      # what the chat asks: a document's id, ALL, or several ids (target())


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
        rows.append([d["id"], d["title"], stored_config(d).method, status, d["pages"], count(d["tokens"]),
                     size(d["bytes"])])
    return rows


def count(n: int) -> str:
    """A count in at most five characters, for the library's narrow columns: 812, 31.5K, 221K, 1.05M."""
    if n < 1000:
        return str(n)
    x, unit = _scaled(n, (("K", 1e3), ("M", 1e6), ("G", 1e9)))
    return f"{x:.2f}{unit}" if x < 9.995 else f"{x:.1f}{unit}" if x < 99.95 else f"{x:.0f}{unit}"


def size(n_bytes: int) -> str:
    """Bytes in at most seven characters: 850 KB, 363 MB, 2.7 GB."""
    if n_bytes < 1000:
        return f"{n_bytes} B"
    x, unit = _scaled(n_bytes, (("KB", 2**10), ("MB", 2**20), ("GB", 2**30), ("TB", 2**40)))
    return f"{x:.1f} {unit}" if x < 99.95 else f"{x:.0f} {unit}"


def _scaled(n: int, units: tuple[tuple[str, float], ...]) -> tuple[float, str]:
    """n in the first unit where it rounds below 1000 (the last unit otherwise)."""
    for unit, limit in units:
        if n / limit < 999.5:
            break
    return n / limit, unit


def document_choices(app: App) -> list[tuple[str, int | str]]:
    """The chat's dropdown: ready documents labelled with the mode they were read in, and above them, once
    there are two, "All documents" and "Several documents…" (the ones ticked in the box it shows)."""
    docs = ready_documents(app)
    return [("All documents", ALL), ("Several documents…", SEVERAL), *docs] if len(docs) > 1 else docs


def ready_documents(app: App) -> list[tuple[str, int]]:
    return [(f"{d['title']} · {stored_config(d).method}", d["id"])
            for d in app.library.documents() if d["status"] == Status.READY]


def target(doc: int | str | None, several: Sequence[int] | None = None) -> Target | None:
    """What the chat asks, from the dropdown's value and the ids ticked for "Several documents…"."""
    return list(several or []) if doc == SEVERAL else doc


def upload_job_note(job: Job) -> str:
    return f"• {_markdown_text(job.name)}: queued for reading ({job.engine.cfg.method})"


def upload(app: App, files: Sequence[str] | None, settings: Settings) -> str:
    """Queue dropped files for reading; returns a Markdown note. A file's name is kept only as text."""
    if not files:
        return ""
    cfg = settings.config(app.service.engine.cfg)
    notes = []
    for file in files:
        name = Path(file).name     # Gradio's temp copy keeps the original name; it is only shown
        try:
            notes.append(upload_job_note(app.service.read(Path(file), name, cfg)))
        except (*USER_ERRORS, OSError) as err:
            notes.append(f"✗ {_markdown_text(str(err))}")
    return "\n\n".join(notes)


def read_again(app: App, doc_id: int | None, settings: Settings) -> str:
    """Queue a document's kept file for reading under the current settings (another mode, window...)."""
    doc = _document(app, doc_id)
    with _shown_as_user_error():
        return upload_job_note(app.service.read_again(doc["id"], settings.config(app.service.engine.cfg)))


def delete(app: App, doc_id: int | None) -> str:
    doc = _document(app, doc_id)
    with _shown_as_user_error():
        app.service.delete(doc["id"])
    return f"Deleted “{_markdown_text(doc['title'])}” and its memory ({size(doc['bytes'])} freed)."


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
    """Progress bars of the reading queue, then the outcome of recent jobs."""
    parts = []
    for job in app.worker.jobs[-8:]:
        if job.state == JobState.READING and job.total:
            eta = f"ETA {_duration(job.eta_s)}" if job.eta_s is not None else "starting…"
            paused = " · paused while answering" if app.worker.answering else ""
            parts.append(f"<div class='job'><div class='job-name'>{html.escape(job.name)}</div>"
                         f"<progress value='{job.done}' max='{job.total}'></progress>"
                         f"<div class='job-stats'>{job.done:,} / {job.total:,} tokens · {job.rate:,.0f} tok/s · "
                         f"{eta}{paused}</div></div>")
        elif job.state in (JobState.QUEUED, JobState.READING):
            waiting = "waiting in the queue" if job.state == JobState.QUEUED else "extracting text…"
            parts.append(f"<div class='job'><div class='job-name'>{html.escape(job.name)}</div>"
                         f"<div class='job-stats'>{waiting}</div></div>")
        else:
            mark = "✓" if job.state == JobState.READY else "✗"
            parts.append(f"<div class='job {job.state}'>{mark} {html.escape(job.name)}: {html.escape(job.message)}</div>")
    return "".join(parts)


# -- chat ------------------------------------------------------------------------------------------
def open_document(app: App, asked: Target | None) -> tuple[list[dict], int | None, str]:
    """The latest conversation of a document (or of ALL, or of several): (chat messages, conversation id,
    inspector HTML of its last answer)."""
    if asked is None or asked == "" or asked == []:
        return [], None, evidence.NOTHING_YET
    scope, _ = _scope(app, asked)
    conversations = app.library.conversations(scope)
    if not conversations:
        return [], None, evidence.NOTHING_YET
    conversation = conversations[-1]["id"]
    messages = app.library.messages(conversation)
    return (_chat(messages, isinstance(scope, str)), conversation,
            inspect_answer(app, asked, conversation, len(messages) - 1))


def inspect_answer(app: App, asked: Target | None, conversation: int | None, index: int) -> str:
    """Inspector HTML of the answer at chat index `index` (a question's index shows its answer)."""
    scope, m = _answer(app, asked, conversation, index)
    return evidence.NOTHING_YET if m is None else _inspector(app, scope, m["trace"], m["timings"],
                                                             m["method"] or "infllm", m["quote"])


def show_source(app: App, asked: Target | None, index: int, value: str | None = None) -> str:
    """The page of what was clicked in the inspector: a passage (index: its span) or the quote ("chars:a,b").
    Across documents the value ends in "@" and the document's id (evidence.CLICKS): that document's page."""
    value, _, of = (value if isinstance(value, str) else "").partition("@")
    doc = _document(app, of or asked)
    with _shown_as_user_error():
        if value.startswith("chars:"):
            a, b = (int(x) for x in value.removeprefix("chars:").split(","))
            return source.render(app.service.source(doc["id"], chars=(a, b)))
        return source.render(app.service.source(doc["id"], span=int(index)))


def answer_source(app: App, asked: Target | None, conversation: int | None, index: int) -> str:
    """The page of the quote of the answer at chat index `index` (a question's index: its answer's)."""
    _, m = _answer(app, asked, conversation, index)
    if m is None:
        return source.NOTHING_YET
    if not m["quote"]:
        return "<div class='source muted'>This answer has no quote: the question's words matched no sentence.</div>"
    with _shown_as_user_error():        # across documents the quote names its own
        doc = m["quote"].get("document") or _document(app, asked)["id"]
        return source.render(app.service.source(doc, chars=m["quote"]["chars"]))


def stop(app: App, session: str) -> None:
    app.stops.setdefault(session, threading.Event()).set()


def ask(app: App, asked: Target | None, conversation: int | None, question: str, settings: Settings,
        session: str = "") -> Iterator[tuple[list[dict], int | None, str]]:
    """Stream an answer about a document, ALL or several (target()): yields (chat messages, conversation
    id, inspector HTML).

    The question and the answer are saved when the answer ends, also when it is stopped.
    """
    if not (question or "").strip():
        raise UserError("type a question first")
    scope, asked = _scope(app, asked)
    settings.config(app.service.engine.cfg)         # the page's knobs are checked before anything runs
    conversation = _own(app, scope, conversation)   # about other documents: this question starts a new one
    messages = app.library.messages(conversation) if conversation else []
    chat = _chat(messages, isinstance(scope, str)) + [{"role": "user", "content": prose_markdown(question.strip())},
                                                      {"role": "assistant", "content": ""}]
    stopped = app.stops.setdefault(session, threading.Event())
    stopped.clear()
    yield chat, conversation, "<div class='inspector muted'>waiting for the model…</div>"
    shown, quoted, text = 0.0, "", ""
    with _shown_as_user_error():
        for piece in app.service.ask(asked, question, conversation, settings.topk, settings.max_new_tokens, stopped):
            if isinstance(piece, Answered):
                chat[-1]["content"] = quoted + prose_markdown(piece.text)
                yield chat, piece.conversation, _inspector(app, scope, piece.trace, piece.timings, piece.method,
                                                           piece.quote)
                return
            if isinstance(piece, Queued):       # behind other questions, or a reading's turn: say so, and where
                chat[-1]["content"] = f"*{_markdown_text(str(piece))}…*"
                yield chat, conversation, f"<div class='inspector muted'>{html.escape(str(piece))}…</div>"
                continue
            if isinstance(piece, dict):         # the quote: shown at once, before the model's words
                quoted = quote_markdown(piece, titled=isinstance(scope, str))
            else:
                text += piece
            chat[-1]["content"] = quoted + prose_markdown(text)
            # Each update re-sends the chat; many a second would take the cores from decoding.
            if not piece or time.perf_counter() - shown > STREAM_INTERVAL_S:
                yield chat, conversation, "<div class='inspector muted'>answering…</div>"
                shown = time.perf_counter()


# -- helpers ---------------------------------------------------------------------------------------
def _document(app: App, doc_id: int | str | None) -> dict:
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


def _scope(app: App, asked: Target | None) -> tuple[int | str, Target]:
    """(the conversations' scope, what service.ask takes): a document's id for one document, else the shelf's
    key ("all", or the ids as "1,3") and ALL or the ids. One ticked document is that document."""
    if isinstance(asked, list) and len(asked) < 2:
        if not asked:
            raise UserError("tick the documents to ask in the box under the document list")
        asked = asked[0]
    if asked != ALL and not isinstance(asked, list):
        doc_id = _document(app, asked)["id"]
        return doc_id, doc_id
    with _shown_as_user_error():
        ids = asked if asked == ALL else [_document(app, d)["id"] for d in asked]
        return app.service.shelf(ids)[0], ids


def _own(app: App, scope: int | str, conversation: int | None) -> int | None:
    """The conversation if it is about this scope (a document, or a shelf's key), else None: a session's
    conversation id travels with whatever a client (the page, or its API) asks next."""
    if conversation is None or conversation == "":
        return None
    try:
        return app.library.conversation(int(conversation), scope)["id"]
    except (*USER_ERRORS, ValueError, TypeError):
        return None


def _answer(app: App, asked: Target | None, conversation: int | None, index: int) -> tuple[int | str, dict | None]:
    """(the scope, the saved answer at chat index `index` (a question's: its answer) of a conversation about
    `asked`, or None)."""
    if asked is None or asked == "" or asked == []:
        return "", None
    scope = _scope(app, asked)[0]
    if _own(app, scope, conversation) is None:
        return scope, None
    messages = app.library.messages(conversation)
    return scope, next((m for i, m in enumerate(messages) if m["role"] == "assistant" and i >= index), None)


def _inspector(app: App, scope: int | str, trace: dict | None, timings: dict | None, method: str,
               quote: dict | None) -> str:
    """evidence.render of an answer about `scope`, with its document's spans and pages (across documents:
    each one's, in the trace's order; one deleted since shows none)."""
    if trace and trace.get("documents"):
        shelf = []
        for doc_id in trace["documents"]:
            try:
                shelf.append((app.library.document(doc_id), app.library.spans(doc_id), app.library.pages(doc_id)))
            except USER_ERRORS:
                shelf.append(({"id": doc_id, "title": "(deleted)"}, [], []))
        return evidence.render(trace, timings, [], [], app.service.engine.n_layers, method, quote, shelf)
    return evidence.render(trace, timings, app.library.spans(scope), app.library.pages(scope),
                           app.service.engine.n_layers, method, quote)


@contextmanager
def _shown_as_user_error():
    try:
        yield
    except USER_ERRORS as err:
        raise UserError(str(err)) from err


def _chat(messages: list[dict], titled: bool = False) -> list[dict]:
    return [{"role": m["role"], "content": (quote_markdown(m["quote"], titled) if m.get("quote") else "")
             + prose_markdown(m["content"])} for m in messages]


def quote_markdown(quote: dict, titled: bool = False) -> str:
    """The quote as the chat shows it above the answer: the document's words, verbatim, and their page;
    titled (asked across documents): after the document's title, "— lshort, p. 58"."""
    where = f"{short_title(quote['title'])}, {quote['page']}" if titled else quote["page"]
    return f"> “{_markdown_text(quote['text'])}”  \n> — {_markdown_text(where)}\n\n"


def prose_markdown(text: str) -> str:
    """A question or an answer as the chat shows it: the model's prose keeps its Markdown (a list, a code
    span), but what the chat would take as HTML or eat as an escape ("<draft>", "&amp;", "\\{") shows as typed."""
    return re.sub(r"([\\<>&])", r"\\\1", text)


def _markdown_text(text: str) -> str:
    """Text shown as itself in Markdown: a book about LaTeX is full of backslashes, braces and dollars."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|$~])", r"\\\1", text)


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"
