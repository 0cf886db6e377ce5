"""InfLLM reading assistant: the command line.

    python app.py ingest FILE... [--json]      read documents into the library (resumes if interrupted)
    python app.py list [--json]                the library
    python app.py ask DOC "question" [--json]  stream an answer; DOC is an id or a title
    python app.py delete DOC
    python app.py [serve] [--host H] [--port P] [--auth USER:PASSWORD]   the browser app (the default)
Global options (before or after the subcommand): --data-dir DIR, --model DIR, --method, --topk, --n-local.
Exit status 0 on success, 2 on any error, with the message on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from infllm_engine import Engine, EngineError, InfLLMConfig
from infllm_engine.loading import default_data_dir
from storage.ingest import ingest, load_memory
from storage.library import Library, LibraryError
from storage.readers import DocumentError
from ui.inspect import citation, passages

USER_ERRORS = (EngineError, LibraryError, DocumentError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the subcommand must not be reset by the subparser's default.
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=f"default: {default_data_dir()}")
    common.add_argument("--model", default=argparse.SUPPRESS, help="HF Llama/Mistral/Qwen2/Qwen3 directory")
    common.add_argument("--method", choices=["infllm", "streaming", "full"], default=argparse.SUPPRESS)
    common.add_argument("--topk", type=int, default=argparse.SUPPRESS)
    common.add_argument("--n-local", type=int, default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    web = argparse.ArgumentParser(add_help=False)
    web.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=argparse.SUPPRESS, help="default 7860")
    web.add_argument("--auth", default=argparse.SUPPRESS,
                     help="USER:PASSWORD required to open the page (or set INFLLM_READER_AUTH)")
    web.add_argument("--max-upload-mb", type=int, default=argparse.SUPPRESS, help="default 200")
    parser = argparse.ArgumentParser(prog="app.py", description="InfLLM reading assistant", parents=[common, web])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", parents=[common, web], help="the browser app (the default)")
    sub.add_parser("ingest", parents=[common], help="read documents into the library").add_argument("files", nargs="+", type=Path)
    sub.add_parser("list", parents=[common], help="list the library")
    ask = sub.add_parser("ask", parents=[common], help="ask a question about a document")
    ask.add_argument("doc")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=200)
    sub.add_parser("delete", parents=[common], help="delete a document and its memory").add_argument("doc")
    args = parser.parse_args(argv)
    defaults = {"data_dir": default_data_dir(), "model": None, "method": "infllm", "topk": InfLLMConfig().topk,
                "n_local": InfLLMConfig().n_local, "json": False, "command": None, "host": "127.0.0.1",
                "port": 7860, "auth": os.environ.get("INFLLM_READER_AUTH"), "max_upload_mb": 200}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.command = args.command or "serve"
    return args


def make_engine(args: argparse.Namespace) -> Engine:
    cfg = InfLLMConfig(method=args.method, topk=args.topk, n_local=args.n_local)
    return Engine.load(args.model, cfg, args.data_dir)


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
    engine, failed = make_engine(args), 0
    for path in args.files:
        try:
            done = ingest(library, engine, path, None if args.json else progress_bar(path.name))
            if args.json:
                print(json.dumps({"file": str(path), "id": done.doc_id, "title": done.title, "status": done.status,
                                  "tokens": done.tokens, "seconds": round(done.seconds, 2),
                                  "resumed_from": done.resumed_from}), flush=True)
            else:
                print(f"\n{done.doc_id}\t{done.title}\t{done.status}\t{done.tokens:,} tokens", flush=True)
        except USER_ERRORS as err:
            failed += 1
            if args.json:
                print(json.dumps({"file": str(path), "id": None, "status": "error", "error": str(err)}), flush=True)
            print(f"error: {path.name}: {err}", file=sys.stderr)
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
    doc = library.document(args.doc)
    engine = make_engine(args)
    t0 = time.perf_counter()
    memory = load_memory(library, engine, doc["id"])
    load_s = time.perf_counter() - t0
    answer = engine.ask(memory, args.question, max_new_tokens=args.max_new_tokens)
    for piece in answer:
        if not args.json:
            print(piece, end="", flush=True)
    trace = answer.trace.to_dict()
    spans, pages = library.spans(doc["id"]), library.pages(doc["id"])
    cited = citation(trace, spans, pages)
    text = f"{answer.text.rstrip()} {cited}" if cited else answer.text
    evidence = [{"block": p["block"], "tokens": [spans[p["block"]]["start_token"], spans[p["block"]]["end_token"]],
                 "pages": p["pages"], "in_memory": p["in_memory"], p["by"]: round(p["weight"], 4)}
                for p in passages(trace, spans, pages)]
    conversation = library.new_conversation(doc["id"], args.question)
    library.add_message(conversation, "user", args.question)
    timings = {"memory_load_s": round(load_s, 3), **{k: round(v, 3) for k, v in answer.timings.items()}}
    library.add_message(conversation, "assistant", text, engine.cfg.method, trace, timings)
    if args.json:
        print(json.dumps({"document": doc["id"], "answer": text, "citation": cited, "timings": timings,
                          "evidence": evidence}))
    else:
        print(f" {cited}" if cited else "")
        where = ", ".join(e["pages"] for e in evidence)
        print(f"[memory {load_s:.1f} s, first token {answer.timings.get('first_token_s', 0):.1f} s, "
              f"{answer.timings.get('decode_tokens_per_s', 0):.1f} tok/s; evidence: {where or 'none'}]",
              file=sys.stderr)
    return 0


def cmd_delete(args, library: Library) -> int:
    doc = library.document(args.doc)
    library.delete(doc["id"])
    print(f"deleted {doc['id']}\t{doc['title']}")
    return 0


def cmd_serve(args, library: Library) -> int:
    from ui.handlers import App, Settings
    from ui.layout import CSS, build

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise LibraryError("--auth takes USER:PASSWORD")
        auth = (user, password)
    if not 1 <= args.port <= 65535:
        raise LibraryError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb < 1:
        raise LibraryError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"warning: serving on {args.host} without --auth: anyone who reaches this address can use the app",
              file=sys.stderr)
    engine = make_engine(args)
    app = App.start(engine, library, args.max_upload_mb * 2**20)
    demo = build(app, Settings(args.method, args.topk, args.n_local))
    demo.queue(default_concurrency_limit=1)
    import gradio as gr
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, max_file_size=f"{args.max_upload_mb}mb",
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
