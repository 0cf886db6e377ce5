"""Where the time goes: torch.profiler's operator table for one prefill chunk and for decode steps.

    python -m bench.profile [--length 8192] [--decode 16] [--dtype float32] [--rows 15] [--blocks-on auto] [--kernels auto]

First times the two matmul shapes that matter in fp32 and bf16 (whether bf16 pays on this CPU
depends on AMX), and each pass of the attention twin's softmax over one tile in both. Then reads the passkey filler (bench.passkey) into an in-memory context with
`Engine.read`, and profiles the next 512-token chunk and `--decode` greedy steps after it. The
output is the reproducible source of the "what dominates" figures in bench/results/throughput-cpu.md.
Last, it counts the host reads (bench.syncs: what would stall a GPU's stream) and the operators
dispatched in one more chunk, in the decode steps and in an answer's decode through `Engine.ask` (the
app's path: the question focus, its blocks read alone, every step traced), by the line that made them.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.passkey import build_prompt
from bench.syncs import HostReads
from infllm_engine import Engine, InfLLMConfig, Trace
from infllm_engine.evidence import choose
from infllm_engine.generate import Call, decode, prefill


def _profiled(label: str, run, n: int, unit: str, rows: int) -> None:
    """Profile run() (which does n units of work) and print the operator table."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        run()
        seconds = time.perf_counter() - t
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"\n## {label}: {seconds * 1e3 / n:.1f} ms per {unit} under the profiler, "
          f"{calls / n:,.0f} aten calls per {unit} (nested ones included: the proxy for kernel launches on a GPU)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


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


def tile_passes(device: str) -> None:
    """Each pass of the CPU twin's softmax over one 64-query tile (9 heads, 2,600 keys), per dtype:
    which of them bf16 makes faster (the GEMMs) and which it does not (the elementwise passes)."""
    print("## one attention tile, pass by pass (best of 20, ms)")
    for dtype in (torch.float32, torch.bfloat16):
        q, k = torch.randn(3, 192, 64, dtype=dtype, device=device), torch.randn(3, 2600, 64, dtype=dtype, device=device)
        s = torch.matmul(q, k.transpose(1, 2))
        f = s.float()
        m = f.amax(-1, keepdim=True)
        e = (f - m).exp()
        inv = 1 / e.sum(-1)
        passes = {
            "Q K^T": lambda: torch.matmul(q, k.transpose(1, 2)),
            "scores to fp32": lambda: s.float(),
            "max": lambda: f.amax(-1),
            "copy": lambda: f.clone(),
            "copy + sub + exp": lambda: f.clone().sub_(m).exp_(),
            "copy + exp in dtype": lambda: s.clone().exp_(),
            "probs to dtype": lambda: e.to(dtype),
            "P V": lambda: torch.matmul(e.to(dtype), k),
            "row sums": lambda: e.sum(-1),
            "masses": lambda: torch.matmul(inv.view(-1, 1, 64), e.view(-1, 64, 2600)),
        }
        print(f"{str(dtype):15} " + "; ".join(f"{name} {_best_ms(fn):.3f}" for name, fn in passes.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="tokens read before profiling")
    parser.add_argument("--decode", type=int, default=16, help="decode steps profiled")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--blocks-on", default="auto", choices=("auto", "host", "device"),
                        help="where block K/V live (InfLLMConfig.blocks_on)")
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"))
    args = parser.parse_args(argv)
    if args.kernels == "triton" and not args.device.startswith("cuda"):
        # Triton's CPU interpreter runs one program instance at a time: one 512-token chunk of the full
        # model ran over 20 minutes, and 5 decode steps over 10, before they were stopped.
        parser.error("--kernels triton needs --device cuda: the CPU interpreter is far too slow for the full model")

    matmul_speed(args.device)
    tile_passes(args.device)
    cfg = InfLLMConfig(device=args.device, dtype=args.dtype, max_tokens=max(4 * args.length, 4096),
                       blocks_on=args.blocks_on, kernels=args.kernels)
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

    for label, run, n in (("prefill chunk", read_chunk, 1), (f"decode, {args.decode} steps", answer, args.decode)):
        with HostReads(ops=True) as reads:
            run()
        _operators(label, reads, n, "chunk" if n == 1 else "token", cfg, args.rows)

    # An answer's decode as Engine.ask runs it: the question's evidence read alone, every step traced.
    ids, span = engine.question_ids("What is the pass key?")
    probe = engine.probe(memory, ids, span)
    evidence = choose([memory], [probe.attention()], [], cfg.focus_blocks, cfg.signal_weights, cfg.focus_alone,
                      cfg.focus_gap)
    fork, call = memory.fork(), Call(cfg, Trace(), evidence=evidence)
    logits = prefill(engine.model, fork, engine.rope, ids, call)
    with HostReads(ops=True) as reads:
        for _ in decode(engine.model, fork, engine.rope, logits, args.decode + 1, set(), call,
                        no_repeat_ngram=cfg.no_repeat_ngram):
            pass
    _operators("an answer's decode (as Engine.ask)", reads, args.decode, "token", cfg, args.rows)


def _operators(label: str, reads: HostReads, n: int, unit: str, cfg: InfLLMConfig, rows: int) -> None:
    print(f"\n## {label}, blocks on the {'device' if cfg.resident_blocks else 'host'}, {cfg.kernels} kernels: "
          f"{sum(reads.ops.values()) / n:,.0f} operators dispatched per {unit} (not nested: a GPU's launches, "
          f"Triton's aside), {sum(reads.seen.values()) / n:,.1f} host reads per {unit}")
    for where, count in reads.seen.most_common():
        print(f"{count / n:10,.1f}  host reads at {where}")
    for where, count in reads.ops.most_common(rows):
        print(f"{count / n:10,.1f}  operators at {where}")


if __name__ == "__main__":
    main()
