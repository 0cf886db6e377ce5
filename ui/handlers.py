"""What the page does, as plain functions: the layout (ui/layout.py) only wires them to components.

Each takes the App (engine, library, background reader) and plain values, and returns plain values:
rows, HTML, chat messages. Errors a user can cause come back as UserError with a readable message.
"""
from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infllm_engine import Engine, EngineError, InfLLMConfig
from infllm_engine.config import QUESTION_ONLY
from storage.ingest import load_memory
from storage.library import Library, LibraryError
from storage.readers import SUPPORTED, DocumentError

from . import inspect
from .reader import Job, Reader

METHODS = ("infllm", "streaming", "full")
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
    max_new_tokens: int = 200

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
    engine: Engine
    library: Library
    reader: Reader
    max_upload_bytes: int
    stops: dict[str, threading.Event] = field(default_factory=dict)   # per browser session

    @classmethod
    def start(cls, engine: Engine, library: Library, max_upload_bytes: int = 200 * 2**20) -> "App":
        app = cls(engine, library, Reader(library, max_upload_bytes), max_upload_bytes)
        app.reader.resume_interrupted(engine)
        return app


# -- library panel ---------------------------------------------------------------------------------
def library_rows(app: App) -> list[list]:
    rows = []
    for d in app.library.documents():
        status = d["status"]
        if status == "reading":
            job = _reading_job(app, d)
            share = (job.done / job.total) if job and job.total else d["read_tokens"] / max(d["tokens"], 1)
            status = f"reading {share:.0%}" if job else f"paused at {share:.0%}"
        mode = json.loads(d["config"])["method"]
        rows.append([d["id"], d["title"], mode, status, d["pages"], d["tokens"], f"{d['bytes'] / 2**20:,.1f} MB"])
    return rows


def document_choices(app: App) -> list[tuple[str, int]]:
    """Ready documents for the chat's dropdown, labelled with the mode they were read in."""
    return [(f"{d['title']} · {json.loads(d['config'])['method']}", d["id"])
            for d in app.library.documents() if d["status"] == "ready"]


def upload_job_note(job: Job) -> str:
    return f"• {job.name}: queued for reading ({job.engine.cfg.method})"


def upload(app: App, files: Sequence[str] | None, settings: Settings) -> str:
    """Queue dropped files for reading; returns a Markdown note. A file's name is kept only as text."""
    if not files:
        return ""
    engine = _reading_engine(app, settings)
    notes = []
    for file in files:
        name = Path(file).name     # Gradio's temp copy keeps the original name; it is only shown
        try:
            size = Path(file).stat().st_size
            if size > app.max_upload_bytes:
                raise UserError(f"{name} is {size / 2**20:,.1f} MB, over the {app.max_upload_bytes / 2**20:,.0f} MB limit.")
            kept = app.library.keep_upload(Path(file), name)
        except (UserError, DocumentError, OSError) as err:
            notes.append(f"✗ {err}")
            continue
        notes.append(upload_job_note(app.reader.submit(kept, name, engine)))
    return "\n\n".join(notes)


def read_again(app: App, doc_id: int | None, settings: Settings) -> str:
    """Queue a document's kept file for reading under the current settings (another mode, window...)."""
    doc = _document(app, doc_id)
    path = app.library.upload_path(doc["id"])
    if path is None:
        raise UserError(f"the file of “{doc['title']}” was not kept; drop it again to read it in another mode")
    return upload_job_note(app.reader.submit(path, doc["source_name"], _reading_engine(app, settings)))


def delete(app: App, doc_id: int | None) -> str:
    doc = _document(app, doc_id)
    if doc["status"] == "reading" and _reading_job(app, doc) is not None:
        raise UserError(f"“{doc['title']}” is being read; wait until it is done, then delete it")
    app.library.delete(doc["id"])
    app.reader.version += 1
    return f"Deleted “{doc['title']}” and its memory ({doc['bytes'] / 2**20:,.1f} MB freed)."


def refresh(app: App, seen: int) -> tuple[list[list] | None, list[tuple[str, int]] | None, int]:
    """(table rows, document choices, version) when the library changed since `seen`, else (None, None, seen).

    While a document is read its row's percentage changes too, so the table refreshes then as well.
    """
    version = app.reader.version
    if version == seen and not app.reader.active():
        return None, None, seen
    return library_rows(app), document_choices(app), version


def progress_html(app: App) -> str:
    """Progress bars of the reading queue, then the outcome of recent jobs."""
    parts = []
    for job in app.reader.jobs[-8:]:
        if job.state == "reading" and job.total:
            eta = f"ETA {_duration(job.eta_s)}" if job.eta_s is not None else "starting…"
            paused = " · paused while answering" if app.reader.answering else ""
            parts.append(f"<div class='job'><div class='job-name'>{html.escape(job.name)}</div>"
                         f"<progress value='{job.done}' max='{job.total}'></progress>"
                         f"<div class='job-stats'>{job.done:,} / {job.total:,} tokens · {job.rate:,.0f} tok/s · "
                         f"{eta}{paused}</div></div>")
        elif job.state in ("queued", "reading"):
            parts.append(f"<div class='job'><div class='job-name'>{html.escape(job.name)}</div>"
                         f"<div class='job-stats'>{'waiting in the queue' if job.state == 'queued' else 'extracting text…'}"
                         f"</div></div>")
        else:
            mark = "✓" if job.state == "ready" else "✗"
            parts.append(f"<div class='job {job.state}'>{mark} {html.escape(job.name)}: {html.escape(job.message)}</div>")
    return "".join(parts)


# -- chat ------------------------------------------------------------------------------------------
def open_document(app: App, doc_id: int | None) -> tuple[list[dict], int | None, str]:
    """The document's latest conversation: (chat messages, conversation id, inspector HTML of its last answer)."""
    if doc_id is None:
        return [], None, inspect.NOTHING_YET
    doc = _document(app, doc_id)
    conversations = app.library.conversations(doc["id"])
    if not conversations:
        return [], None, inspect.NOTHING_YET
    conversation = conversations[-1]["id"]
    messages = app.library.messages(conversation)
    return _chat(messages), conversation, inspect_answer(app, doc["id"], conversation, len(messages) - 1)


def inspect_answer(app: App, doc_id: int | None, conversation: int | None, index: int) -> str:
    """Inspector HTML of the answer at chat index `index` (a question's index shows its answer)."""
    if doc_id is None or conversation is None:
        return inspect.NOTHING_YET
    messages = app.library.messages(conversation)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= index]
    if not answers:
        return inspect.NOTHING_YET
    m = messages[answers[0]]
    return inspect.render(m["trace"], m["timings"], app.library.spans(doc_id), app.library.pages(doc_id),
                          app.engine.n_layers, m["method"] or "infllm")


def show_block(app: App, doc_id: int | None, block: int) -> str:
    if doc_id is None:
        return ""
    return inspect.passage(int(block), app.library.spans(doc_id), app.library.pages(doc_id))


def stop(app: App, session: str) -> None:
    app.stops.setdefault(session, threading.Event()).set()


def ask(app: App, doc_id: int | None, conversation: int | None, question: str, settings: Settings,
        session: str = "") -> Iterator[tuple[list[dict], int | None, str]]:
    """Stream an answer: yields (chat messages, conversation id, inspector HTML).

    The question and the answer are saved when the answer ends, also when it is stopped.
    """
    question = (question or "").strip()
    if not question:
        raise UserError("type a question first")
    doc = _document(app, doc_id)
    if doc["status"] != "ready":
        raise UserError(f"“{doc['title']}” is not ready yet ({doc['status']})")
    read_cfg = InfLLMConfig(**json.loads(doc["config"]))
    # The document's layout (mode, window) is fixed by how it was read; topk may change per question.
    # Where it runs and the question focus are the app's own, whatever they were when it was read.
    cfg = settings.config(read_cfg).replace(method=read_cfg.method, n_local=read_cfg.n_local, dtype=app.engine.cfg.dtype,
                                            **{k: getattr(app.engine.cfg, k) for k in QUESTION_ONLY})
    engine = app.engine.with_config(cfg)
    messages = app.library.messages(conversation) if conversation else []
    history = [(q["content"], a["content"]) for q, a in zip(messages[::2], messages[1::2])]
    chat = _chat(messages) + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    stopped = app.stops.setdefault(session, threading.Event())
    stopped.clear()
    outcome: dict = {}

    def produce(emit) -> None:          # runs on the model thread
        t0 = time.perf_counter()
        memory = load_memory(app.library, engine, doc["id"])
        outcome["load_s"] = time.perf_counter() - t0
        outcome["answer"] = answer = engine.ask(memory, question, settings.max_new_tokens, history=history)
        emit(None)
        for piece in answer:
            emit(piece)
            if stopped.is_set():
                return

    yield chat, conversation, "<div class='inspector muted'>waiting for the model…</div>"
    shown = 0.0
    try:
        for piece in app.reader.stream(produce):
            if piece is None:
                yield chat, conversation, "<div class='inspector muted'>answering…</div>"
                continue
            chat[-1]["content"] += piece
            # Each update re-sends the chat; many a second would take the cores from decoding.
            if time.perf_counter() - shown > STREAM_INTERVAL_S:
                yield chat, conversation, "<div class='inspector muted'>answering…</div>"
                shown = time.perf_counter()
    except (LibraryError, EngineError) as err:
        raise UserError(str(err)) from err
    answer = outcome["answer"]
    trace = answer.trace.to_dict()
    spans, pages = app.library.spans(doc["id"]), app.library.pages(doc["id"])
    if stopped.is_set():
        chat[-1]["content"] += " …(stopped)"
    elif cited := inspect.citation(trace, spans, pages):
        chat[-1]["content"] = f"{chat[-1]['content'].rstrip()} {cited}"
    if conversation is None:
        conversation = app.library.new_conversation(doc["id"], question)
    app.library.add_message(conversation, "user", question)
    timings = {"memory_load_s": outcome["load_s"], **answer.timings}
    app.library.add_message(conversation, "assistant", chat[-1]["content"], cfg.method, trace, timings)
    yield chat, conversation, inspect.render(trace, timings, spans, pages, engine.n_layers, cfg.method)


# -- helpers ---------------------------------------------------------------------------------------
def _document(app: App, doc_id: int | None) -> dict:
    if doc_id is None or doc_id == "":
        raise UserError("choose a document first")
    try:
        return app.library.document(int(doc_id))
    except (LibraryError, ValueError) as err:
        raise UserError(f"no document {doc_id!r} in the library; it may have been deleted") from err


def _reading_job(app: App, doc: dict) -> Job | None:
    """The job reading this document now, if any (a job learns its document id only when it ends)."""
    return next((j for j in app.reader.active() if j.state == "reading" and j.name == doc["source_name"]), None)


def _reading_engine(app: App, settings: Settings) -> Engine:
    return app.engine.with_config(settings.config(app.engine.cfg))


def _chat(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"
