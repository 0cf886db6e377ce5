"""InfLLM reading assistant, command line.

    python app.py ask FILE "question" [--method infllm|streaming|full] [--model DIR] [--topk K]

Reads a text file into an InfLLM context memory with the embedded SmolLM2-135M-Instruct (or the
model given), streams the answer, then shows which memory blocks each layer retrieved.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from infllm_engine import Engine, EngineError, InfLLMConfig
from infllm_engine.loading import default_data_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="InfLLM reading assistant")
    parser.add_argument("--data-dir", type=Path, default=None, help=f"default: {default_data_dir()}")
    parser.add_argument("--model", default=None, help="HF Llama/Mistral/Qwen2/Qwen3 directory (default: embedded SmolLM2)")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="read a text file and answer a question about it")
    ask.add_argument("file", type=Path)
    ask.add_argument("question")
    ask.add_argument("--method", choices=["infllm", "streaming", "full"], default="infllm")
    ask.add_argument("--topk", type=int, default=InfLLMConfig.topk)
    ask.add_argument("--n-local", type=int, default=InfLLMConfig.n_local)
    ask.add_argument("--max-new-tokens", type=int, default=200)
    return parser.parse_args(argv)


def progress_bar(started: float):
    def show(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        eta = (total - done) / rate if rate else 0
        print(f"\rreading {done:,}/{total:,} tokens  {rate:,.0f} tok/s  ETA {eta:,.0f} s", end="", file=sys.stderr, flush=True)
    return show


def ask(args: argparse.Namespace) -> None:
    if not args.file.is_file():
        raise EngineError(f"no such file: {args.file}")
    text = args.file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EngineError(f"{args.file} is empty: there is nothing to read")
    cfg = InfLLMConfig(method=args.method, topk=args.topk, n_local=args.n_local)
    engine = Engine.load(args.model, cfg, args.data_dir)
    memory = engine.read(engine.encode(engine.document_prompt(text)), progress=progress_bar(time.perf_counter()))
    print(file=sys.stderr)
    answer = engine.ask(memory, args.question, max_new_tokens=args.max_new_tokens)
    for piece in answer:
        print(piece, end="", flush=True)
    print()
    heat = answer.trace.heat(engine.n_layers, memory.n_blocks)
    if memory.n_blocks:
        top = heat.sum(0).topk(min(5, memory.n_blocks))
        spans = [memory.block_span(int(b)) for b in top.indices]
        print("most retrieved blocks (token spans):", ", ".join(f"{a}-{b}" for a, b in spans), file=sys.stderr)
    print(f"{memory.length:,} tokens in memory, {memory.n_blocks} blocks; "
          f"{answer.timings.get('decode_tokens_per_s', 0):.1f} tok/s decode", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "ask":
            ask(args)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
