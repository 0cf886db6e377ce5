"""The model thread's turns: questions go first, reading still advances, a waiting question knows its place."""
import threading
import time

import pytest

from infllm_engine import Engine, InfLLMConfig
from reading.worker import JobState, Queued, Worker
from storage.library import Library, Status

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=64, block_size=16, repr_topk=2, chunk_size=32, topk=2, cache_blocks=8)
# Long enough for several reading turns between questions on a fast CPU: with 3 pages, an AMX Xeon read
# the tiny model's book in two turns, and the test saw one question during the read instead of two.
BOOK = "\f".join(f"Page {p}. " + " ".join(f"word{p}x{i}" for i in range(60)) for p in range(1, 13))


@pytest.fixture
def worker(tmp_path):
    return Worker(Library(tmp_path / "data"), 1 << 20)


def engine() -> Engine:
    return Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL), fingerprint="tiny")


def drain(stream) -> list:
    return list(stream)


def test_a_book_dropped_while_questions_never_stop_is_read_between_them(worker, tmp_path, monkeypatch):
    """Two readers ask back to back (each question holds the thread 0.1 s): the book still starts and
    finishes, and between two questions answered while it is read, reading has had its turn (a chunk)."""
    monkeypatch.setattr("reading.worker.WAITING_POLL_S", 0.02)     # a reading turn's wait is seen
    (tmp_path / "book.txt").write_text(BOOK)
    seen: list[tuple[JobState, int]] = []      # (the book's state, tokens read) when each question ran
    done = threading.Event()
    job, answers, places = None, [], []

    def question(emit) -> None:
        seen.append((job.state, job.done) if job else (None, 0))
        time.sleep(0.1)
        emit("answer")

    def reader() -> None:
        while not done.is_set():
            got = drain(worker.stream(question))
            answers.append([x for x in got if not isinstance(x, Queued)])
            places.extend(x for x in got if isinstance(x, Queued))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        time.sleep(0.3)                          # the questions have the thread before the book comes
        job = worker.submit(tmp_path / "book.txt", "book.txt", engine())
        deadline = time.monotonic() + 120
        while job.state in (JobState.QUEUED, JobState.READING) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        for r in readers:
            r.join(30)
    assert job.state == JobState.READY, job.message
    assert answers and all(a == ["answer"] for a in answers)
    assert Queued(0, "book.txt") in places                     # a question waiting for reading's turn is told so
    assert worker.library.document(job.doc_id)["status"] == Status.READY
    during = [n for state, n in seen if state == JobState.READING and 0 < n < job.total]
    assert len(during) >= 2                                    # questions were answered while it was read...
    assert all(a < b for a, b in zip(during, during[1:]))      # ...never two without reading between them


def test_a_question_behind_another_is_told_its_place_and_one_closed_while_waiting_never_runs(worker):
    hold, ran = threading.Event(), []

    def first(emit) -> None:
        emit("first starts")
        hold.wait(30)
        emit("first ends")

    def second(emit) -> None:
        ran.append("second")
        emit("second")

    busy = worker.stream(first)
    assert next(busy) == "first starts"
    waiting = worker.stream(second)
    assert next(waiting) == Queued(ahead=1)                    # the one being answered is ahead
    assert str(Queued(1)) == "waiting for the model: 1 question ahead of yours"
    assert str(Queued(0, "book.pdf")) == "waiting for the model: yours is next, between turns of reading “book.pdf”"
    gone = worker.stream(second)
    assert next(gone) == Queued(ahead=2)
    gone.close()                                               # its tab was closed while it waited
    hold.set()
    assert list(busy) == ["first ends"]
    assert list(waiting) == ["second"] and ran == ["second"]  # the closed one never took the thread
