"""InfLLM reading assistant: the command line.

    python app.py ingest FILE... [--json]      read documents into the library (resumes if interrupted)
    python app.py list [--json]                the library
    python app.py ask DOC "question" [--json]  stream an answer; DOC is an id, a title, "all", or ids as 1,3
    python app.py delete DOC
    python app.py [serve] [--host H] [--port P] [--auth USER:PASSWORD]   the browser app (the default)
Global options (before or after the subcommand): --data-dir DIR, --model DIR, --method, --topk, --n-local.
--method and --n-local choose how documents are read; a question uses the mode and window its document
was read with, and --topk.
Exit status 0 on success, 2 on any error, with the message on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from infllm_engine import Engine, InfLLMConfig
from infllm_engine.config import DTYPES, METHODS
from infllm_engine.encoder import Encoder, EncoderError
from infllm_engine.loading import default_data_dir
from infllm_engine.precision import on_own_thread
from reading.asked import parse
from reading.citations import short_title
from reading.ingest import Outcome
from reading.service import ANSWER_TOKENS, USER_ERRORS, Answered, ReadingService
from reading.worker import Queued
from storage.library import Library
from documents import MAX_BYTES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the subcommand must not be reset by the subparser's default.
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=f"default: {default_data_dir()}")
    common.add_argument("--model", default=argparse.SUPPRESS, help="HF Llama/Mistral/Qwen2/Qwen3 directory")
    common.add_argument("--method", choices=METHODS, default=argparse.SUPPRESS)
    common.add_argument("--topk", type=int, default=argparse.SUPPRESS)
    common.add_argument("--n-local", type=int, default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--device", default=argparse.SUPPRESS, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    common.add_argument("--dtype", choices=("auto", *DTYPES), default=argparse.SUPPRESS,
                        help="compute precision (default auto: bf16 on CUDA, and on a CPU where it measures faster; "
                             "mixed: read in bf16, answer in fp32, where one-row products are faster in fp32)")
    common.add_argument("--full-traces", action="store_true", default=argparse.SUPPRESS,
                        help="store every step's retrieval with each answer (debugging: ~340 KB an answer, not ~6)")
    web = argparse.ArgumentParser(add_help=False)
    web.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=argparse.SUPPRESS, help="default 7860")
    web.add_argument("--auth", default=argparse.SUPPRESS,
                     help="USER:PASSWORD required to open the page (or set INFLLM_READER_AUTH)")
    web.add_argument("--max-upload-mb", type=int, default=argparse.SUPPRESS, help=f"default {MAX_BYTES // 2**20}")
    parser = argparse.ArgumentParser(prog="app.py", description="InfLLM reading assistant", parents=[common, web])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", parents=[common, web], help="the browser app (the default)")
    sub.add_parser("ingest", parents=[common], help="read documents into the library").add_argument("files", nargs="+", type=Path)
    sub.add_parser("list", parents=[common], help="list the library")
    ask = sub.add_parser("ask", parents=[common], help="ask a question about a document")
    ask.add_argument("doc")
    ask.add_argument("question")
    ask.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=ANSWER_TOKENS,
                     help=f"the longest answer, in tokens (default {ANSWER_TOKENS}: the quote comes first)")
    sub.add_parser("delete", parents=[common], help="delete a document and its memory").add_argument("doc")
    args = parser.parse_args(argv)
    defaults = {"data_dir": default_data_dir(), "model": None, "method": "infllm", "topk": InfLLMConfig().topk,
                "n_local": InfLLMConfig().n_local, "json": False, "command": None, "host": "127.0.0.1",
                "port": 7860, "auth": os.environ.get("INFLLM_READER_AUTH"), "max_upload_mb": MAX_BYTES // 2**20,
                "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "auto",
                "full_traces": False}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.command = args.command or "serve"
    # Bad flags are usage errors: argparse prints the usage line and exits with status 2.
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth takes USER:PASSWORD (or set INFLLM_READER_AUTH)")
        args.auth = (user, password)
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no such device (it has: cpu"
                     f"{', cuda' if torch.cuda.is_available() else ''})")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    if getattr(args, "max_tokens", 1) < 1:
        parser.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_upload_mb < 1:
        parser.error(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    return args


def make_service(args: argparse.Namespace, library: Library, resume: bool = False) -> ReadingService:
    """The model (loaded once, a few seconds) and the service around it; --method and --n-local apply to
    reading. resume: queue the documents whose reading stopped with the app (the browser app does)."""
    cfg = InfLLMConfig(method=args.method, topk=args.topk, n_local=args.n_local, device=args.device, dtype=args.dtype)
    engine = Engine.load(args.model, cfg, args.data_dir)
    make = ReadingService.start if resume else ReadingService
    return make(engine, library, args.max_upload_mb * 2**20, args.full_traces, upgrading, sentence_encoder())


def sentence_encoder() -> Encoder | None:
    """The embedded sentence encoder, checked against its pins; None, said in one line, where it is missing or
    not the published file (questions then go by attention and words alone)."""
    try:
        return on_own_thread(Encoder.load)
    except EncoderError as err:
        print(f"note: {err}", file=sys.stderr)
        return None


def upgrading(done: int, total: int) -> None:
    """An old library's documents brought to today's formats, once (reading.upgrade)."""
    print(f"\rupgrading the library to this version's formats: {done}/{total} documents", end="\n" if done == total
          else "", file=sys.stderr, flush=True)


def progress_bar(name: str):
    started = time.perf_counter()

    def show(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        eta = (total - done) / rate if rate else 0
        width = 30
        bar = "#" * int(width * done / total) + "-" * (width - int(width * done / total))
        print(f"\r{name[:30]:30} [{bar}] {done:,}/{total:,} tok  {rate:,.0f} tok/s  ETA {eta:,.0f} s",
              end="", file=sys.stderr, flush=True)
    return show


def cmd_ingest(args, library: Library) -> int:
    service, failed = make_service(args, library), 0
    for path in args.files:
        try:
            done = service.read_now(path, None if args.json else progress_bar(path.name))
            if args.json:
                print(json.dumps({"file": str(path), "id": done.doc_id, "title": done.title, "status": done.outcome,
                                  "tokens": done.tokens, "seconds": round(done.seconds, 2),
                                  "resumed_from": done.resumed_from}), flush=True)
            else:
                shown = "\n" if done.outcome == Outcome.READ else ""      # after the progress bar's line
                print(f"{shown}{done.doc_id}\t{done.title}\t{done.outcome}\t{done.tokens:,} tokens", flush=True)
        except USER_ERRORS as err:
            failed += 1
            if args.json:
                print(json.dumps({"file": str(path), "id": None, "status": "error", "error": str(err)}), flush=True)
            print(f"{'' if args.json else chr(10)}error: {err}", file=sys.stderr)    # the message names the file
    return 2 if failed else 0


def cmd_list(args, library: Library) -> int:
    rows = [{k: d[k] for k in ("id", "title", "status", "pages", "tokens", "bytes")} for d in library.documents()]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'id':>4}  {'status':8} {'pages':>5} {'tokens':>10} {'disk':>10}  title")
    for r in rows:
        print(f"{r['id']:>4}  {r['status']:8} {r['pages']:>5} {r['tokens']:>10,} {r['bytes'] / 2**20:>8.1f}MB  {r['title']}")
    return 0


def cmd_ask(args, library: Library) -> int:
    asked = parse(args.doc, library)        # a wrong name fails before the model loads
    service = make_service(args, library)
    answered = None         # --topk is the engine's; the mode and window are the document's own
    for piece in service.ask(asked, args.question, max_new_tokens=args.max_tokens):
        if isinstance(piece, Answered):
            answered = piece
        elif isinstance(piece, Queued):         # this process's model thread is its own: not in practice
            print(piece, file=sys.stderr, flush=True)
        elif args.json:
            continue
        elif isinstance(piece, dict):           # the quote comes first: the document's own words
            where = piece["page"] if asked.one else f"{short_title(piece['title'])}, {piece['page']}"
            print(f"“{piece['text']}” ({where})\n", flush=True)
        else:
            print(piece, end="", flush=True)
    timings = {k: round(v, 3) for k, v in answered.timings.items()}
    evidence = [{"block": p["block"], "tokens": p["tokens"], "pages": p["pages"], "in_memory": p["in_memory"],
                 p["by"]: round(p["weight"], 4), "document": p["document"]} for p in answered.evidence]
    if args.json:
        documents = list(asked.ids) if asked.ids is not None else "all"
        print(json.dumps({"document": asked.scope if asked.one else answered.quote["document"]
                          if answered.quote else None, "documents": documents, "answer": answered.text,
                          "quote": answered.quote, "citation": answered.citation, "timings": timings,
                          "evidence": evidence}))
    else:
        print(f" {answered.citation}" if answered.citation else "")
        if answered.note:
            print(answered.note)
        where = ", ".join(e["pages"] for e in evidence)
        print(f"[memory {timings['memory_load_s']:.1f} s, question's probe {timings.get('focus_s', 0):.1f} s, "
              f"quote {timings.get('quote_s', 0):.1f} s, "
              f"first token {timings.get('first_token_s', 0):.1f} s after it, "
              f"{timings.get('decode_tokens_per_s', 0):.1f} tok/s; evidence: {where or 'none'}]", file=sys.stderr)
    return 0


def cmd_delete(args, library: Library) -> int:
    doc = library.document(args.doc)
    library.delete(doc["id"])
    print(f"deleted {doc['id']}\t{doc['title']}")
    return 0


def cmd_serve(args, library: Library) -> int:
    from ui.layout import CSS, build
    from ui.handlers import Settings

    if args.host not in ("127.0.0.1", "localhost", "::1") and args.auth is None:
        print(f"warning: serving on {args.host} without --auth: anyone who reaches this address can use the app",
              file=sys.stderr)
    service = make_service(args, library, resume=True)
    demo = build(service, Settings(args.method, args.topk, args.n_local))
    demo.queue(default_concurrency_limit=1)
    import gradio as gr
    demo.launch(server_name=args.host, server_port=args.port, auth=args.auth, max_file_size=f"{args.max_upload_mb}mb",
                theme=gr.themes.Soft(primary_hue="indigo", neutral_hue="slate"), css=CSS, footer_links=[],
                show_error=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        library = Library(args.data_dir)
        commands = {"ingest": cmd_ingest, "list": cmd_list, "ask": cmd_ask, "delete": cmd_delete, "serve": cmd_serve}
        return commands[args.command](args, library)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: what was read so far is saved; run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
