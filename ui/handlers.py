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
from reading.service import ANSWER_TOKENS, USER_ERRORS, Answered, ReadingService
from reading.worker import Job, JobState
from storage.library import Status
from storage.readers import SUPPORTED

from . import evidence, source

ACCEPTED = list(SUPPORTED)          # file types the upload box offers
STREAM_INTERVAL_S = 0.5
TABLE_HEADERS = ["id", "title", "mode", "status", "pages", "tokens", "disk"]


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


def document_choices(app: App) -> list[tuple[str, int]]:
    """Ready documents for the chat's dropdown, labelled with the mode they were read in."""
    return [(f"{d['title']} · {stored_config(d).method}", d["id"])
            for d in app.library.documents() if d["status"] == Status.READY]


def upload_job_note(job: Job) -> str:
    return f"• {job.name}: queued for reading ({job.engine.cfg.method})"


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
            notes.append(f"✗ {err}")
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
    return f"Deleted “{doc['title']}” and its memory ({size(doc['bytes'])} freed)."


@dataclass(frozen=True)
class Refresh:
    """What the library panel shows after a poll; None where nothing changed."""

    rows: list[list] | None
    choices: list[tuple[str, int]] | None
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
        return Refresh(None, None, None, seen, False)
    choices = document_choices(app)
    ids = [d for _, d in choices]
    finished = [j.doc_id for j in worker.jobs if j.state == JobState.READY and j.ended > seen and j.doc_id in ids]
    chosen = finished[-1] if finished else ids[0] if current in (None, "") and len(ids) == 1 else None
    return Refresh(library_rows(app), choices, chosen, version, reading)


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
def open_document(app: App, doc_id: int | None) -> tuple[list[dict], int | None, str]:
    """The document's latest conversation: (chat messages, conversation id, inspector HTML of its last answer)."""
    if doc_id is None or doc_id == "":
        return [], None, evidence.NOTHING_YET
    doc = _document(app, doc_id)
    conversation, messages = app.service.latest_conversation(doc["id"])
    if conversation is None:
        return [], None, evidence.NOTHING_YET
    return _chat(messages), conversation, inspect_answer(app, doc["id"], conversation, len(messages) - 1)


def inspect_answer(app: App, doc_id: int | None, conversation: int | None, index: int) -> str:
    """Inspector HTML of the answer at chat index `index` (a question's index shows its answer)."""
    if doc_id is None or _own(app, _document(app, doc_id)["id"], conversation) is None:
        return evidence.NOTHING_YET
    messages = app.library.messages(conversation)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= index]
    if not answers:
        return evidence.NOTHING_YET
    m = messages[answers[0]]
    return evidence.render(m["trace"], m["timings"], app.library.spans(doc_id), app.library.pages(doc_id),
                          app.service.engine.n_layers, m["method"] or "infllm", m["quote"])


def show_source(app: App, doc_id: int | None, index: int, value: str | None = None) -> str:
    """The page of what was clicked in the inspector: a passage (index: its span) or the quote ("chars:a,b")."""
    doc = _document(app, doc_id)
    with _shown_as_user_error():
        if isinstance(value, str) and value.startswith("chars:"):
            a, b = (int(x) for x in value.removeprefix("chars:").split(","))
            return source.render(app.service.source(doc["id"], chars=(a, b)))
        return source.render(app.service.source(doc["id"], span=int(index)))


def answer_source(app: App, doc_id: int | None, conversation: int | None, index: int) -> str:
    """The page of the quote of the answer at chat index `index` (a question's index: its answer's)."""
    if doc_id is None or _own(app, _document(app, doc_id)["id"], conversation) is None:
        return source.NOTHING_YET
    messages = app.library.messages(conversation)
    answers = [m for i, m in enumerate(messages) if m["role"] == "assistant" and i >= index]
    if not answers or not answers[0]["quote"]:
        return "<div class='source muted'>This answer has no quote: the question's words matched no sentence.</div>"
    with _shown_as_user_error():
        return source.render(app.service.source(_document(app, doc_id)["id"], chars=answers[0]["quote"]["chars"]))


def stop(app: App, session: str) -> None:
    app.stops.setdefault(session, threading.Event()).set()


def ask(app: App, doc_id: int | None, conversation: int | None, question: str, settings: Settings,
        session: str = "") -> Iterator[tuple[list[dict], int | None, str]]:
    """Stream an answer: yields (chat messages, conversation id, inspector HTML).

    The question and the answer are saved when the answer ends, also when it is stopped.
    """
    if not (question or "").strip():
        raise UserError("type a question first")
    doc = _document(app, doc_id)
    settings.config(app.service.engine.cfg)         # the page's knobs are checked before anything runs
    conversation = _own(app, doc["id"], conversation)       # another document's: this question starts a new one
    messages = app.library.messages(conversation) if conversation else []
    chat = _chat(messages) + [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": ""}]
    stopped = app.stops.setdefault(session, threading.Event())
    stopped.clear()
    yield chat, conversation, "<div class='inspector muted'>waiting for the model…</div>"
    shown, quoted, text = 0.0, "", ""
    with _shown_as_user_error():
        for piece in app.service.ask(doc["id"], question, conversation, settings.topk, settings.max_new_tokens,
                                     stopped):
            if isinstance(piece, Answered):
                chat[-1]["content"] = quoted + piece.text
                spans, pages = app.library.spans(doc["id"]), app.library.pages(doc["id"])
                yield chat, piece.conversation, evidence.render(piece.trace, piece.timings, spans, pages,
                                                               app.service.engine.n_layers, piece.method, piece.quote)
                return
            if isinstance(piece, dict):         # the quote: shown at once, before the model's words
                quoted = quote_markdown(piece)
            else:
                text += piece
            chat[-1]["content"] = quoted + text
            # Each update re-sends the chat; many a second would take the cores from decoding.
            if not piece or time.perf_counter() - shown > STREAM_INTERVAL_S:
                yield chat, conversation, "<div class='inspector muted'>answering…</div>"
                shown = time.perf_counter()


# -- helpers ---------------------------------------------------------------------------------------
def _document(app: App, doc_id: int | None) -> dict:
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


def _own(app: App, doc_id: int, conversation: int | None) -> int | None:
    """The conversation if it is about this document, else None: a session's conversation id travels with
    whatever document a client (the page, or its API) asks next."""
    if conversation is None or conversation == "":
        return None
    try:
        return app.library.conversation(int(conversation), doc_id)["id"]
    except (*USER_ERRORS, ValueError, TypeError):
        return None


@contextmanager
def _shown_as_user_error():
    try:
        yield
    except USER_ERRORS as err:
        raise UserError(str(err)) from err


def _chat(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": (quote_markdown(m["quote"]) if m.get("quote") else "") + m["content"]}
            for m in messages]


def quote_markdown(quote: dict) -> str:
    """The quote as the chat shows it above the answer: the document's words, verbatim, and their page."""
    return f"> “{_markdown_text(quote['text'])}”  \n> — {_markdown_text(quote['page'])}\n\n"


def _markdown_text(text: str) -> str:
    """Text shown as itself in Markdown: a book about LaTeX is full of backslashes, braces and dollars."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|$~])", r"\\\1", text)


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"
