"""What a bench.soak run found: its summary, the printed report, and the row of bench/results/soak-cpu.md.

    python -m bench.soak_table bench/results/soak-cpu-drop-6.json       # the row of a run's JSON again
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

SETTLED_S = 300         # the RSS target compares the end with the server after 5 minutes of readers
INTERRUPTED = "interrupted (Ctrl-C)"    # an answer cut by the person running the bench: not counted


@dataclass(slots=True)
class Asked:
    """One question of one reader; times in seconds from its click."""

    reader: int
    turn: int                       # its place in the reader's conversation, from 0
    question: str
    at_s: float                     # when it was asked, from the clock's start
    started_s: float | None = None  # the page's first update: Gradio's own queue is passed
    first_s: float | None = None    # the first words in the answer's bubble that stay in the answer
    end_s: float | None = None
    chars: int = 0
    error: str = ""


def summary(answers: list[Asked], samples: list[dict], duration_s: float, before: dict, after: dict, stored: dict,
            dropped_bytes: int, tracebacks: int) -> dict:
    """dropped_bytes: what the book dropped during the run added to the library's files (Dropped.new_files)."""
    ok = [a for a in answers if not a.error]
    errors = [a for a in answers if a.error and a.error != INTERRUPTED]
    settled = next((s for s in samples if s["t_s"] >= SETTLED_S), None)
    # The library's growth less the dropped book's memory and kept file (its rows in SQLite stay in it); an
    # answer's share is the conversations' tables' growth where SQLite can say, which leaves the book out.
    grown = after["stored"] - before["stored"] - dropped_bytes
    answers_grew = grown if before["conversations"] is None else after["conversations"] - before["conversations"]
    times = lambda key, p: percentile([getattr(a, key) for a in ok], p)
    return {"answers": len(ok), "errors": len(errors), "tracebacks": tracebacks,
            "duration_s": round(duration_s, 1), "answers_per_min": round(len(ok) / duration_s * 60, 2),
            "page_p50_s": times("started_s", 50), "first_p50_s": times("first_s", 50),
            "first_p95_s": times("first_s", 95), "end_p50_s": times("end_s", 50), "end_p95_s": times("end_s", 95),
            "anon_start_mib": samples[0]["anon"], "anon_settled_mib": settled["anon"] if settled else None,
            "anon_end_mib": samples[-1]["anon"], "file_end_mib": samples[-1]["file"],
            "anon_end_over_settled": round(samples[-1]["anon"] / settled["anon"], 3) if settled else None,
            "peak_mib": max(s["peak"] for s in samples), "stored_answers": stored["answers"], "growth_bytes": grown,
            "bytes_per_answer": round(answers_grew / stored["answers"]) if stored["answers"] else None,
            "trace_bytes_per_answer": stored["trace_bytes"], "row_bytes_per_answer": stored["row_bytes"]}


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: a value that was measured."""
    values = sorted(values)
    return round(values[max(0, math.ceil(p / 100 * len(values)) - 1)], 2) if values else None


def rounded(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def dropped_text(drop: dict | None) -> str:
    if drop is None:
        return "-"
    if drop["ready_after_s"] is not None:
        return f"{drop['tokens']:,} tok, ready after {drop['ready_after_s']:,.0f} s"
    if drop["tokens"]:
        return f"{drop['read_tokens']:,}/{drop['tokens']:,} tok at the end ({drop['status']})"
    return f"not started at the end ({drop['note'] or 'queued'})"


def report(result: dict) -> str:
    s, errors = result["summary"], {}
    for a in result["answers"]:
        if a["error"]:
            errors[a["error"]] = errors.get(a["error"], 0) + 1
    settled = f", {s['anon_settled_mib']:,.0f} after {SETTLED_S // 60} min" if s["anon_settled_mib"] else ""
    ratio = f" (x{s['anon_end_over_settled']})" if s["anon_end_over_settled"] else ""
    per = f"{s['bytes_per_answer'] / 1024:,.1f} KB an answer" if s["bytes_per_answer"] is not None else "none stored"
    lines = [f"{result['command']}{'  (interrupted)' if result['interrupted'] else ''}",
             f"answers      {s['answers']} in {s['duration_s']:,.0f} s ({s['answers_per_min']} a minute); "
             f"{s['errors']} errors; {s['tracebacks']} tracebacks in the server's log",
             f"first words  p50 {_s(s['first_p50_s'])} s, p95 {_s(s['first_p95_s'])} s from the click "
             f"(the page's first update: p50 {_s(s['page_p50_s'])} s)",
             f"whole answer p50 {_s(s['end_p50_s'])} s, p95 {_s(s['end_p95_s'])} s",
             f"server RSS   anon {s['anon_start_mib']:,.0f} MiB at the start{settled}, {s['anon_end_mib']:,.0f} at the "
             f"end{ratio}; file-backed {s['file_end_mib']:,.0f} at the end; peak {s['peak_mib']:,.0f}",
             f"library      {s['growth_bytes'] / 1024:+,.1f} KB in all; {s['stored_answers']} answers stored: {per}; "
             f"the trace {s['trace_bytes_per_answer'] / 1024:,.1f} KB, "
             f"the rows {s['row_bytes_per_answer'] / 1024:,.1f} KB",
             f"dropped      {dropped_text(result['drop'])}",
             "", "    t_s    rss   anon   file  shmem   peak  threads  fds"]
    lines += [f"{r['t_s']:7.0f} {r['rss']:6.0f} {r['anon']:6.0f} {r['file']:6.0f} {r['shmem']:6.0f} {r['peak']:6.0f} "
              f"{r['threads']:8d} {r['fds']:4d}" for r in result["rss_mib"]]
    lines += [f"error x{n}: {e}" for e, n in sorted(errors.items(), key=lambda x: -x[1])[:5]]
    return "\n".join(lines)


TABLE_HEADER = ("| date | command | readers | s | answers | a minute | first words p50 / p95 s "
                "| whole answer p50 / p95 s | errors | tracebacks | anon RSS MiB at 5 min / end (x) | peak RSS MiB "
                "| KB an answer (trace) "
                "| dropped book |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def table_row(result: dict) -> str:
    """A row of bench/results/soak-cpu.md's table (TABLE_HEADER)."""
    s, o = result["summary"], result["options"]
    kb = lambda n: "-" if n is None else f"{n / 1024:,.1f}"
    anon = (f"{s['anon_settled_mib']:,.0f} / {s['anon_end_mib']:,.0f} ({s['anon_end_over_settled']})"
            if s["anon_settled_mib"] else f"- / {s['anon_end_mib']:,.0f}")
    return (f"| {result['date']} | `{result['command']}` | {o['readers']} | {o['seconds']:.0f} | {s['answers']} | "
            f"{s['answers_per_min']} | {_s(s['first_p50_s'])} / {_s(s['first_p95_s'])} | {_s(s['end_p50_s'])} / "
            f"{_s(s['end_p95_s'])} | "
            f"{s['errors']} | {s['tracebacks']} | {anon} | {s['peak_mib']:,.0f} | {kb(s['bytes_per_answer'])} "
            f"({kb(s['trace_bytes_per_answer'])}) | {dropped_text(result['drop'])} |")


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table_row(json.loads(open(path).read())))
