"""Estimated window masses against exact ones: reading speed, and the representatives they choose.

    python -m bench.masses [--tokens 8192] [--book lshort.pdf]

Reads the first --tokens tokens of a real book (from its 11th page, past the title pages) twice with
Engine.read, in one process so both runs see the same machine: once with the tiled twin's exact
masses (kernels.chunk, exact_mass=True), once as reading runs (kernels.fused). Then reads it once more
computing both kinds of masses for every chunk, and compares the representatives each would choose:
per layer, the share of each block's top repr_topk tokens (per head) that the estimate also puts in
its top repr_topk. The figures are in bench/results/throughput-cpu.md ("Estimated masses").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import infllm_engine.attention as attention
from bench.needle import DEFAULT_BOOK
from bench.passkey import machine
from infllm_engine import Engine, InfLLMConfig
from kernels import chunk as kchunk
from kernels.fused import chunk_attention_fused
from documents import read_document


def _timed_read(engine: Engine, ids: torch.Tensor, exact: bool) -> float:
    def call(*args, **kwargs):
        return chunk(*args, **{**kwargs, "exact_mass": exact or kwargs.get("exact_mass", True)})
    chunk = attention.chunk_attention
    attention.chunk_attention = call
    try:
        t = time.perf_counter()
        engine.read(ids)
        return time.perf_counter() - t
    finally:
        attention.chunk_attention = chunk


def _both_masses(engine: Engine, ids: torch.Tensor) -> tuple[dict, dict]:
    """Per layer, [H, positions] window masses summed over the read: exact, and estimated."""
    sums = ({}, {})
    calls = [0]
    n_layers = engine.n_layers

    def call(q_local, q_global, start, window, memory, n_local, scale, window_mass=False, memory_mass=False,
             backend="auto", exact_mass=True):
        res = kchunk.chunk_attention_torch(q_local, q_global, start, window, memory, n_local, scale, window_mass,
                                           memory_mass)
        if window_mass and q_local.shape[2] >= 64:
            layer = calls[0] % n_layers
            calls[0] += 1
            _, estimate = chunk_attention_fused(q_local, q_global, start, window, memory, n_local, scale, True)
            for store, mass in zip(sums, (res.window_mass, estimate)):
                mass = mass.reshape(-1, mass.shape[-1])
                t = store.setdefault(layer, torch.zeros(mass.shape[0], ids.numel()))
                t[:, window.start: window.start + mass.shape[1]] += mass
        return res

    chunk = attention.chunk_attention
    attention.chunk_attention = call
    try:
        engine.read(ids)
    finally:
        attention.chunk_attention = chunk
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--book", type=Path, default=DEFAULT_BOOK)
    args = parser.parse_args()
    cfg = InfLLMConfig()
    engine = Engine.load(None, cfg)
    book = read_document(args.book)
    ids = engine.encode(book.text[book.pages[min(10, len(book.pages) - 1)].start:])[: args.tokens]
    print(f"{machine()}, {ids.numel():,} tokens of {args.book.name}")
    for exact in (True, False, True, False):
        s = _timed_read(engine, ids, exact)
        kind = "exact" if exact else "estimated"
        print(f"read with {kind} masses: {s:.1f} s, {ids.numel() / s:.0f} tok/s", flush=True)
    exact, estimate = _both_masses(engine, ids)
    bs, r, n_init = cfg.block_size, cfg.repr_topk, cfg.n_init
    n_blocks = (ids.numel() - n_init - cfg.n_local) // bs          # blocks formed: out of every window
    kept = []
    for layer in sorted(exact):
        a, b = (x[layer][:, n_init: n_init + n_blocks * bs].view(-1, n_blocks, bs).topk(r, -1).indices
                for x in (exact, estimate))
        kept.append((a[..., :, None] == b[..., None, :]).any(-1).float().mean().item())
    print(f"representatives kept over {n_blocks} blocks: mean {sum(kept) / len(kept):.1%}, "
          f"lowest layer {min(kept):.1%}")
    print("per layer: " + " ".join(f"{x:.2f}" for x in kept))


if __name__ == "__main__":
    main()
