"""The model's own thread: uploads queue here and are read one at a time, so the page never waits.

Every forward pass of the app runs on this one thread. Two forwards at once on two cores run each
several times slower, and each new thread that calls torch brings its own OpenMP team, whose
spinning workers halved decoding speed when answers ran on Gradio's worker threads (10.4 against
5.8 tokens/s, measured). A question goes first: a document being read pauses between chunks to
answer it. But turns are fair: after a question, reading gets back as much time as the question
took before the next one is answered, so a book dropped on a busy page is read at least half as
fast as alone (questions that always came first starved it: still "reading" after 10 minutes of six
readers asking). Reading survives a closed tab, and one killed with the app resumes from its last
commit when the app starts again.
"""
from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from infllm_engine import Engine, EngineError
from infllm_engine.encoder import Encoder
from storage.library import Library, LibraryError, Status
from documents import DocumentError

from .ingest import Outcome, ingest, stored_config

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    READING = "reading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Job:
    name: str                 # the upload's original name: shown, never a path
    path: Path                # the library's kept copy
    engine: Engine
    state: JobState = JobState.QUEUED
    message: str = ""
    doc_id: int | None = None  # known once reading has found or added the document
    ended: int = -1            # Worker.version when it ended (ready or failed)
    done: int = 0             # tokens read
    total: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_done: int | None = None
    paused_s: float = 0.0

    @property
    def rate(self) -> float:
        """Tokens per second over this run (an earlier run's tokens and pauses excluded)."""
        elapsed = time.perf_counter() - self.started - self.paused_s
        return (self.done - (self.first_done or 0)) / elapsed if elapsed > 0 and self.first_done is not None else 0.0

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


@dataclass(frozen=True)
class Queued:
    """Where a question waits for the model thread, streamed while it waits (Worker.stream)."""
    ahead: int                  # questions before it, the one being answered included
    reading: str | None = None  # the document being read, which takes its turns too

    def __str__(self) -> str:
        line = ("waiting for the model: " + (f"{self.ahead} question{'s' * (self.ahead != 1)} ahead of yours"
                                             if self.ahead else "yours is next"))
        return line + (f", between turns of reading “{self.reading}”" if self.reading else "")


WAITING_POLL_S = 0.5    # how often a waiting question's place is looked at


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim        # glibc only (not musl, macOS or Windows)
except (OSError, AttributeError):
    _LIBC = None


def _give_back_freed_memory() -> None:
    """Return the heap pages freed by a call to the system. glibc keeps them for reuse, and the sizes of an
    answer's buffers vary with its question, so they fragment: over 16 answers about two books the
    anonymous RSS wandered between 820 and 1,080 MiB, and stayed at 335-375 with this after each."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _Cancelled(Exception):
    """The consumer of a streamed call went away (a closed tab): stop producing."""


class Worker:
    def __init__(self, library: Library, max_bytes: int, encoder: Encoder | None = None):
        self.library, self.max_bytes, self.encoder = library, max_bytes, encoder
        self.jobs: list[Job] = []
        self.version = 0                  # bumped whenever the library changes: the page then refreshes
        self.answering = False
        self._owed = 0.0                  # seconds of the thread that reading is owed for the questions answered
        self._pending: deque[Job] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._work = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="model").start()

    def submit(self, path: Path, name: str, engine: Engine) -> Job:
        job = Job(name, Path(path), engine)
        with self._work:
            self.jobs.append(job)
            self._pending.append(job)
            self.version += 1
            self._work.notify_all()
        return job

    def resume_interrupted(self, engine: Engine) -> list[Job]:
        """Queue documents whose reading stopped with the app (status 'reading') and whose upload is kept."""
        jobs = []
        for doc in self.library.documents():
            path = self.library.upload_path(doc["id"]) if doc["status"] == Status.READING else None
            if path is None or doc["model_fingerprint"] != engine.fingerprint:
                continue
            # read on where and in the precision this engine runs (a stored memory is packed the same in every dtype)
            jobs.append(self.submit(path, doc["source_name"], engine.with_config(engine.cfg.for_memory(stored_config(doc)))))
        return jobs

    def active(self) -> list[Job]:
        return [j for j in self.jobs if j.state in (JobState.QUEUED, JobState.READING)]

    def wait(self, timeout: float = 600) -> None:
        """Until the queue is empty (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stream(self, produce: Callable[[Callable[[object], None]], None]) -> Iterator[object]:
        """Run produce(emit) on the model thread, in its turn (see the module's doc); yield what it emits, as it
        comes, and while it waits its place (Queued) whenever that changes.

        produce's exceptions are raised here. If this iterator is closed early, produce's next emit stops it,
        and a call still waiting never runs.
        """
        items: queue.Queue = queue.Queue()
        done, cancelled = object(), threading.Event()

        def emit(item: object) -> None:
            if cancelled.is_set():
                raise _Cancelled
            items.put(item)

        def call() -> None:
            if cancelled.is_set():
                return
            try:
                produce(emit)
                items.put(done)
            except _Cancelled:
                pass
            except BaseException as err:      # handed over to the consumer, which raises it
                items.put(err)

        with self._work:
            self._calls.append(call)
            self._work.notify_all()
        try:
            shown = None
            while True:
                try:
                    item = items.get(timeout=WAITING_POLL_S)
                except queue.Empty:
                    if (place := self._place(call)) is not None and place != shown:
                        shown = place
                        yield place
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def _place(self, call: Callable[[], None]) -> Queued | None:
        """Where a call waits; None once it runs."""
        with self._work:
            if call not in self._calls:
                return None
            ahead = self._calls.index(call) + self.answering
        reading = next((j.name for j in self.jobs if j.state == JobState.READING), None)
        return Queued(ahead, reading)

    # -- the model thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._calls or self._pending)
                job = self._pending.popleft() if self._pending else None
            if job is None:
                self._answer()
            else:                           # one question first, then reading has its turn
                self._owed = self._answer_one() if self._calls else 0.0
                try:
                    self._read(job)
                finally:
                    job.ended = self.version + 1      # before the bump: a poll that sees it sees this too
                    self.version += 1
                    # After: the page's poll (and Worker.wait) see the job ended as soon as it is.
                    _give_back_freed_memory()

    def _answer(self) -> None:
        """Run the waiting calls (questions), oldest first, until a document comes to be read."""
        while self._calls and not self._pending:
            self._answer_one()

    def _answer_one(self) -> float:
        """Run the oldest waiting call; the seconds it took."""
        with self._work:
            if not self._calls:
                return 0.0
            call = self._calls.popleft()
        started = time.perf_counter()
        self.answering = True
        try:
            call()
        finally:
            self.answering = False
            _give_back_freed_memory()
        return time.perf_counter() - started

    def _read(self, job: Job) -> None:
        job.state, job.started = JobState.READING, time.perf_counter()

        def started(doc_id: int) -> None:
            job.doc_id = doc_id
            self.version += 1           # the document's row (new, or failed -> reading) shows at once
        try:
            done = ingest(self.library, job.engine, job.path, self._progress(job), max_bytes=self.max_bytes,
                          name=job.name, started=started, encoder=self.encoder)
        except (DocumentError, LibraryError, EngineError) as err:
            job.state, job.message = JobState.FAILED, str(err)
            return
        except Exception as err:        # a bug, not bad input: keep the app alive and say so
            log.exception("reading %s failed", job.name)
            job.state, job.message = JobState.FAILED, f"reading failed with an internal error: {err}"
            return
        job.doc_id, job.state = done.doc_id, JobState.READY
        job.done = job.total = done.tokens
        job.message = (f"already in the library as “{done.title}”" if done.outcome == Outcome.FOUND
                       else f"read {done.tokens:,} tokens in {done.seconds:,.0f} s")

    def _progress(self, job: Job):
        """Between two chunks: the turn of a waiting question once reading has had the time it was owed."""
        last = time.perf_counter()

        def show(done: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if job.first_done is None:
                job.first_done, job.started = done, now
            job.done, job.total = done, total
            self._owed = self._owed - (now - last) if self._calls else 0.0
            if self._calls and self._owed <= 0:
                took = self._answer_one()
                self._owed, job.paused_s = took, job.paused_s + took
            last = time.perf_counter()
        return show
