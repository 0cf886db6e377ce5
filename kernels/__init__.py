"""Attention and retrieval kernels. Tensors in, tensors out: no models, no files.

Each op has a torch twin (the CPU path and the test oracle); Triton launchers sit beside them.
"""
from .attention import Stage, attention_stage, mask_bias, merge_stages, received_mass
from .chunk import BACKENDS, ChunkOut, Keys, chunk_attention
from .retrieval import score_blocks, span_mass, top_blocks, topk_blocks

__all__ = ["BACKENDS", "ChunkOut", "Keys", "chunk_attention", "Stage", "mask_bias", "attention_stage", "merge_stages", "received_mass", "score_blocks", "span_mass", "top_blocks", "topk_blocks"]
