"""The reading service: the verbs a person uses, shared by the command line (app.py) and the page (ui/).

read a document (queued on the model's thread, or now), ask one document or several (streamed, cited,
saved with its trace), keep the conversation, delete. Neither front end loads a memory, asks or saves
by itself. A question about one document is a question about a shelf of one: one path.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from documents import MAX_BYTES, DocumentError, file_type
from infllm_engine import Engine, EngineError, InfLLMConfig, Trace
from infllm_engine.answer import Found
from infllm_engine.encoder import Encoder
from infllm_engine.engine import Progress
from storage.library import Library, LibraryError, Status

from . import quotes
from .asked import ALL, Asked, parse
from .citations import cite, passages
from .errors import ReadingError
from .ingest import Ingested, ingest, stored_config
from .question import Gathered, gather
from .source import Source, locate
from .upgrade import upgrade
from .worker import Job, Worker

__all__ = ["ALL", "ANSWER_TOKENS", "Answered", "ReadingError", "ReadingService", "Source", "USER_ERRORS"]

USER_ERRORS = (ReadingError, LibraryError, DocumentError, EngineError)   # shown as messages, never as tracebacks
# Tokens an answer may take by default. The quote carries the evidence; the 135M model's prose is right less
# often the longer it runs (bench/results/questions-cpu.md).
ANSWER_TOKENS = 64
# Documents probed by attention for a question across the library: those with the best word matches and
# meaning. Probing loads a memory's window and runs the question over it, about a second each on 2 CPU cores.
PROBED = 4


@dataclass
class Answered:
    """An answer once it has ended (or was stopped), as saved in the conversation."""

    text: str                 # the answer, its citation appended
    citation: str             # e.g. "(p. 61)": the quote's page, else the first evidence span's; "" without either
    conversation: int
    method: str
    trace: dict               # with the documents asked ("documents": their ids, in the order of its columns)
    timings: dict
    evidence: list[dict]      # citations.passages: the evidence spans, best first
    quote: dict | None = None  # the document's sentence shown before the answer (Quote.to_dict, with its document)
    stopped: bool = False
    note: str = ""            # across documents: those left out (still being read, read in another mode)


@dataclass
class Shelf:
    """The documents a question is put to, as the library has them now."""

    asked: Asked
    documents: list[dict]                                # ready, and asked alike (one layout, infllm)
    left_out: list[str] = field(default_factory=list)    # the others, named with why

    @property
    def note(self) -> str:
        return f"Not searched: {', '.join(self.left_out)}." if self.left_out else ""


@dataclass
class Finding:
    """What a question points to, without an answer (ReadingService.find): bench.questions --retrieval."""

    found: Found
    gathered: Gathered
    quote: dict | None
    passages: list[dict]            # citations.passages of the evidence


class ReadingService:
    def __init__(self, engine: Engine, library: Library, max_upload_bytes: int = MAX_BYTES, full_traces: bool = False,
                 upgrading: Progress | None = None, encoder: Encoder | None = None):
        """The service of a library, brought to today's formats first (reading.upgrade: at once where it is).

        full_traces: store each answer's per-step retrieval record (Trace.to_dict, ~340 KB an answer, for
        debugging) instead of its summary (Summary.to_dict, ~6 KB: all the pages show).
        upgrading: called with (documents done, of how many) while an old library is upgraded.
        encoder: the sentence encoder that embeds each document's spans and each question (None: attention
        and words alone).
        """
        if max_upload_bytes < 1:
            raise ReadingError(f"the upload limit must be at least 1 byte, got {max_upload_bytes}")
        upgrade(library, engine, upgrading)
        self.engine, self.library, self.max_upload_bytes = engine, library, max_upload_bytes
        self.full_traces, self.encoder = full_traces, encoder
        self.worker = Worker(library, max_upload_bytes, encoder)

    @classmethod
    def start(cls, engine: Engine, library: Library, max_upload_bytes: int = MAX_BYTES, full_traces: bool = False,
              upgrading: Progress | None = None, encoder: Encoder | None = None) -> "ReadingService":
        """The service, with documents whose reading stopped with the app queued to resume."""
        service = cls(engine, library, max_upload_bytes, full_traces, upgrading, encoder)
        service.worker.resume_interrupted(engine)
        return service

    # -- reading ----------------------------------------------------------------------------------
    def read(self, path: Path, name: str, cfg: InfLLMConfig | None = None) -> Job:
        """Keep a copy of a dropped file and queue it for reading on the model's thread."""
        size = Path(path).stat().st_size
        if size > self.max_upload_bytes:
            raise ReadingError(f"{name} is {size / 2**20:,.1f} MB, over the {self.max_upload_bytes / 2**20:,.0f} MB limit")
        kept = self.library.keep_upload(Path(path), file_type(name))
        return self.worker.submit(kept, name, self.engine.with_config(cfg or self.engine.cfg))

    def read_now(self, path: Path, progress: Progress | None = None) -> Ingested:
        """Read a file on this thread (the command line), or find it already read, or resume it."""
        return ingest(self.library, self.engine, path, progress, max_bytes=self.max_upload_bytes, encoder=self.encoder)

    def read_again(self, doc_ref: int | str, cfg: InfLLMConfig) -> Job:
        """Queue a document's kept file for reading under other settings (another mode, window...)."""
        doc = self.library.document(doc_ref)
        path = self.library.upload_path(doc["id"])
        if path is None:
            raise ReadingError(f"the file of “{doc['title']}” was not kept; drop it again to read it in another mode")
        return self.worker.submit(path, doc["source_name"], self.engine.with_config(cfg))

    def reading_job(self, doc_id: int) -> Job | None:
        """The job reading this document now, if any."""
        return next((j for j in self.worker.active() if j.doc_id == doc_id), None)

    def delete(self, doc_ref: int | str) -> dict:
        """Delete a document and its memory; returns its row as it was. Refused while it is being read."""
        doc = self.library.document(doc_ref)
        if self.reading_job(doc["id"]) is not None:
            raise ReadingError(f"“{doc['title']}” is being read; wait until it is done, then delete it")
        self.library.delete(doc["id"])
        self.worker.version += 1
        return doc

    # -- asking -----------------------------------------------------------------------------------
    def shelf(self, asked: Asked | int | str | Sequence[int]) -> Shelf:
        """The documents a question about `asked` goes to (reading.asked.parse takes what a person names).

        One document named must be ready. Of several, those still being read are left out and named, and so
        are those read in another mode or layout than the first that is read as this engine reads.
        """
        asked = parse(asked, self.library)
        rows = self.library.documents() if asked.ids is None else [self.library.document(i) for i in asked.ids]
        ready = [d for d in rows if d["status"] == Status.READY]
        if asked.one and not ready:
            raise ReadingError(f"“{rows[0]['title']}” is not ready yet ({rows[0]['status']})")
        if not ready:
            raise ReadingError("no document is ready to ask yet" if rows else "the library is empty: drop a file first")
        left = [f"“{d['title']}” ({d['status']})" for d in rows if d["status"] != Status.READY]
        if not asked.one:       # memories laid out alike sit at compatible positions; others are named, not searched
            ref = next((d for d in ready if stored_config(d).layout() == self.engine.cfg.layout()), ready[0])
            alike = lambda d: stored_config(d).layout() == stored_config(ref).layout() and stored_config(d).method == "infllm"  # noqa: E731
            left += [f"“{d['title']}” (read in another mode)" for d in ready if not alike(d)]
            ready = [d for d in ready if alike(d)]
            if not ready:
                raise ReadingError("none of these documents was read in the InfLLM mode that a question across "
                                   "documents needs")
        return Shelf(asked, ready, left)

    def ask(self, asked: Asked | int | str | Sequence[int], question: str, conversation: int | None = None,
            topk: int | None = None, max_new_tokens: int = ANSWER_TOKENS, stop: threading.Event | None = None,
            probed: int | None = PROBED) -> Iterator[str | dict | Answered]:
        """Stream an answer on the model's thread: "" when the model starts, then the quote (a dict, when the
        document has a sentence to quote), then text pieces, then Answered.

        asked: a document (id or title), several (ids), or "all" (reading.asked). The library's word index and
        the spans' meanings rank every document; the `probed` best (None: all; bench.library measures it) are
        probed by attention (Engine.ask); the one holding the best span is read and quoted. The question and
        the answer (with its quote, citation, trace and timings) are saved when the answer ends, also when
        `stop` is set. conversation: the one to continue (its turns are re-read), or None.
        """
        question = (question or "").strip()
        if not question:
            raise ReadingError("type a question first")
        shelf = self.shelf(asked)
        asked = shelf.asked
        engine = self.engine.answering(stored_config(shelf.documents[0]), topk)
        history = self._history(conversation, asked.scope)        # another scope's turns are never re-read
        stop = stop or threading.Event()
        outcome: dict = {}

        def produce(emit) -> None:          # runs on the model thread
            outcome["gathered"] = got = gather(self.library, engine, self.encoder, shelf.documents, question, probed)
            outcome["load_s"] = got.load_s
            outcome["answer"] = answer = engine.ask(got.memories, question, max_new_tokens, history=history,
                                                    lexical=got.lexical, meaning=got.meaning)
            doc, spans, pages = got.rows[answer.document]
            outcome["quote"] = self._emit(emit, answer, stop, lambda: self.quote(doc, question, answer.token_votes,
                                                                                spans, pages, got.asked))

        text = yield from self._stream(produce)
        answer, quote, got = outcome["answer"], outcome.get("quote"), outcome["gathered"]
        trace = {**self._stored(answer.trace), "documents": [d["id"] for d in got.documents]}
        found = passages(trace, got.rows)
        where = (quote["title"], quote["page"]) if quote else (found[0]["title"], found[0]["pages"]) if found else None
        cited = "" if stop.is_set() or where is None else cite(where[1], None if asked.one else where[0])
        method = engine.cfg.method
        text, conversation, timings = self._save(asked.scope, conversation, question, text, cited, stop, method,
                                                 trace, outcome, quote, shelf.note)
        yield Answered(text, cited, conversation, method, trace, timings, found, quote, stop.is_set(), shelf.note)

    def find(self, asked: Asked | int | str | Sequence[int], question: str, topk: int | None = None,
             probed: int | None = PROBED) -> Finding:
        """What ask() would quote and cite for a question, found as it finds it, without writing an answer or
        saving anything: bench.questions judges retrieval by it in minutes."""
        shelf = self.shelf(asked)
        engine = self.engine.answering(stored_config(shelf.documents[0]), topk)
        out: dict = {}

        def produce(emit) -> None:
            out["gathered"] = got = gather(self.library, engine, self.encoder, shelf.documents, question, probed)
            out["found"] = found = engine.find(got.memories, question, lexical=got.lexical, meaning=got.meaning)
            doc, spans, pages = got.rows[found.host]
            out["quote"] = self.quote(doc, question, found.token_votes, spans, pages, got.asked)

        for _ in self.worker.stream(produce):
            pass
        found, got = out["found"], out["gathered"]
        trace = Trace(votes=found.evidence.scores if found.evidence is not None else None,
                      parts=list(found.evidence.sizes) if found.evidence is not None else None)
        return Finding(found, got, out["quote"], passages(trace.summary().to_dict(), got.rows))

    def quote(self, doc: dict, question: str, token_votes: dict, spans: list[dict], pages: list[dict],
              asked: torch.Tensor | None = None) -> dict | None:
        """The document's sentence that the question points to (reading.quotes), with its document. asked: the
        question's embedding, to weigh each sentence's meaning too (None: attention and words)."""
        stored = self.library.text(doc["id"]) if token_votes else None
        if stored is None:
            return None
        similar = None
        if self.encoder is not None and asked is not None:
            similar = lambda texts: (self.encoder.encode(texts) @ asked).tolist()      # noqa: E731
        found = quotes.choose(token_votes, spans, *stored, pages, question, similar)
        return None if found is None else {**found.to_dict(), "document": doc["id"], "title": doc["title"]}

    def source(self, doc_ref: int | str, chars: Sequence[int] | None = None, span: int | None = None) -> Source:
        """Where a quote (its characters in the document's text) or an evidence span is (reading.source)."""
        return locate(self.library, doc_ref, chars, span)

    # -- internals --------------------------------------------------------------------------------
    def _history(self, conversation: int | None, scope: int | str) -> list[tuple[str, str]]:
        """The earlier (question, answer) turns of a conversation of this scope (Library.conversation)."""
        if conversation is None:
            return []
        self.library.conversation(conversation, scope)
        messages = self.library.messages(conversation)
        return [(q["content"], a["content"]) for q, a in zip(messages[::2], messages[1::2])]

    @staticmethod
    def _emit(emit, answer, stop: threading.Event, quote_of) -> dict | None:
        """On the model thread: "" (the model starts), the quote when there is one, then the answer's pieces
        until it ends or `stop` is set. Returns the quote."""
        emit("")
        t0 = time.perf_counter()
        quote = quote_of()
        answer.timings["quote_s"] = time.perf_counter() - t0       # before the answer's first token
        if quote is not None:
            emit(quote)
        for piece in answer:
            emit(piece)
            if stop.is_set():
                break
        return quote

    def _stream(self, produce) -> Iterator[str | dict]:
        """Pass on what produce emits on the model thread; returns the text pieces joined."""
        text = ""
        for piece in self.worker.stream(produce):
            if isinstance(piece, str):
                text += piece
            yield piece
        return text

    def _stored(self, trace: Trace) -> dict:
        return trace.to_dict() if self.full_traces else trace.summary().to_dict()

    def _save(self, scope: int | str, conversation: int | None, question: str, text: str, cited: str,
              stop: threading.Event, method: str, trace: dict, outcome: dict, quote: dict | None,
              note: str = "") -> tuple[str, int, dict]:
        """Save the question and the answer (its citation, or "…(stopped)", and the note appended) under the
        scope: (the answer's text, the conversation, the timings)."""
        text = f"{text} …(stopped)" if stop.is_set() else f"{text.rstrip()} {cited}" if cited else text
        text = f"{text}\n\n{note}" if note else text
        if conversation is None:
            conversation = self.library.new_conversation(scope, question)
        timings = {"memory_load_s": outcome["load_s"], **outcome["answer"].timings}
        self.library.add_message(conversation, scope, "user", question)
        self.library.add_message(conversation, scope, "assistant", text, method, trace, timings, quote)
        return text, conversation, timings
