"""How the page writes things: counts, sizes, durations, the reading queue, and text shown in Markdown as
itself. Pure functions; the handlers (ui/handlers.py) put them into components."""
from __future__ import annotations

import html
import re

from reading.citations import short_title
from reading.worker import Job, JobState


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


def duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"


def queued(job: Job) -> str:
    """A dropped file's note (Markdown)."""
    return f"• {markdown_text(job.name)}: queued for reading ({job.engine.cfg.method})"


def progress_html(jobs: list[Job], answering: bool) -> str:
    """Progress bars of the reading queue, then the outcome of recent jobs. answering: the model thread is
    answering a question now (reading waits for it)."""
    parts = []
    for job in jobs[-8:]:
        name = f"<div class='job-name'>{html.escape(job.name)}</div>"
        if job.state == JobState.READING and job.total:
            eta = f"ETA {duration(job.eta_s)}" if job.eta_s is not None else "starting…"
            paused = " · paused while answering" if answering else ""
            parts.append(f"<div class='job'>{name}<progress value='{job.done}' max='{job.total}'></progress>"
                         f"<div class='job-stats'>{job.done:,} / {job.total:,} tokens · {job.rate:,.0f} tok/s · "
                         f"{eta}{paused}</div></div>")
        elif job.state in (JobState.QUEUED, JobState.READING):
            waiting = "waiting in the queue" if job.state == JobState.QUEUED else "extracting text…"
            parts.append(f"<div class='job'>{name}<div class='job-stats'>{waiting}</div></div>")
        else:
            mark = "✓" if job.state == JobState.READY else "✗"
            parts.append(f"<div class='job {job.state}'>{mark} {html.escape(job.name)}: {html.escape(job.message)}</div>")
    return "".join(parts)


def quote_markdown(quote: dict, titled: bool = False) -> str:
    """The quote as the chat shows it above the answer: the document's words, verbatim, and their page;
    titled (asked across documents): after the document's title, "— lshort, p. 58"."""
    where = f"{short_title(quote['title'])}, {quote['page']}" if titled else quote["page"]
    return f"> “{markdown_text(quote['text'])}”  \n> — {markdown_text(where)}\n\n"


def chat(messages: list[dict], titled: bool = False) -> list[dict]:
    """Saved messages as the chat shows them: each answer's quote above it."""
    return [{"role": m["role"], "content": (quote_markdown(m["quote"], titled) if m.get("quote") else "")
             + prose_markdown(m["content"])} for m in messages]


def prose_markdown(text: str) -> str:
    """A question or an answer as the chat shows it: the model's prose keeps its Markdown (a list, a code
    span), but what the chat would take as HTML or eat as an escape ("<draft>", "&amp;", "\\{") shows as typed."""
    return re.sub(r"([\\<>&])", r"\\\1", text)


def markdown_text(text: str) -> str:
    """Text shown as itself in Markdown: a book about LaTeX is full of backslashes, braces and dollars."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|$~])", r"\\\1", text)
