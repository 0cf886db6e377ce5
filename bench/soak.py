"""A soak test of the page: readers ask through its API on loopback for a while, and a dropped book is read.

    python -m bench.soak --readers 10 --seconds 3600 --book lshort.pdf --json soak.json
    python -m bench.soak --readers 0 --seconds 3600 --drop paper.pdf          # the dropped book alone
    python -m bench.soak --readers 6 --seconds 1800 --book lshort.pdf --drop paper.pdf

The bench starts its own server (`app.py serve`) on a free loopback port and always stops it. --book is
read first with `app.py ingest` (which finds it when it is already read with this model and settings),
before the clock starts. Each reader is a thread with its own Gradio session that asks /asked back to
back, as the page's Ask button does; every --per-conversation questions it opens a new session, so its
conversation's turns are re-read but their number is bounded. After --seconds (or --max-answers) no
question starts; the run ends when the answers in flight end, or --grace seconds later (those still
unfinished count as errors). --drop is uploaded through the page's upload event when the clock starts,
and its document is followed in the library until it is ready or failed; with --readers 0 the run ends
as soon as it is, which gives its time alone.

Reported: answers a minute; p50/p95 of the time from the click to the first words (the quote or the
answer) and to the end, queue included; errors; tracebacks in the server's log; the server's RSS every
--sample-every seconds; the library's growth per stored answer, and the trace's bytes per answer; the
dropped book's time to ready, or how far it got.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from bench.soak_table import INTERRUPTED, Asked, report, rounded, summary, table_row

ROOT = Path(__file__).resolve().parents[1]
ASK_API = "/asked"
QUESTIONS = (
    "What is this document about?",
    "Who is it written for?",
    "What does the first chapter explain?",
    "Which example does it give first, and what does it show?",
    "What are the main steps it describes?",
    "What does it warn the reader about?",
    "Which terms does it define, and how?",
    "Summarise its most important idea in two sentences.",
)
POLL_S = 0.05           # gradio_client itself reads the server's events every 50 ms
# /proc/PID/status fields sampled, and their names here; memory in MiB.
STATUS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "peak",
          "Threads": "threads"}
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None     # resolved before any fork


@dataclass
class Run:
    """What the readers share: the clock, the bounds, what they ask and what came back."""

    doc: int
    knobs: list                     # /asked's values after the question, as the page sends them
    questions: list[str]
    per_conversation: int
    t0: float
    soft_end: float                 # no question starts after it
    hard_end: float                 # a question still unfinished is given up
    tickets: int                    # questions left before --max-answers
    stop: threading.Event
    answers: list[Asked]
    lock: threading.Lock

    def take_ticket(self) -> bool:
        with self.lock:
            if self.stop.is_set() or time.monotonic() >= self.soft_end or self.tickets <= 0:
                return False
            self.tickets -= 1
            return True


class Server:
    """`app.py serve` on a free loopback port, its output in `log`; stopped on leaving, whatever happened."""

    def __init__(self, data_dir: Path, log: Path, app_args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}/", log
        self.command = [sys.executable, "app.py", "serve", "--data-dir", str(data_dir), "--port", str(port), *app_args]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        with open(self.log, "ab") as out:
            # Its own session: Ctrl-C reaches the bench, which stops the server itself; and the kernel stops
            # the server if the bench dies unannounced (an orphan would spoil the next run's cores).
            self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_stop_with_parent)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{tail(self.log)}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _stop_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# -- the library, read-only -------------------------------------------------------------------------------
def library(data_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{data_dir / 'library.db'}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    return db


def ready_document(data_dir: Path) -> int | None:
    if not (data_dir / "library.db").exists():
        return None
    with closing(library(data_dir)) as db:
        row = db.execute("SELECT id FROM documents WHERE status = 'ready' ORDER BY id LIMIT 1").fetchone()
    return row["id"] if row else None


def library_size(data_dir: Path) -> dict:
    """The library on disk: its files as they are; with SQLite counted as its pages in use (the -wal file runs
    ahead of what is stored, then stays at its high-water mark after each checkpoint); and the pages of the
    conversations' tables alone (None where SQLite was built without its dbstat table)."""
    files = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    with closing(library(data_dir)) as db:
        pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        last = db.execute("SELECT ifnull(max(id), 0) FROM messages").fetchone()[0]
        try:
            talk = db.execute("SELECT sum(pgsize) FROM dbstat WHERE name IN ('messages', 'conversations')"
                              ).fetchone()[0]
        except sqlite3.OperationalError:
            talk = None
    sqlite_files = sum(p.stat().st_size for p in data_dir.glob("library.db*"))
    return {"files": files, "stored": files - sqlite_files + (pages - free) * size, "conversations": talk,
            "last_message": last}


def stored_answers(data_dir: Path, after: int) -> dict:
    """The answers saved after message `after`: how many, and their bytes (the trace's; all the columns of the
    answer and its question)."""
    size = lambda column: f"ifnull(length(CAST({column} AS BLOB)), 0)"
    with closing(library(data_dir)) as db:
        n, trace, answer = db.execute(
            f"SELECT count(*), avg({size('trace')}), avg({size('content')} + {size('trace')} + {size('timings')} + "
            f"{size('quote')}) FROM messages WHERE id > ? AND role = 'assistant'", [after]).fetchone()
        question = db.execute(f"SELECT avg({size('content')}) FROM messages WHERE id > ? AND role = 'user'",
                              [after]).fetchone()[0]
    return {"answers": n, "trace_bytes": round(trace or 0), "row_bytes": round((answer or 0) + (question or 0))}


class Dropped:
    """A file dropped on the page, followed in the library by its bytes' hash until it is ready or failed.
    Its row appears when its reading starts (until then its job waits in the model thread's queue)."""

    def __init__(self, path: Path, data_dir: Path):
        self.path, self.data_dir = path, data_dir
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.before = self.row()            # read in an earlier run: reading finds it at once
        self.note, self.at, self.seen_s, self.ready_s, self.last = "", 0.0, None, None, None

    def row(self) -> dict | None:
        if not (self.data_dir / "library.db").exists():
            return None
        with closing(library(self.data_dir)) as db:
            row = db.execute("SELECT id, status, tokens, read_tokens, read_seconds, error, upload FROM documents "
                             "WHERE sha256 = ? ORDER BY id DESC LIMIT 1", [self.sha256]).fetchone()
        return dict(row) if row else None

    def upload(self, client, api: str, knobs: list) -> None:
        from gradio_client import handle_file

        self.at = time.monotonic()
        self.note = str(client.predict([handle_file(str(self.path))], *knobs, api_name=api)[0])

    def poll(self) -> None:
        if (row := self.row()) is None:
            return
        now = time.monotonic() - self.at
        self.seen_s = now if self.seen_s is None else self.seen_s
        if row["status"] == "ready" and self.ready_s is None:
            self.ready_s = now
        self.last = row

    @property
    def done(self) -> bool:
        refused = self.note.startswith("✗")        # the page's note for a file it will not read
        return refused or self.last is not None and self.last["status"] in ("ready", "failed")

    def new_files(self) -> int:
        """Bytes of its memory and kept file when this run read it: the library's growth less them is the answers'."""
        if self.last is None or self.before is not None:
            return 0
        memory = self.data_dir / "memory" / str(self.last["id"])
        kept = self.data_dir / "uploads" / (self.last["upload"] or "-")
        return sum(p.stat().st_size for p in memory.rglob("*") if p.is_file()) + \
            (kept.stat().st_size if kept.is_file() else 0)

    def report(self) -> dict:
        row = self.last or {}
        return {"file": str(self.path), "note": self.note, "already_in_library": self.before is not None,
                "status": row.get("status", "queued"), "tokens": row.get("tokens"),
                "read_tokens": row.get("read_tokens"),
                "read_seconds": rounded(row.get("read_seconds")), "error": row.get("error"),
                "row_after_s": rounded(self.seen_s), "ready_after_s": rounded(self.ready_s)}


# -- the server's memory ----------------------------------------------------------------------------------
def memory_sample(pid: int, t0: float) -> dict:
    sample = {"t_s": round(time.monotonic() - t0, 1)}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS:
                n = int(value.split()[0])
                sample[STATUS[key]] = n if key == "Threads" else round(n / 1024, 1)
    sample["fds"] = len(os.listdir(f"/proc/{pid}/fd"))      # leaked memory maps and sockets show here
    return sample


def sample_every(pid: int, t0: float, seconds: float, samples: list, done: threading.Event) -> None:
    while not done.wait(seconds):
        try:
            samples.append(memory_sample(pid, t0))
        except OSError:                 # the server is gone; the readers' errors say so
            return


# -- the readers --------------------------------------------------------------------------------------------
def answer_text(output) -> str:
    """The assistant's words in one of /asked's outputs (chat, inspector, question); "" if there are none
    (a question refused with a warning leaves the chat as it was: its output is an update, not a chat)."""
    chat = output[0] if isinstance(output, (list, tuple)) and output else None
    if not isinstance(chat, list) or not chat or not isinstance(chat[-1], dict) or chat[-1].get("role") != "assistant":
        return ""
    content = chat[-1].get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if isinstance(part, dict))


def ask(client, run: Run, reader: int, turn: int, question: str) -> Asked:
    asked = Asked(reader, turn, question, round(time.monotonic() - run.t0, 2))
    t = time.monotonic()
    since = lambda: round(time.monotonic() - t, 3)
    shown: list[tuple[float, str]] = []     # (when, what the answer's bubble showed) at each change
    try:
        job, seen = client.submit(run.doc, question, *run.knobs, api_name=ASK_API), 0
        while True:
            finished, outputs = job.done(), job.outputs()
            for output in outputs[seen:]:
                asked.started_s = since() if asked.started_s is None else asked.started_s
                if (text := answer_text(output).rstrip()) and (not shown or shown[-1][1] != text):
                    shown.append((since(), text))
            seen = len(outputs)
            if finished:
                break
            if time.monotonic() > run.hard_end or run.stop.is_set():
                job.cancel()
                asked.error = INTERRUPTED if run.stop.is_set() else "unfinished when the run ended"
                return asked
            time.sleep(POLL_S)
        text = answer_text(job.result())
        asked.end_s, asked.chars = since(), len(text)
        # The first words are the first that stay: a waiting question's bubble says where it waits, which the
        # answer then replaces. All at once (no update between), they came at the end.
        asked.first_s = next((when for when, words in shown if text.startswith(words)), asked.end_s)
        if not text:
            asked.error = "no answer: the page refused the question (a warning, the chat unchanged)"
    except Exception as err:            # any failure is the reader's: counted, and the run goes on
        asked.error = f"{type(err).__name__}: {err}"[:500]
    return asked


def read(run: Run, reader: int, client) -> None:
    """One reader: its own session, questions back to back, a new conversation every few."""
    turn, n = 0, 0
    while run.take_ticket():
        if turn == run.per_conversation:
            client.reset_session()          # a new session is a new conversation, as in a new tab
            turn = 0
        asked = ask(client, run, reader, turn, run.questions[(reader + n) % len(run.questions)])
        with run.lock:
            run.answers.append(asked)
        turn, n = turn + 1, n + 1
        if asked.error:
            time.sleep(1)                   # a refused or failed question is not retried in a tight loop


def page_api(client) -> tuple[list, str, list]:
    """The page's own defaults, so the bench sends what the page would: /asked's values between the question
    and the "several documents" box (which comes last and may be left out: the reading mode, topk, window,
    answer length); the upload event's name (the one whose first input is a File) and its values after the files."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    knobs = [p["parameter_default"] for p in api[ASK_API]["parameters"][2:-1]]
    upload = next(name for name, e in api.items() if e["parameters"] and e["parameters"][0]["component"] == "File")
    return knobs, upload, [p["parameter_default"] for p in api[upload]["parameters"][1:]]


# -- the run ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--readers", type=int, default=2, help="readers asking at once (0: only --drop, alone)")
    p.add_argument("--seconds", type=float, default=60, help="no question starts after this")
    p.add_argument("--book", type=Path, metavar="FILE",
                   help="the document the readers ask about (read before the clock starts)")
    p.add_argument("--drop", type=Path, metavar="FILE", help="a file dropped on the page when the clock starts")
    p.add_argument("--questions-file", type=Path, metavar="FILE",
                   help="questions, one a line (default: a few about any book)")
    p.add_argument("--per-conversation", type=int, default=4, help="questions of a conversation before a new one")
    p.add_argument("--max-answers", type=int, default=10_000, help="questions asked at most, all readers together")
    p.add_argument("--grace", type=float, default=600, help="seconds past --seconds for the answers in flight")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: the page's)")
    p.add_argument("--sample-every", type=float, default=30, help="seconds between the server's RSS samples")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="the library (default: a fresh one, removed after a clean run)")
    p.add_argument("--model", help="HF model directory (default: the app's embedded model)")
    p.add_argument("--dtype", help="the app's --dtype")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for the server to answer")
    p.add_argument("--json", dest="json_path", type=Path, metavar="OUT", help="write every answer and sample here")
    args = p.parse_args(argv)
    if args.readers < 0 or args.seconds <= 0 or args.per_conversation < 1 or args.max_answers < 1:
        p.error("--readers must be >= 0, --seconds > 0, --per-conversation and --max-answers >= 1")
    if args.readers == 0 and args.drop is None:
        p.error("--readers 0 measures a dropped book alone: give --drop FILE")
    for path in (args.book, args.drop, args.questions_file):
        if path is not None and not path.is_file():
            p.error(f"{path}: no such file")
    return args


def ingest(book: Path, data_dir: Path, app_args: list[str]) -> dict:
    """`app.py ingest --json`: it finds a book already read with this model and these settings."""
    done = subprocess.run([sys.executable, "app.py", "ingest", str(book.resolve()), "--json", "--data-dir",
                           str(data_dir), *app_args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"reading {book} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def wait(run: Run, readers: list[threading.Thread], dropped: Dropped | None) -> None:
    """Until the readers are done (a dropped book alone: until it is read, or the clock ends)."""
    limit = run.hard_end + 60 if readers else run.soft_end      # a reader gives up at hard_end: 60 s spare
    while time.monotonic() < limit and (any(r.is_alive() for r in readers) or not readers and not dropped.done):
        if dropped and not dropped.done:
            dropped.poll()
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    from gradio_client import Client

    from bench.passkey import machine

    args = parse_args(argv)
    questions = [q.strip() for q in args.questions_file.read_text().splitlines() if q.strip()] \
        if args.questions_file else list(QUESTIONS)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    data = (args.data_dir or work / "data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model
    app_args = [*(["--model", model] if model else []), *(["--dtype", args.dtype] if args.dtype else [])]
    started = time.monotonic()
    book = ingest(args.book, data, app_args) if args.book else None
    if book:
        print(f"{args.book}: {book['status']}, {book['tokens']:,} tokens, in {time.monotonic() - started:.0f} s",
              file=sys.stderr, flush=True)
    doc = book["id"] if book else ready_document(data)
    if args.readers and doc is None:
        raise SystemExit("the readers need a document: give --book FILE, or a --data-dir with a ready one")
    log, interrupted = work / "server.log", False
    with Server(data, log, app_args) as server:
        started = time.monotonic()
        server.wait_ready(args.start_timeout)
        client_args = dict(src=server.url, verbose=False, download_files=False, analytics_enabled=False)
        clients = [Client(**client_args) for _ in range(max(args.readers, 1))]   # made before the clock starts
        knobs, upload_api, upload_knobs = page_api(clients[0])
        knobs[-1] = args.max_new_tokens or knobs[-1]
        dropped = Dropped(args.drop.resolve(), data) if args.drop else None
        before = library_size(data)
        t0 = time.monotonic()
        run = Run(doc, knobs, questions, args.per_conversation, t0, t0 + args.seconds, t0 + args.seconds + args.grace,
                  args.max_answers, threading.Event(), [], threading.Lock())
        samples, sampled = [memory_sample(server.proc.pid, t0)], threading.Event()
        threading.Thread(target=sample_every, args=(server.proc.pid, t0, args.sample_every, samples, sampled),
                         daemon=True).start()
        print(f"server {server.url} (pid {server.proc.pid}) up after {time.monotonic() - started:.0f} s; "
              f"{args.readers} readers for {args.seconds:.0f} s", file=sys.stderr, flush=True)
        if dropped:
            dropped.upload(clients[0], upload_api, upload_knobs)
        readers = [threading.Thread(target=read, args=(run, i, clients[i]), daemon=True) for i in range(args.readers)]
        for reader in readers:
            reader.start()
        try:
            wait(run, readers, dropped)
        except KeyboardInterrupt:       # what was measured so far is still reported
            interrupted = True
            run.stop.set()
            for reader in readers:
                reader.join(10)
        duration = time.monotonic() - t0
        if dropped:
            dropped.poll()
        sampled.set()
        samples.append(memory_sample(server.proc.pid, t0))
        after, stored = library_size(data), stored_answers(data, before["last_message"])
    tracebacks = log.read_text(errors="replace").count("Traceback")
    with run.lock:
        answers = sorted(run.answers, key=lambda a: a.at_s)
    result = {"command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "date": date.today().isoformat(), "interrupted": interrupted,
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "book": book, "questions": questions, "asked_with": knobs,
              "summary": summary(answers, samples, duration, before, after, stored,
                                 dropped.new_files() if dropped else 0, tracebacks),
              "rss_mib": samples, "drop": dropped.report() if dropped else None,
              "library": {"before": before, "after": after, "stored": stored},
              "server_log_tail": tail(log, 60) if tracebacks else "", "answers": [asdict(a) for a in answers]}
    if args.json_path:
        args.json_path.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(table_row(result))
    if tracebacks or result["summary"]["errors"] or interrupted:
        print(f"kept for a look: {work} (the server's log: {log})", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
