"""The model's own thread: uploads queue here and are read one at a time, so the page never waits.

Every forward pass of the app runs on this one thread. Two forwards at once on two cores run each
several times slower, and each new thread that calls torch brings its own OpenMP team, whose
spinning workers halved decoding speed when answers ran on Gradio's worker threads (10.4 against
5.8 tokens/s, measured). A question has priority: a document being read pauses between chunks to
answer it. Reading survives a closed tab, and one killed with the app resumes from its last
commit when the app starts again.
"""
from __future__ import annotations

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
from storage.library import Library, LibraryError, Status
from storage.readers import DocumentError

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


class _Cancelled(Exception):
    """The consumer of a streamed call went away (a closed tab): stop producing."""


class Worker:
    def __init__(self, library: Library, max_bytes: int):
        self.library, self.max_bytes = library, max_bytes
        self.jobs: list[Job] = []
        self.version = 0                  # bumped whenever the library changes: the page then refreshes
        self.answering = False
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
            jobs.append(self.submit(path, doc["source_name"], engine.with_config(stored_config(doc))))
        return jobs

    def active(self) -> list[Job]:
        return [j for j in self.jobs if j.state in (JobState.QUEUED, JobState.READING)]

    def wait(self, timeout: float = 600) -> None:
        """Until the queue is empty (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stream(self, produce: Callable[[Callable[[object], None]], None]) -> Iterator[object]:
        """Run produce(emit) on the model thread, ahead of any reading; yield what it emits, as it comes.

        produce's exceptions are raised here. If this iterator is closed early, produce's next emit stops it.
        """
        items: queue.Queue = queue.Queue()
        done, cancelled = object(), threading.Event()

        def emit(item: object) -> None:
            if cancelled.is_set():
                raise _Cancelled
            items.put(item)

        def call() -> None:
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
            while (item := items.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    # -- the model thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._calls or self._pending)
                job = self._pending.popleft() if self._pending and not self._calls else None
            self._answer()
            if job is not None:
                try:
                    self._read(job)
                finally:
                    job.ended = self.version + 1      # before the bump: a poll that sees it sees this too
                    self.version += 1

    def _answer(self) -> None:
        """Run the waiting calls (questions), oldest first."""
        while True:
            with self._work:
                if not self._calls:
                    return
                call = self._calls.popleft()
            self.answering = True
            try:
                call()
            finally:
                self.answering = False
    def _read(self, job: Job) -> None:
        job.state, job.started = JobState.READING, time.perf_counter()

        def started(doc_id: int) -> None:
            job.doc_id = doc_id
            self.version += 1           # the document's row (new, or failed -> reading) shows at once
        try:
            done = ingest(self.library, job.engine, job.path, self._progress(job), max_bytes=self.max_bytes,
                          name=job.name, started=started)
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
        def show(done: int, total: int) -> None:
            if job.first_done is None:
                job.first_done, job.started = done, time.perf_counter()
            job.done, job.total = done, total
            if self._calls:
                paused = time.perf_counter()
                self._answer()
                job.paused_s += time.perf_counter() - paused
        return show
