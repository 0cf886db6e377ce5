"""Attention and retrieval kernels. Tensors in, tensors out: no models, no files.

Each op has a torch twin (the CPU path and the test oracle); Triton launchers sit beside them. The
package exports what the engine calls; the stages and launchers are reached through their modules.
"""
from .chunk import BACKENDS, ChunkOut, Keys, backend_for, chunk_attention
from .retrieval import SpanMass, key_shares, score_blocks, span_mass, top_blocks

__all__ = ["BACKENDS", "ChunkOut", "Keys", "SpanMass", "backend_for", "chunk_attention", "key_shares", "score_blocks",
           "span_mass", "top_blocks"]
