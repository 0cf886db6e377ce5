"""The reading service: the verbs a person uses, shared by the command line (app.py) and the page (ui/).

read a document (queued on the model's thread, or now), ask it (streamed, cited, saved with its
trace), keep the conversation, delete. Neither front end loads a memory, asks or saves by itself.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from infllm_engine import Engine, EngineError, InfLLMConfig, Trace
from infllm_engine.engine import Progress
from storage import page_images
from storage.library import Library, LibraryError, Status
from storage.readers import MAX_BYTES, DocumentError

from . import quotes
from .citations import citation, cite, passages, shelf_passages, stored_text
from .ingest import Ingested, backfill, config_here, ingest, load_memory, stored_config
from .worker import Job, Worker


class ReadingError(ValueError):
    """A request the service refuses, with a message for the person who made it."""


USER_ERRORS = (ReadingError, LibraryError, DocumentError, EngineError)   # shown as messages, never as tracebacks
# Tokens an answer may take by default. The quote carries the evidence; the 135M model's prose is right less
# often the longer it runs (bench/results/questions-cpu.md).
ANSWER_TOKENS = 64
# Documents probed by attention for a question across the library: those with the best word matches.
# Probing loads a memory's window and runs the question over it, about a second each on 2 CPU cores.
PROBED = 4


@dataclass
class Answered:
    """An answer once it has ended (or was stopped), as saved in the conversation."""

    text: str                 # the answer, its citation appended
    citation: str             # e.g. "(p. 61)": the quote's page, else the first evidence span's; "" without either
    conversation: int
    method: str
    trace: dict
    timings: dict
    evidence: list[dict]      # citations.passages: the evidence spans, best first
    quote: dict | None = None  # the document's sentence shown before the answer (Quote.to_dict, with its document)
    stopped: bool = False
    note: str = ""            # across documents: those left out (still being read, read in another mode)


@dataclass
class Source:
    """A quote's or a passage's place in its document, to show beside the answer."""

    title: str                        # the document's
    page: dict                        # its pages row (label, physical, ...)
    passage: str                      # the text shown highlighted
    image: page_images.PageImage | None = None         # the PDF page, the passage highlighted
    excerpt: tuple[str, str, str] | None = None        # else the page's text: before, the passage, after


ALL = "all"         # every document of the library, as ask() takes it
CONTEXT = 1500      # characters of the page's text shown around a passage where there is no page picture


class ReadingService:
    def __init__(self, engine: Engine, library: Library, max_upload_bytes: int = MAX_BYTES, full_traces: bool = False):
        """full_traces: store each answer's per-step retrieval record (Trace.to_dict, ~340 KB an answer, for
        debugging) instead of its summary (Summary.to_dict, ~6 KB: all the pages show)."""
        if max_upload_bytes < 1:
            raise ReadingError(f"the upload limit must be at least 1 byte, got {max_upload_bytes}")
        self.engine, self.library, self.max_upload_bytes = engine, library, max_upload_bytes
        self.full_traces = full_traces
        self.worker = Worker(library, max_upload_bytes)
        self._backfilled: set[int] = set()

    @classmethod
    def start(cls, engine: Engine, library: Library, max_upload_bytes: int = MAX_BYTES,
              full_traces: bool = False) -> "ReadingService":
        """The service, with documents whose reading stopped with the app queued to resume."""
        service = cls(engine, library, max_upload_bytes, full_traces)
        service.worker.resume_interrupted(engine)
        return service

    # -- reading ----------------------------------------------------------------------------------
    def read(self, path: Path, name: str, cfg: InfLLMConfig | None = None) -> Job:
        """Keep a copy of a dropped file and queue it for reading on the model's thread."""
        size = Path(path).stat().st_size
        if size > self.max_upload_bytes:
            raise ReadingError(f"{name} is {size / 2**20:,.1f} MB, over the {self.max_upload_bytes / 2**20:,.0f} MB limit")
        kept = self.library.keep_upload(Path(path), name)
        return self.worker.submit(kept, name, self.engine.with_config(cfg or self.engine.cfg))

    def read_now(self, path: Path, progress: Progress | None = None) -> Ingested:
        """Read a file on this thread (the command line), or find it already read, or resume it."""
        return ingest(self.library, self.engine, path, progress, max_bytes=self.max_upload_bytes)

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
    def question_config(self, doc: dict, topk: int | None = None) -> InfLLMConfig:
        """The config to ask a document with.

        Its layout (mode, window, blocks) is fixed by how it was read. Where it runs and the question
        focus are this service's engine's, whatever they were when it was read; topk may change per call.
        """
        own = self.engine.cfg
        # "mixed" answers in fp32 (config.DTYPES)
        return config_here(doc, own).replace(topk=own.topk if topk is None else int(topk), dtype=own.answer_dtype)

    def ask(self, doc_ref: int | str | Sequence[int], question: str, conversation: int | None = None,
            topk: int | None = None, max_new_tokens: int = ANSWER_TOKENS,
            stop: threading.Event | None = None) -> Iterator[str | dict | Answered]:
        """Stream an answer on the model's thread: "" when the model starts, then the quote (a dict, when the
        document has a sentence to quote), then text pieces, then Answered.

        doc_ref: a document (id or title), or several: "all" or a list of ids (ask_shelf).
        The question and the answer (with its quote, citation, trace and timings) are saved when the answer
        ends, also when `stop` is set. conversation: the one to continue (its turns are re-read), or None.
        """
        question = (question or "").strip()
        if not question:
            raise ReadingError("type a question first")
        if not isinstance(doc_ref, (int, str)) and len(set(doc_ref)) == 1:
            doc_ref = next(iter(doc_ref))           # one document ticked is that document, its conversations too
        if doc_ref == ALL or not isinstance(doc_ref, (int, str)):
            yield from self.ask_shelf(doc_ref, question, conversation, topk, max_new_tokens, stop)
            return
        doc = self.library.document(doc_ref)
        if doc["status"] != Status.READY:
            raise ReadingError(f"“{doc['title']}” is not ready yet ({doc['status']})")
        cfg = self.question_config(doc, topk)
        engine = self.engine.with_config(cfg)
        history = self._history(conversation, doc["id"])        # another document's turns are never re-read
        lexical = self.library.search(doc["id"], question) if cfg.focus_lexical else None
        stop = stop or threading.Event()
        outcome: dict = {}
        self._backfill(doc)
        spans, pages = self.library.spans(doc["id"]), self.library.pages(doc["id"])

        def produce(emit) -> None:          # runs on the model thread
            t0 = time.perf_counter()
            memory = load_memory(self.library, engine, doc["id"])
            outcome["load_s"] = time.perf_counter() - t0
            outcome["answer"] = answer = engine.ask(memory, question, max_new_tokens, history=history, lexical=lexical)
            outcome["quote"] = self._emit(emit, answer, stop, lambda: self.quote(doc, question, answer.token_votes,
                                                                                spans, pages))

        text = yield from self._stream(produce)
        answer, quote = outcome["answer"], outcome.get("quote")
        trace = self._stored(answer.trace)
        cited = "" if stop.is_set() else cite(quote["page"]) if quote else citation(trace, spans, pages)
        text, conversation, timings = self._save(doc["id"], conversation, question, text, cited, stop, cfg.method,
                                                 trace, outcome, quote)
        yield Answered(text, cited, conversation, cfg.method, trace, timings, passages(trace, spans, pages), quote,
                       stop.is_set())

    def quote(self, doc: dict, question: str, token_votes: dict, spans: list[dict], pages: list[dict]) -> dict | None:
        """The document's sentence that the question points to (reading.quotes), with its document."""
        stored = self.library.text(doc["id"]) if token_votes else None
        if stored is None:
            return None
        found = quotes.choose(token_votes, spans, *stored, pages, question)
        return None if found is None else {**found.to_dict(), "document": doc["id"], "title": doc["title"]}

    def ask_shelf(self, docs: str | Sequence[int], question: str, conversation: int | None = None,
                  topk: int | None = None, max_new_tokens: int = ANSWER_TOKENS, stop: threading.Event | None = None,
                  probed: int | None = PROBED) -> Iterator[str | dict | Answered]:
        """Ask several documents at once ("all", or ids): streamed and saved as ask() does.

        The library's word index ranks every document; the `probed` best (None: all) are probed by attention
        (Engine.ask_shelf); the one holding the best span is read and quoted, and the quote and the citation
        name it. Documents still being read (or read in another mode) are left out, and the answer says so.
        """
        question = (question or "").strip()
        if not question:
            raise ReadingError("type a question first")
        key, chosen, waiting = self.shelf(docs)
        # Spans of memories laid out alike sit at compatible positions; others are named, not searched.
        ref = next((d for d in chosen if stored_config(d).layout() == self.engine.cfg.layout()), chosen[0])
        cfg = self.question_config(ref, topk)
        other = [d for d in chosen if stored_config(d).layout() != cfg.layout() or stored_config(d).method != "infllm"]
        chosen = [d for d in chosen if d not in other]
        if not chosen:
            raise ReadingError("none of these documents was read in the InfLLM mode that a question across "
                               "documents needs")
        history = self._history(conversation, key)
        words = self.library.search_shelf([d["id"] for d in chosen], question)
        if probed is not None and len(chosen) > probed:
            best = lambda d: max(words.get(d["id"], {0: 0.0}).values())
            chosen = sorted(chosen, key=best, reverse=True)[:probed]
        for doc in chosen:
            self._backfill(doc)
        engine = self.engine.with_config(cfg)
        spans = [self.library.spans(d["id"]) for d in chosen]
        pages = [self.library.pages(d["id"]) for d in chosen]
        stop = stop or threading.Event()
        outcome: dict = {}

        def produce(emit) -> None:          # runs on the model thread
            t0 = time.perf_counter()
            memories = [load_memory(self.library, engine, d["id"]) for d in chosen]
            outcome["load_s"] = time.perf_counter() - t0
            lexical = [words.get(d["id"]) for d in chosen] if cfg.focus_lexical else []
            outcome["answer"] = answer = engine.ask_shelf(memories, question, max_new_tokens, history=history,
                                                          lexical=lexical)
            best = answer.document
            outcome["quote"] = self._emit(emit, answer, stop, lambda: self.quote(
                chosen[best], question, answer.token_votes, spans[best], pages[best]))

        text = yield from self._stream(produce)
        answer, quote = outcome["answer"], outcome.get("quote")
        trace = {**self._stored(answer.trace), "documents": [d["id"] for d in chosen]}
        found = shelf_passages(trace, [(d, s, p) for d, s, p in zip(chosen, spans, pages)])
        where = (quote["title"], quote["page"]) if quote else (found[0]["title"], found[0]["pages"]) if found else None
        cited = "" if stop.is_set() or where is None else cite(where[1], where[0])
        left = [f"“{d['title']}” ({d['status']})" for d in waiting] + [f"“{d['title']}” (read in another mode)"
                                                                       for d in other]
        note = f"Not searched: {', '.join(left)}." if left else ""
        text, conversation, timings = self._save(key, conversation, question, text, cited, stop, cfg.method, trace,
                                                 outcome, quote, note)
        yield Answered(text, cited, conversation, cfg.method, trace, timings, found, quote, stop.is_set(), note)

    # -- what both kinds of question share --------------------------------------------------------
    def _history(self, conversation: int | None, scope: int | str) -> list[tuple[str, str]]:
        """The earlier (question, answer) turns of a conversation of this scope (Library.conversation)."""
        if conversation is None:
            return []
        self.library.conversation(conversation, scope)
        messages = self.library.messages(conversation)
        return [(q["content"], a["content"]) for q, a in zip(messages[::2], messages[1::2])]

    def _backfill(self, doc: dict) -> None:
        """A document read before texts were kept gets its text and pages once per run, whatever it finds."""
        if doc["id"] not in self._backfilled and self.library.text(doc["id"]) is None:
            self._backfilled.add(doc["id"])
            backfill(self.library, self.engine, doc["id"])

    @staticmethod
    def _emit(emit, answer, stop: threading.Event, quote_of) -> dict | None:
        """On the model thread: "" (the model starts), the quote when there is one, then the answer's pieces
        until it ends or `stop` is set. Returns the quote."""
        emit("")
        quote = quote_of()
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

    def shelf(self, docs: str | Sequence[int]) -> tuple[str, list[dict], list[dict]]:
        """A question's documents: (the conversation key, the ready ones, the ones still being read)."""
        if docs == ALL:
            rows, key = self.library.documents(), ALL
        else:
            ids = sorted({int(self.library.document(d)["id"]) for d in docs})
            rows, key = [self.library.document(i) for i in ids], ",".join(map(str, ids))
        ready = [d for d in rows if d["status"] == Status.READY]
        if not ready:
            raise ReadingError("no document is ready to ask yet" if rows else "the library is empty: drop a file first")
        return key, ready, [d for d in rows if d["status"] != Status.READY]

    # -- the source, to check -----------------------------------------------------------------------
    def source(self, doc_ref: int | str, chars: Sequence[int] | None = None, span: int | None = None) -> Source:
        """Where a quote (its characters in the document's text) or an evidence span is: its page, as a
        picture with the passage highlighted (a PDF whose file is kept), or as text around it."""
        doc = self.library.document(doc_ref)
        pages, stored = self.library.pages(doc["id"]), self.library.text(doc["id"])
        if chars is not None and stored is not None:
            text, starts = stored
            a, b = chars
            if not 0 <= a < b <= len(text):
                raise ReadingError(f"“{doc['title']}” has no characters {a}–{b}")
            page = quotes.page_of(pages, bisect.bisect_right(starts, a) - 1)
            passage = text[a:b]
        elif span is not None:
            spans = self.library.spans(doc["id"])
            if not 0 <= span < len(spans):
                raise ReadingError(f"“{doc['title']}” has no passage {span}")
            page, passage = pages[spans[span]["first_page"] - 1], stored_text(spans[span])
            if stored is not None:
                text, starts = stored
                a = starts[min(spans[span]["start_token"], len(starts) - 1)]
                b = starts[spans[span]["end_token"]] if spans[span]["end_token"] < len(starts) else len(text)
        else:
            raise ReadingError("say which quote or passage to show")
        upload = self.library.upload_path(doc["id"])
        if doc["kind"] == "pdf" and upload is not None and page.get("physical"):
            return Source(doc["title"], page, passage, page_images.render(upload, page["physical"], passage))
        if stored is None or page.get("start_char") is None:
            return Source(doc["title"], page, passage)
        lo, hi = max(page["start_char"], a - CONTEXT), min(page["end_char"], b + CONTEXT)
        return Source(doc["title"], page, passage, excerpt=(text[lo:a], text[a:b], text[b:hi]))
