"""What an answer re-reads: a frozen list of token ranges of the memories asked, chosen from their probes.

A question is asked of one memory or of several at once (a document is a shelf of one). Each memory's
probe (infllm_engine.probe) gives its spans' votes. Votes compare across memories: each is the
question words' share of attention over that memory less the template's share, so a memory on which
the words' attention gathers scores high and one on which it spreads scores low. The word matches come
from one BM25 index over the whole library (storage.lexical), so their scores compare too, and so do the
meaning scores (each span's cosine with the question, infllm_engine.encoder). All three are ranked over
all the spans together and fused by reciprocal rank (fuse). Spans are numbered over the
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
# Beside attention (weight 1), the words' and the meaning's weights (times focus_lexical and focus_meaning),
# by whether the question's words match one span strongly (strongly()): measured in fuse().
STRONG_WORDS = 2.0
WORDS_WEIGHT = {True: 1.5, False: 1.0}
MEANING_WEIGHT = {True: 1.0, False: 2.0}


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
    # each signal's rank of every span ("attention", "words", "meaning"; 1: its best), 0 where it ranks none;
    # attention and words rank the spans of every memory asked together, meaning each memory's own
    ranks: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    # per layer, the reads' keys rotated for the answer, built at its first step (keys)
    _keys: dict[int, Keys] = field(default_factory=dict, compare=False, repr=False)

    @property
    def offsets(self) -> list[int]:
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @property
    def pinned(self) -> torch.Tensor:
        """[k] the re-read spans' ids, ascending (the trace's)."""
        return torch.tensor([r.span for r in self.reads], dtype=torch.long)

    def of(self, i: int) -> torch.Tensor:
        """[sizes[i]] memory i's own spans' scores."""
        return self.scores[self.offsets[i]: self.offsets[i] + self.sizes[i]]

    def signals(self, k: int = 10) -> dict[int, dict[str, int]]:
        """The k best spans' ranks by each signal (those that rank them): what the inspector shows beside each
        passage ("attention #1 · words #3 · meaning #2")."""
        best = [int(i) for i in self.scores.argsort(descending=True, stable=True)[:k]]
        return {i: {name: int(r[i]) for name, r in self.ranks.items() if int(r[i])} for i in best}

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
           lexical: Sequence[dict[int, float] | None], n_pinned: int, weights: dict[str, float], blocks_alone: bool,
           gap: int, meaning: Sequence[torch.Tensor | None] = ()) -> Evidence | None:
    """Rank every span of every memory asked and pick what the host re-reads (the module's doc).

    attention: each memory's votes (Probe.attention), None for one too short to vote.
    lexical: each memory's span -> BM25 score, from one query over the library (empty: none).
    meaning: each memory's [spans] cosine of its spans' embeddings with the question's (empty: none).
    weights: each signal's weight in the fusion (fuse): "words", "meaning" (attention's is 1).
    blocks_alone: read re-read blocks without the host's window too (InfLLMConfig.focus_alone).
    None when no memory voted.
    """
    lexical = list(lexical) or [None] * len(memories)
    meaning = list(meaning) or [None] * len(memories)
    sizes = tuple(0 if a is None else a.numel() for a in attention)
    if not any(sizes):
        return None
    votes = torch.cat([a.float().cpu() for a in attention if a is not None])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    words = {offsets[i] + j: x for i, lex in enumerate(lexical) if sizes[i] for j, x in (lex or {}).items()
             if 0 <= j < sizes[i]}
    meant = None
    if any(m is not None for i, m in enumerate(meaning) if sizes[i]):
        meant = torch.cat([_fit(m, n) for m, n in zip(meaning, sizes) if n])
    scores = fuse(votes, words, weights.get("words", 0.0), meant, weights.get("meaning", 0.0), sizes)
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
    ranks = {"attention": _ranks(votes)}
    if words:
        lex = torch.zeros_like(votes)
        lex[list(words)] = torch.tensor(list(words.values()))
        ranks["words"] = _ranks(lex)
    if meant is not None:               # within each document, as fuse ranks them
        ranks["meaning"] = torch.cat([_ranks(part, positive=False) for part in meant.split(list(sizes))])
    return Evidence(scores, sizes, host, tuple(reads), alone, gap, memory.length, ranks)


def _ranks(scores: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """[n] each span's rank by the scores (1: the highest), 0 for the scores not above 0 with positive."""
    order = scores.argsort(descending=True, stable=True)
    ranks = torch.empty(scores.numel(), dtype=torch.long)
    ranks[order] = torch.arange(1, scores.numel() + 1)
    return torch.where(scores > 0, ranks, 0) if positive else ranks


def _fit(meaning: torch.Tensor | None, n: int) -> torch.Tensor:
    """[n] a memory's meaning scores cut or padded to its n spans (0: none)."""
    out = torch.zeros(n)
    if meaning is not None:
        m = meaning.float().cpu()[:n]
        out[: m.numel()] = m
    return out


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


def fuse(attention: torch.Tensor, lexical: dict[int, float] | None, weight: float,
         meaning: torch.Tensor | None = None, meaning_weight: float = 0.0,
         sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Spans' evidence: the attention vote fused by reciprocal rank with the word matches (span -> score) and
    the spans' meaning (cosine with the question); the vote alone without either.

    A span scores 1 / (RANK_K + its rank) among the spans the words' attention points to, plus
    weight / (RANK_K + its rank) among those that share the question's words, plus meaning_weight /
    (RANK_K + its rank) by meaning. A rank ignores how strong a match is, so weak matches of a paraphrase's
    words do not drown the attention vote. Fused so on 83 lshort facts, the fact's span came first for 79
    questions in the book's words and 10 paraphrased, against 79 and 5 when the BM25 shares were added
    to the vote (bench/results/questions-cpu.md).

    With meaning, the words' and the meaning's weights follow how strongly the question's words match
    (STRONG_WORDS): a question in the book's words shares them with one span far more than with the rest,
    a paraphrase shares a few common ones with many. On all 136 facts of lshort and TeX for the Impatient
    (bench/results/meaning-cpu.md), the fact's page came first for 132 questions in the book's words and
    50 paraphrased, against 132 and 29 without meaning, and 121 and 49 with the weights fixed at 1 and 2.

    Meaning ranks the spans within each memory asked (sizes: each one's spans, one after another), never
    one memory's against another's: attention and words choose the document. Asked of lshort and TeX for
    the Impatient together (two TeX books), lshort's paraphrased facts went to lshort 36 times in 42 by
    attention and words, and 29 when meaning ranked the spans of both books together.
    """
    matched = {i: x for i, x in (lexical or {}).items() if 0 <= i < attention.numel() and x > 0}
    use_meaning = meaning is not None and meaning_weight > 0
    if not (matched and weight) and not use_meaning:
        return attention
    fused = _reciprocal_ranks(attention)
    if use_meaning:
        strong = strongly(list(matched.values()))
        weight, meaning_weight = (weight * WORDS_WEIGHT[strong], meaning_weight * MEANING_WEIGHT[strong])
        fused = fused + meaning_weight * torch.cat([_reciprocal_ranks(part, positive=False) for part in
                                                    meaning.to(attention).split(list(sizes or [meaning.numel()]))])
    if matched and weight:
        lex = torch.zeros_like(attention)
        lex[list(matched)] = torch.tensor(list(matched.values()), dtype=lex.dtype, device=lex.device)
        fused = fused + weight * _reciprocal_ranks(lex)
    return fused


def strongly(matches: list[float]) -> bool:
    """Whether the question's words match one span strongly: its BM25 score at least STRONG_WORDS times the
    mean of all the spans that share a word with it. Its median was 3.3 for the facts of lshort and of TeX for
    the Impatient asked in the book's words, 1.8 paraphrased."""
    return bool(matches) and max(matches) >= STRONG_WORDS * sum(matches) / len(matches)


def _reciprocal_ranks(scores: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """1 / (RANK_K + rank) for the scores (rank 1: the highest); with positive, 0 for those not above 0 (a vote
    below the template's baseline, a span without the question's words). A cosine ranks whatever its sign."""
    order = scores.argsort(descending=True, stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype, device=scores.device)
    out = 1.0 / (RANK_K + ranks)
    return torch.where(scores > 0, out, torch.zeros_like(scores)) if positive else out
