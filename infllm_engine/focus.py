"""Question focus: the question's own words choose the passages that the answer re-reads.

InfLLM retrieves per layer with the chunk's mean query against each block's representative keys.
On real text that misses. A question about one planted sentence in a LaTeX manual found the
sentence's block in the top 8 of about 5 of 30 layers, and one table-of-contents block ranked first
for every question. Plain InfLLM then answered 8 of 120 questions of bench.needle; the reference
(full attention on 4K tokens) answered 27 of 30.

Before the answer, a probe runs the question over a throwaway fork. In the middle third of the
layers (which attend by meaning; the bottom ones pour attention on the same few blocks whatever is
asked), every memory key gets its exact attention share. That is one softmax over all of them at
the fixed memory distance (kernels.span_mass), from two sets of queries:
- the question's own words: the votes;
- the chat template's tokens around them: the baseline that a block draws whatever is asked.
A span's evidence is votes minus baseline, plus (when the caller has the spans' texts) a share for
the spans that hold the question's rarer words (storage.lexical, BM25). It orders the answer's
citations, and its best blocks, each with the block after it, are pinned.

Pinned blocks are not put at the fixed distance. Each layer re-reads them just before the question,
in document order, at consecutive positions. The oracle test showed why: forced into every layer at
the fixed distance, the right block still gave wrong answers. A 135M model copies a name or a number
out of text that it reads in order and nearby.

The cost, at question time only: one extra forward over the question, and one pass over the voting
layers' block keys. Measured in bench/results/needle-cpu.md.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kernels import Keys, key_shares, span_mass

from .rope import Rotary

if TYPE_CHECKING:
    from .memory import ContextMemory

BASELINE_BEFORE = 16    # template rows before the question's words that give the baseline (Focus.vote)


@dataclass
class Focus:
    span: tuple[int, int]          # absolute positions [a, b) of the question's own words
    doc_end: int                   # the document's length: what follows it is conversation, never evidence
    layers: range                  # the voting layers
    n_pinned: int                  # blocks to pin
    gap: int = 64                  # tokens between the re-read blocks' end and the fixed query position
    lexical: dict[int, float] | None = None   # span -> word-match score from the caller (storage.lexical)
    lexical_weight: float = 0.0    # its share beside the attention vote; 0: the vote alone
    blocks_alone: bool = False     # pinned blocks, too, are read without the window (InfLLMConfig.focus_alone)
    votes: torch.Tensor | None = None    # [spans]: summed attention share of each block (then window span)
    baseline: torch.Tensor | None = None  # [spans]: the same from the template's tokens around the question
    pinned: torch.Tensor | None = None   # [k] block ids every layer attends, ascending; None while probing
    scores: torch.Tensor | None = None   # [spans] evidence(), set with pinned
    alone: tuple[int, int] | None = None  # positions [a, b): the window's evidence, re-read alone
    # span -> [2, n]: each of its tokens' share of the words' attention and of the template's (weigh_tokens)
    token_votes: dict[int, torch.Tensor] = field(default_factory=dict)
    # Across documents (infllm_engine.shelf): the spans to re-read, in reading order, each a token range
    # [a, b) of its own memory; pinned then numbers them as the shelf numbers spans. None: pinned blocks.
    reads: list[tuple["ContextMemory", int, int]] | None = None
    # The document's spans: the probe's first chunk sees them all. A long follow-up's later chunks also see
    # blocks formed from the conversation itself (evicted from the window), which are no evidence.
    n_spans: int | None = None
    _near: dict[int, Keys] = field(default_factory=dict)   # per layer, the pinned blocks' rotated keys
    # per voting layer, "votes"/"baseline" -> (rows' queries [H, n, d], their log-normalisers) of each chunk
    _rows: dict[int, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)

    @staticmethod
    def voting_layers(n_layers: int, layers: tuple[float, float]) -> range:
        """The layers between two fractions of the depth; at least one."""
        lo = round(layers[0] * n_layers)
        return range(lo, min(max(round(layers[1] * n_layers), lo + 1), n_layers))

    @classmethod
    def for_question(cls, span: tuple[int, int], doc_end: int, n_layers: int, layers: tuple[float, float],
                     n_pinned: int, gap: int = 64, lexical: dict[int, float] | None = None,
                     lexical_weight: float = 0.0, blocks_alone: bool = False) -> "Focus":
        return cls(span, doc_end, cls.voting_layers(n_layers, layers), n_pinned, gap, lexical, lexical_weight,
                   blocks_alone)

    @property
    def probing(self) -> bool:
        return self.pinned is None

    def vote(self, layer_idx: int, q_global: torch.Tensor, start: int, blocks: tuple[torch.Tensor, torch.Tensor],
             tail: torch.Tensor, scale: float) -> None:
        """Add one layer's exact attention shares from this chunk's rows after the document.

        The question's words vote; the template's tokens around them (BASELINE_BEFORE of them before) give the
        baseline that a block draws whatever is asked (a title page, a table of contents).
        q_global: [H, C, d] the chunk's queries at the fixed memory distance, positions start ..
        blocks: the layer's packed block keys (BlockStore.keys); tail: [Hkv, m, d] document keys after them.
        """
        if layer_idx not in self.layers:
            return
        lo, hi = max(self.doc_end, start), start + q_global.shape[1]
        if lo >= hi:
            return
        if self.n_spans is None:                # the probe's first chunk: the document's blocks and tail
            n_blocks, _, bs, _ = blocks[0].shape
            self.n_spans = n_blocks + -(-tail.shape[1] // bs)
        # Rows are positions: the words are one range of them, the template's tokens the ranges around it
        # (sliced with Python ints, so no step reads a mask back from the device). Before the words only
        # the last BASELINE_BEFORE rows count: a follow-up's earlier turns, hundreds of tokens, each cost a
        # pass over every block key (a 4-turn conversation's probe on a 75K-token book: 34.8 s with them,
        # 7.4 s without); the template's own tokens before a first question's words are 4.
        a, b = min(max(self.span[0], lo), hi), max(min(self.span[1], hi), lo)
        before = max(lo, min(a, self.span[0] - BASELINE_BEFORE))
        kinds = [(name, [q_global[:, r0 - start: r1 - start] for r0, r1 in ranges if r0 < r1])
                 for name, ranges in (("votes", [(a, b)]), ("baseline", [(before, a), (b, hi)]))]
        kinds = [(name, torch.cat(rows, 1)) for name, rows in kinds if rows]        # [H, n, d] each
        if not kinds:                           # a long follow-up's chunk of earlier turns: nothing votes
            return
        # Both kinds of rows in one pass over the block keys: that pass is the probe's cost.
        sizes = [q.shape[1] for _, q in kinds]
        mass = span_mass(torch.cat([q for _, q in kinds], 1), blocks[0], scale, tail, block_scale=blocks[1],
                         groups=sizes)
        h = q_global.shape[0]
        lses = mass.lse.view(-1, h // mass.lse.shape[0], sum(sizes)).split(sizes, dim=2)   # [Hkv, G, n] each
        for (name, q), spans, lse in zip(kinds, mass.spans, lses):
            share = spans[: self.n_spans] * q.shape[1]
            setattr(self, name, share if getattr(self, name) is None else getattr(self, name) + share)
            self._rows.setdefault(layer_idx, {}).setdefault(name, []).append(
                (q.float() * scale, lse.reshape(lse.shape[0], -1)))

    def choose(self, n_blocks: int, span_of: Callable[[int], tuple[int, int]]) -> None:
        """After the probe: pin the memory blocks the question's words draw beyond the template's baseline.

        Blocks come in pairs, since a sentence can straddle a block boundary (a name cut after "M." was
        read as "M.A.T.E."): the best-scored one and the one after it (the last block: the one before),
        because the words a question shares with a sentence come before the answer it asks for. Pairing
        with the better-scored neighbour instead picked the block before in 3 of 3 straddles that went
        wrong on bench.needle.

        Window spans are scored too (for citations). When one is the best, no block is pinned: that span
        and the next are re-read just before the question, and the rest of the window is left out. A fact
        1.4K tokens back in the window was then read right in 14 of 15 questions, 11 with the whole window
        as it is (bench/results/needle-cpu.md, fourth run).
        span_of: a span's token positions [start, stop) (ContextMemory.block_span).
        """
        self.scores = self.evidence()
        if self.scores is None or n_blocks == 0:
            self.pinned = torch.zeros(0, dtype=torch.long)
            return
        best = int(self.scores.argmax())
        if best >= n_blocks:
            self.pinned = torch.zeros(0, dtype=torch.long)
            self.alone = (span_of(best)[0], min(span_of(best + 1)[1], self.doc_end))
            return
        # On the scores' device: the answer's steps index with it, and a host tensor there is a copy each time.
        self.pinned = torch.tensor(sorted(self._passages(self.scores[:n_blocks])), dtype=torch.long,
                                   device=self.scores.device)

    def weigh_tokens(self, memory, n_best: int = 4) -> None:
        """Weigh every token of the n_best evidence spans (and of the span after each) by the attention the
        question's words gave it in the voting layers, and the template's tokens, under the probe's softmax:
        for the sentence the answer quotes (reading.quotes). Spans straddle sentences, hence the next one.

        memory: the ContextMemory the probe forked (its blocks and window hold the same keys).
        """
        if self.scores is None or not self._rows:
            return
        spans = self.scores.numel()
        best = [i for i in self.scores.argsort(descending=True).tolist()[:n_best] if float(self.scores[i]) > 0]
        chosen = sorted({j for i in best for j in (i, i + 1) if j < spans})
        n_blocks = memory.n_blocks
        totals = {"votes": float(self.votes.sum()),
                  "baseline": float(self.baseline.sum()) if self.baseline is not None else 1.0}
        weights: dict[int, torch.Tensor] = {}
        for layer_idx, rows in self._rows.items():
            layer = memory.layers[layer_idx]
            blocks = [i for i in chosen if i < n_blocks]
            keys = dict(zip(blocks, layer.blocks.take(torch.tensor(blocks))[0])) if blocks else {}   # [Hkv, bs, d]
            for i in chosen[len(blocks):]:
                a, b = memory.block_span(i)
                keys[i] = layer.span(a, min(b, self.doc_end))[0]                                # [Hkv, n, d]
            for i, k in keys.items():
                per = torch.stack([self._key_votes(rows.get(name, ()), k) / totals[name] for name in totals])
                weights[i] = weights[i] + per if i in weights else per
        self.token_votes = weights

    @staticmethod
    def _key_votes(rows: list[tuple[torch.Tensor, torch.Tensor]], keys: torch.Tensor) -> torch.Tensor:
        """[n] each key's votes from rows of one kind, counted as vote() counts a span's: a share per query."""
        votes = torch.zeros(keys.shape[1])
        for q, lse in rows:                     # q: [H, n, d] already scaled
            votes += key_shares(q, keys, 1.0, lse).cpu() * q.shape[1]
        return votes

    def _passages(self, scores: torch.Tensor) -> list[int]:
        """Up to n_pinned block ids: the best ones by score, each with the block after it (the last: before it)."""
        n_blocks, chosen = scores.numel(), []
        for b in scores.argsort(descending=True).tolist():
            if len(chosen) >= self.n_pinned:
                break
            if b in chosen:
                continue
            chosen.append(b)
            x = b + 1 if b + 1 < n_blocks else b - 1
            if x >= 0 and x not in chosen and len(chosen) < self.n_pinned:
                chosen.append(x)
        return chosen

    def evidence(self) -> torch.Tensor | None:
        """[spans] where the question points: the words' share of attention less the template's, fused with
        the word matches by rank when the caller has them.

        Subtracting the baseline takes out what every question draws (a title page, the document's
        last lines): on bench.needle the fact's span then comes first for every correctly answered question.
        Word matches join by reciprocal rank: a span scores 1 / (RANK_K + its rank) among the spans the
        words point to, plus lexical_weight / (RANK_K + its rank) among those that share the question's words.
        A rank ignores how strong a match is, so weak matches of a paraphrase's words do not drown the
        attention vote, which finds paraphrases better. On bench.questions (83 facts of lshort.pdf) the fact's
        span came first for 79 questions in the book's words and 10 paraphrased, against 79 and 5 when the
        BM25 shares were added to the vote (bench/results/questions-cpu.md).
        """
        attention = self.attention()
        return None if attention is None else fuse(attention, self.lexical, self.lexical_weight)

    def attention(self) -> torch.Tensor | None:
        """[spans] the words' share of attention less the template's: the vote before word matches join it."""
        if self.votes is None:
            return None
        words = self.votes / self.votes.sum()
        return words if self.baseline is None else words - self.baseline / self.baseline.sum()

    def near(self, layer_idx: int, layer, rope: Rotary, position: int) -> Keys | None:
        """The pinned blocks of one layer (a LayerMemory), or the window's evidence read alone, as a key
        set that sits just before the question.

        The query is rotated at `position` (the fixed memory distance); the blocks follow each other in
        document order, with their tokens at consecutive positions ending `gap` before it. So the
        evidence is read as if it were the text just before the question, in order, which is what a
        135M model needs to copy a name or a number out of it (bench/results/needle-cpu.md). Built once
        per layer and answer: the pinned set does not change while the answer is written.
        """
        if self.probing or not (self.pinned.numel() or self.alone):
            return None
        if layer_idx not in self._near:
            if self.reads is not None:
                parts = [memory.read_span(layer_idx, a, b) for memory, a, b in self.reads]    # [Hkv, n, d] each
                k, v = torch.cat([k for k, _ in parts], 1), torch.cat([v for _, v in parts], 1)
            elif self.alone:
                k, v = layer.span(*self.alone)                  # [Hkv, n, d]
            else:
                k, v = layer.blocks.take(self.pinned)           # [P, Hkv, bs, d]
                p, hkv, bs, d = k.shape
                k = k.transpose(0, 1).reshape(hkv, p * bs, d)
                v = v.transpose(0, 1).reshape(hkv, p * bs, d)
            # With a short window the gap gives way: positions never go below 0.
            self._near[layer_idx] = Keys(rope.apply(k, max(0, position - self.gap - k.shape[1])), v, None)
        return self._near[layer_idx]

    def without_pinned(self, ids: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's own retrieval (asked for k + pinned) less the pinned blocks, its best k kept, ids ascending.

        How many are left is known without looking: retrieval returned min(k + pinned, every block), and
        every pinned block is one of them when it returned all. So nothing is read back from the device.
        """
        k = min(k, ids.numel() - self.pinned.numel())
        if k <= 0:
            return ids[:0], scores[:0]
        pinned = torch.isin(ids, self.pinned.to(ids.device))
        best = torch.topk(scores.masked_fill(pinned, float("-inf")), k).indices.sort().values
        return ids[best], scores[best]


RANK_K = 5      # the rank fusion's damping: 1 to 10 made no difference on bench.questions


def fuse(attention: torch.Tensor, lexical: dict[int, float] | None, weight: float) -> torch.Tensor:
    """The evidence of spans (Focus.evidence): the attention vote fused by reciprocal rank with the word matches
    (span -> score); the vote alone without matches or weight."""
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
