"""What an answer re-reads: a frozen list of token ranges of the memories asked, chosen from their probes.

A question is asked of one memory or of several at once (a document is a shelf of one). Each memory's
probe (infllm_engine.probe) gives its spans' votes. Votes compare across memories: each is the
question words' share of attention over that memory less the template's share, so a memory on which
the words' attention gathers scores high and one on which it spreads scores low. The word matches come
from one BM25 index over the whole library (storage.lexical), so their scores compare too. Both are
ranked over all the spans together and fused by reciprocal rank (fuse). Spans are numbered over the
memories asked: memory i's span j is offsets[i] + j, in the order Library.spans numbers each
document's spans (memory blocks, then the local window's block-sized pieces).

The memory with the best span is the host: its sinks start the answer, its sentence is quoted. What
it re-reads (choose):
- its best span is a memory block: its best blocks, each with the block after it (the last: the one
  before), since a sentence can straddle a block boundary (a name cut after "M." was read as
  "M.A.T.E.") and the words a question shares with a sentence come before the answer it asks for.
  Pairing with the better-scored neighbour instead picked the block before in 3 of 3 straddles that
  went wrong on bench.needle.
- its best span is in its local window: that span and the next, alone. A fact 1.4K tokens back in the
  window was then read right in 14 of 15 questions, 11 with the whole window as it is
  (bench/results/needle-cpu.md, fourth run).
- it has no memory blocks: nothing; its whole text is in its window.
Spans of other memories are never read: asked of five documents that each held a lighthouse keeper, a
135M model quoted one document's keeper and named another's when it read the best spans of all of them.

The ranges are re-read just before the question, in document order, at consecutive positions ending
`gap` before the fixed memory distance (Evidence.keys), not at the fixed distance: forced into every
layer at the fixed distance, the right block still gave wrong answers. A 135M model copies a name or a
number out of text that it reads in order and nearby.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kernels import Keys

from .memory import ContextMemory
from .rope import Rotary

RANK_K = 5      # the rank fusion's damping: 1 to 10 made no difference on bench.questions


class Read(NamedTuple):
    memory: ContextMemory
    start: int                  # token positions [start, end) of the memory: whole blocks, or recent tokens
    end: int
    span: int                   # its span, numbered over the memories asked


@dataclass(frozen=True)
class Evidence:
    """The answer's evidence: every span's score, and the ranges the host memory's answer re-reads."""

    scores: torch.Tensor            # [sum(sizes)] each span's fused evidence, comparable across memories
    sizes: tuple[int, ...]          # spans of each memory asked (0: too short to vote, or not probed)
    host: int                       # the memory the answer is written after
    reads: tuple[Read, ...]         # in reading order; empty: the host is read as it is
    alone: bool                     # the reads without the host's own window (but the question)
    gap: int                        # tokens between the reads' end and the fixed query position
    doc_end: int                    # the host's length: its window is read from here on when alone
    # per layer, the reads' keys rotated for the answer, built at its first step (keys)
    _keys: dict[int, Keys] = field(default_factory=dict, compare=False, repr=False)

    @property
    def offsets(self) -> list[int]:
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @property
    def pinned(self) -> torch.Tensor:
        """[k] the re-read spans' ids, ascending (the trace's)."""
        return torch.tensor([r.span for r in self.reads], dtype=torch.long)

    def locate(self, span: int) -> tuple[int, int]:
        """A span's (memory index, span in that memory)."""
        for i, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            if span < offset + size:
                return i, span - offset
        raise IndexError(span)

    def of(self, i: int) -> torch.Tensor:
        """[sizes[i]] memory i's own spans' scores."""
        return self.scores[self.offsets[i]: self.offsets[i] + self.sizes[i]]

    def keys(self, layer_idx: int, rope: Rotary, position: int) -> Keys:
        """The reads of one layer as a key set that sits just before the question: rotated at consecutive
        positions ending `gap` before `position` (the fixed memory distance). Built once per layer and answer."""
        if layer_idx not in self._keys:
            parts = [r.memory.read_span(layer_idx, r.start, r.end) for r in self.reads]     # [Hkv, n, d] each
            k, v = torch.cat([k for k, _ in parts], 1), torch.cat([v for _, v in parts], 1)
            # With a short window the gap gives way: positions never go below 0.
            self._keys[layer_idx] = Keys(rope.apply(k, max(0, position - self.gap - k.shape[1])), v, None)
        return self._keys[layer_idx]


def choose(memories: Sequence[ContextMemory], attention: Sequence[torch.Tensor | None],
           lexical: Sequence[dict[int, float] | None], n_pinned: int, lexical_weight: float, blocks_alone: bool,
           gap: int) -> Evidence | None:
    """Rank every span of every memory asked and pick what the host re-reads (the module's doc).

    attention: each memory's votes (Probe.attention), None for one too short to vote.
    lexical: each memory's span -> BM25 score, from one query over the library (empty: none).
    blocks_alone: read re-read blocks without the host's window too (InfLLMConfig.focus_alone).
    None when no memory voted.
    """
    lexical = list(lexical) or [None] * len(memories)
    sizes = tuple(0 if a is None else a.numel() for a in attention)
    if not any(sizes):
        return None
    votes = torch.cat([a.float().cpu() for a in attention if a is not None])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    words = {offsets[i] + j: x for i, lex in enumerate(lexical) if sizes[i] for j, x in (lex or {}).items()
             if 0 <= j < sizes[i]}
    scores = fuse(votes, words, lexical_weight)
    best = int(scores.argmax())
    host = max(i for i in range(len(sizes)) if offsets[i] <= best and sizes[i])
    memory, span, offset = memories[host], best - offsets[host], offsets[host]
    n_blocks, reads, alone = memory.n_blocks, [], blocks_alone
    if n_blocks and span >= n_blocks:                   # in the window: it and the next, alone
        for s in (span, span + 1):
            a, b = memory.block_span(s)
            if a < memory.length:
                reads.append(Read(memory, a, min(b, memory.length), offset + s))
        alone = True
    elif n_blocks:
        reads = [Read(memory, *memory.block_span(b), offset + b) for b in sorted(_pairs(scores[offset: offset + n_blocks],
                                                                                        n_pinned))]
    return Evidence(scores, sizes, host, tuple(reads), alone, gap, memory.length)


def _pairs(scores: torch.Tensor, n: int) -> list[int]:
    """Up to n block ids: the best ones by score, each with the block after it (the last: before it)."""
    n_blocks, chosen = scores.numel(), []
    for b in scores.argsort(descending=True).tolist():
        if len(chosen) >= n:
            break
        if b in chosen:
            continue
        chosen.append(b)
        x = b + 1 if b + 1 < n_blocks else b - 1
        if x >= 0 and x not in chosen and len(chosen) < n:
            chosen.append(x)
    return chosen


def fuse(attention: torch.Tensor, lexical: dict[int, float] | None, weight: float) -> torch.Tensor:
    """Spans' evidence: the attention vote fused by reciprocal rank with the word matches (span -> score); the
    vote alone without matches or weight.

    A span scores 1 / (RANK_K + its rank) among the spans the words' attention points to, plus
    weight / (RANK_K + its rank) among those that share the question's words. A rank ignores how strong a
    match is, so weak matches of a paraphrase's words do not drown the attention vote, which finds
    paraphrases better. On bench.questions (83 facts of lshort.pdf) the fact's span came first for 79
    questions in the book's words and 10 paraphrased, against 79 and 5 when the BM25 shares were added to
    the vote (bench/results/questions-cpu.md).
    """
    matched = {i: x for i, x in (lexical or {}).items() if 0 <= i < attention.numel() and x > 0}
    if not matched or not weight:
        return attention
    lex = torch.zeros_like(attention)
    lex[list(matched)] = torch.tensor(list(matched.values()), dtype=lex.dtype, device=lex.device)
    return _reciprocal_ranks(attention) + weight * _reciprocal_ranks(lex)


def _reciprocal_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1 / (RANK_K + rank) for the positive scores (rank 1: the highest), 0 elsewhere."""
    order = scores.argsort(descending=True, stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype, device=scores.device)
    return torch.where(scores > 0, 1.0 / (RANK_K + ranks), torch.zeros_like(scores))
