"""How a question across the library grows with the library: first words and peak memory at 1, 5 and 20 documents.

    python -m bench.library_scale --source bench/out/questions-library --sizes 1 5 20 \
        --json bench/results/library-scale-cpu.json

The library at --source holds real books already read. A library of N documents is made from them
under --work: the books themselves, then copies (their rows copied, their memory files hard-linked:
on disk and to the page cache they are the same as N different books of those lengths; word matches
tie between copies). Each size is asked every --question through `app.py ask all --json` in its own
process, with the page cache warm (one untimed ask first). Reported: the first token as a running app
sees it (the memories loaded, every probe, the prefill: the app's own timings), the whole process's
wall time (the model's load too), and its peak RSS (its whole life: the model too) from wait4.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench.passkey import machine

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("How do I make text bold?", "What does the \\\\hfill command do?")
COPIED = ("pages", "blocks", "texts", "span_words")          # every table keyed by document_id, but conversations


def build(source: Path, work: Path, n: int) -> dict:
    """A library of n documents under work: source's ready documents, then copies of them."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "memory").mkdir(parents=True)
    shutil.copy(source / "library.db", work / "library.db")
    os.symlink((source / "models").resolve(), work / "models")
    db = sqlite3.connect(work / "library.db")
    own = [r[0] for r in db.execute("SELECT id FROM documents WHERE status = 'ready' ORDER BY id")]
    for doc in own[n:]:
        db.execute("DELETE FROM documents WHERE id = ?", [doc])
        db.execute("DELETE FROM span_words WHERE document_id = ?", [doc])
    origin = {d: d for d in own[:n]}
    cols = [c[1] for c in db.execute("PRAGMA table_info(documents)") if c[1] != "id"]
    for i in range(n - len(origin)):
        src = own[i % len(own)]
        picked = ", ".join(f"title || ' (copy {i + 1})'" if c == "title" else f"sha256 || '-{i + 1}'" if c == "sha256"
                           else c for c in cols)
        new = db.execute(f"INSERT INTO documents ({', '.join(cols)}) SELECT {picked} FROM documents WHERE id = ?",
                         [src]).lastrowid
        for table in COPIED:
            tcols = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
            picked = ", ".join("?" if c == "document_id" else c for c in tcols)
            db.execute(f"INSERT INTO {table} ({', '.join(tcols)}) SELECT {picked} FROM {table} WHERE document_id = ?",
                       [new, src])
        origin[new] = src
    db.commit()
    for doc, src in origin.items():
        folder = work / "memory" / str(doc)
        folder.mkdir()
        for f in (source / "memory" / str(src)).iterdir():
            os.link(f, folder / f.name)
    tokens = sum(r[0] for r in db.execute("SELECT tokens FROM documents"))
    return {"documents": len(origin), "tokens": tokens}


def ask(work: Path, question: str) -> dict:
    """One `app.py ask all` in its own process: wall time to its first output, its timings, its peak RSS."""
    cmd = [sys.executable, "app.py", "--data-dir", str(work), "ask", "all", question, "--max-tokens", "16", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed")
    asked = json.loads(out.strip().splitlines()[-1])
    t = asked["timings"]
    # In a running app the model is loaded: the question waits for the memories, the probes and the prefill.
    first = t["memory_load_s"] + t.get("focus_s", 0.0) + t.get("first_token_s", 0.0)
    return {"first_token_s": round(first, 2), "timings": t, "process_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "citation": asked["citation"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("bench/out/questions-library"))
    parser.add_argument("--work", type=Path, default=Path("bench/out/library-scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        built = build(args.source, args.work, n)
        ask(args.work, QUESTIONS[0])                      # warm the page cache and the model's files
        for q in QUESTIONS:
            row = {**built, "question": q, **ask(args.work, q)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"machine": machine(), "date": date.today().isoformat(), "rows": rows,
              "command": "python -m bench.library_scale " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    print("| documents | tokens | first token s | of it: memories loaded s | probes s | process s | peak RSS MiB |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["timings"]
        print(f"| {r['documents']} | {r['tokens']:,} | {r['first_token_s']} | {t['memory_load_s']:.2f} | "
              f"{t.get('focus_s', 0):.2f} | {r['process_s']} | {r['peak_rss_mib']:,} |")
    return result


if __name__ == "__main__":
    main()
