"""Where the time goes: torch.profiler's operator table for one prefill chunk and for decode steps.

    python -m bench.profile [--length 8192] [--decode 16] [--dtype float32] [--rows 15]

First times the two matmul shapes that matter in fp32 and bf16 (whether bf16 pays on this CPU
depends on AMX). Then reads the passkey filler (bench.passkey) into an in-memory context with
`Engine.read`, and profiles the next 512-token chunk and `--decode` greedy steps after it. The
output is the reproducible source of the "what dominates" figures in bench/results/throughput-cpu.md.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.passkey import build_prompt
from infllm_engine import Engine, InfLLMConfig
from infllm_engine.generate import decode, prefill


def _profiled(label: str, run, n: int, unit: str, rows: int) -> None:
    """Profile run() (which does n units of work) and print the operator table."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        run()
        seconds = time.perf_counter() - t
    print(f"\n## {label}: {seconds * 1e3 / n:.1f} ms per {unit} under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _best_ms(fn, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def matmul_speed(device: str) -> None:
    """GFLOP/s of the model's linear shape and of one attention tile's Q K^T, in fp32 and bf16."""
    print("## matmul speed (best of 20)")
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(512, 576, dtype=dtype, device=device), torch.randn(1536, 576, dtype=dtype, device=device)
        q, k = torch.randn(3, 192, 64, dtype=dtype, device=device), torch.randn(3, 3464, 64, dtype=dtype, device=device)
        linear = _best_ms(lambda: x @ w.t())
        tile = _best_ms(lambda: torch.matmul(q, k.transpose(1, 2)))
        print(f"{str(dtype):15} linear [512, 576] x [576, 1536]: {linear:.2f} ms ({2 * 512 * 576 * 1536 / linear / 1e6:.0f} GFLOP/s); "
              f"Q K^T tile [3, 192, 64] x 3,464 keys: {tile:.2f} ms ({2 * 3 * 192 * 64 * 3464 / tile / 1e6:.0f} GFLOP/s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="tokens read before profiling")
    parser.add_argument("--decode", type=int, default=16, help="decode steps profiled")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)

    matmul_speed(args.device)
    cfg = InfLLMConfig(device=args.device, dtype=args.dtype, max_tokens=max(4 * args.length, 4096))
    engine = Engine.load(args.model, cfg)
    ids = build_prompt(engine, args.length + cfg.chunk_size, 0.5, "48213").to(engine.device)
    head, chunk = ids[: args.length // cfg.chunk_size * cfg.chunk_size], ids[-cfg.chunk_size:]
    t = time.perf_counter()
    memory = engine.read(head)
    print(f"read {head.numel():,} tokens at {head.numel() / (time.perf_counter() - t):.0f} tok/s "
          f"({args.dtype}, {args.device}); {memory.n_blocks} blocks per layer")

    logits = None

    def read_chunk() -> None:
        nonlocal logits
        logits = prefill(engine.model, memory, engine.rope, chunk)
    _profiled("prefill, one 512-token chunk", read_chunk, 1, "chunk", args.rows)

    def answer() -> None:               # the engine's own decode loop: args.decode forwards after the first token
        for _ in decode(engine.model, memory, engine.rope, logits, args.decode + 1, stop_ids=set()):
            pass
    answer()                            # warm: the first steps fill the block slots
    _profiled(f"decode, {args.decode} steps", answer, args.decode, "token", args.rows)


if __name__ == "__main__":
    main()
