"""A shelf: one question asked of several documents' memories at once.

InfLLM puts every memory block at one fixed distance from the query, and this engine keeps keys raw
(rotated only when read), so a block's keys carry no position of their own. Blocks of several
documents can therefore be re-read before one question, side by side, exactly as the question focus
re-reads one document's blocks (infllm_engine.focus).

Each document's memory is probed as Engine.focus probes one. Their votes can be compared: each is the
question words' share of attention over that memory less the template's share, so a document on which
the words' attention gathers scores high and one on which it spreads scores low. The word matches
come from one BM25 index over the whole library (storage.lexical), so their scores compare too. Both
are ranked over all the documents' spans together and fused by reciprocal rank, as for one document
(focus.fuse). The document with the best span is the one the answer reads: its best spans, each with
the span after it, are re-read before the question. Spans of other documents are left out: asked of
five documents that each held a lighthouse keeper, a 135M model quoted one document's keeper and
named another's when it read the best spans of all of them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .focus import Focus, fuse
from .memory import ContextMemory


@dataclass
class Shelf:
    """The documents asked together and the spans the answer re-reads. Spans are numbered over the shelf:
    document i's span j is offsets[i] + j, in the order Library.spans numbers each document's spans."""

    sizes: list[int]                      # spans of each document (0: too short to vote)
    scores: torch.Tensor                  # [sum(sizes)] each span's evidence, comparable across documents
    reads: list[tuple[int, int]]          # (document index, span) re-read before the question, in reading order

    @property
    def offsets(self) -> list[int]:
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @property
    def best(self) -> int:
        """The document that holds the best evidence: its sinks start the answer, its sentence is quoted."""
        return self.locate(int(self.scores.argmax()))[0] if self.scores.numel() else 0

    def locate(self, span: int) -> tuple[int, int]:
        """A shelf span's (document index, span in that document)."""
        for i, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            if span < offset + size:
                return i, span - offset
        raise IndexError(span)

    @classmethod
    def choose(cls, focuses: Sequence[Focus | None], n_pinned: int, lexical_weight: float,
               lexical: Sequence[dict[int, float] | None] = ()) -> "Shelf":
        """Rank every span of every probed document, and pick up to n_pinned spans to re-read.

        focuses: each document's probe (Engine.focus), None for a document too short to vote.
        lexical: each document's span -> BM25 score, from one query over the library.
        """
        lexical = list(lexical) or [None] * len(focuses)
        parts = [f.attention() if f is not None else None for f in focuses]
        sizes = [0 if p is None else p.numel() for p in parts]
        if not any(sizes):
            return cls(sizes, torch.zeros(0), [])
        attention = torch.cat([p.float().cpu() for p in parts if p is not None])
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        words = {offsets[i] + j: x for i, lex in enumerate(lexical) if sizes[i] for j, x in (lex or {}).items()
                 if 0 <= j < sizes[i]}
        shelf = cls(sizes, fuse(attention, words, lexical_weight), [])
        shelf.reads = shelf._pick(n_pinned)
        return shelf

    def _pick(self, n_pinned: int) -> list[tuple[int, int]]:
        """The best document's best spans with their neighbours (focus.Focus._passages), in its own order."""
        chosen: list[tuple[int, int]] = []
        best = self.best
        for g in self.scores.argsort(descending=True, stable=True).tolist():
            if len(chosen) >= n_pinned or float(self.scores[g]) <= 0:
                break
            doc, span = self.locate(g)
            if doc != best:
                continue
            for s in (span, span + 1 if span + 1 < self.sizes[doc] else span - 1):
                if s >= 0 and (doc, s) not in chosen and len(chosen) < n_pinned:
                    chosen.append((doc, s))
        return sorted(chosen)

    def ranges(self, memories: Sequence[ContextMemory]) -> list[tuple[ContextMemory, int, int]]:
        """The re-read spans as token ranges of their memories (Focus.reads)."""
        out = []
        for doc, span in self.reads:
            memory = memories[doc]
            a, b = memory.block_span(span)
            out.append((memory, a, min(b, memory.length)))
        return out

    def global_ids(self) -> torch.Tensor:
        offsets = self.offsets
        return torch.tensor([offsets[d] + s for d, s in self.reads], dtype=torch.long)
