"""The question's probe: its own words vote, by exact attention, for the spans that hold the evidence.

InfLLM retrieves per layer with the chunk's mean query against each block's representative keys.
On real text that misses. A question about one planted sentence in a LaTeX manual found the
sentence's block in the top 8 of about 5 of 30 layers, and one table-of-contents block ranked first
for every question. Plain InfLLM then answered 8 of 120 questions of bench.needle; the reference
(full attention on 4K tokens) answered 27 of 30.

Before the answer, the question runs over a throwaway fork of each memory asked. In the middle third
of the layers (which attend by meaning; the bottom ones pour attention on the same few blocks whatever
is asked), every memory key gets its exact attention share. That is one softmax over all of them at
the fixed memory distance (kernels.span_mass), from two sets of queries:
- the question's own words: the votes;
- the chat template's tokens around them: the baseline that a span draws whatever is asked.
A span's vote is the words' share less the template's (Probe.attention). What is then re-read is
chosen from the votes of every memory asked (infllm_engine.evidence).

The cost, at question time only: one extra forward over the question per memory, and one pass over
the voting layers' block keys. Measured in bench/results/needle-cpu.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kernels import key_shares, span_mass

if TYPE_CHECKING:
    from .memory import ContextMemory

BASELINE_BEFORE = 16    # template rows before the question's words that give the baseline (Probe.vote)
WEIGHED = 4             # the best spans whose tokens are weighed for the quote (each with the span after it)


def voting_layers(n_layers: int, layers: tuple[float, float]) -> range:
    """The layers between two fractions of the depth; at least one."""
    lo = round(layers[0] * n_layers)
    return range(lo, min(max(round(layers[1] * n_layers), lo + 1), n_layers))


@dataclass
class Probe:
    """The tallies of one memory's probe, filled while the question runs over a fork of it."""

    span: tuple[int, int]          # absolute positions [a, b) of the question's own words
    doc_end: int                   # the document's length: what follows it is conversation, never evidence
    layers: range                  # the voting layers
    votes: torch.Tensor | None = None      # [spans]: summed attention share of each block, then window span
    baseline: torch.Tensor | None = None   # [spans]: the same from the template's tokens around the question
    # The document's spans: the probe's first chunk sees them all. A long follow-up's later chunks also see
    # blocks formed from the conversation itself (evicted from the window), which are no evidence.
    n_spans: int | None = None
    # per voting layer, "votes"/"baseline" -> (rows' queries [H, n, d], their log-normalisers) of each chunk
    rows: dict[int, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)

    def vote(self, layer_idx: int, q_global: torch.Tensor, start: int, blocks: tuple[torch.Tensor, torch.Tensor],
             tail: torch.Tensor, scale: float) -> None:
        """Add one layer's exact attention shares from this chunk's rows after the document.

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
            self.rows.setdefault(layer_idx, {}).setdefault(name, []).append(
                (q.float() * scale, lse.reshape(lse.shape[0], -1)))

    def attention(self) -> torch.Tensor | None:
        """[spans] the words' share of attention less the template's: what every question draws whatever it asks
        (a title page, the document's last lines) taken out. On bench.needle the fact's span then comes first
        for every correctly answered question."""
        if self.votes is None:
            return None
        words = self.votes / self.votes.sum()
        return words if self.baseline is None else words - self.baseline / self.baseline.sum()

    def weigh(self, memory: ContextMemory, scores: torch.Tensor) -> dict[int, torch.Tensor]:
        """span -> [2, n]: each token of the WEIGHED best spans by `scores` (and of the span after each) by the
        attention the question's words gave it in the voting layers, and the template's tokens, under the
        probe's softmax: for the sentence the answer quotes (reading.quotes). Spans straddle sentences, hence
        the next one.

        memory: the ContextMemory this probe forked (its blocks and window hold the same keys).
        """
        if not self.rows:
            return {}
        spans = scores.numel()
        best = [i for i in scores.argsort(descending=True).tolist()[:WEIGHED] if float(scores[i]) > 0]
        chosen = sorted({j for i in best for j in (i, i + 1) if j < spans})
        n_blocks = memory.n_blocks
        totals = {"votes": float(self.votes.sum()),
                  "baseline": float(self.baseline.sum()) if self.baseline is not None else 1.0}
        weights: dict[int, torch.Tensor] = {}
        for layer_idx, rows in self.rows.items():
            layer = memory.layers[layer_idx]
            blocks = [i for i in chosen if i < n_blocks]
            keys = dict(zip(blocks, layer.blocks.take(torch.tensor(blocks))[0])) if blocks else {}   # [Hkv, bs, d]
            for i in chosen[len(blocks):]:
                a, b = memory.block_span(i)
                keys[i] = layer.span(a, min(b, self.doc_end))[0]                                # [Hkv, n, d]
            for i, k in keys.items():
                per = torch.stack([_key_votes(rows.get(name, ()), k) / totals[name] for name in totals])
                weights[i] = weights[i] + per if i in weights else per
        return weights


def _key_votes(rows: list[tuple[torch.Tensor, torch.Tensor]], keys: torch.Tensor) -> torch.Tensor:
    """[n] each key's votes from rows of one kind, counted as Probe.vote counts a span's: a share per query."""
    votes = torch.zeros(keys.shape[1])
    for q, lse in rows:                     # q: [H, n, d] already scaled
        votes += key_shares(q, keys, 1.0, lse).cpu() * q.shape[1]
    return votes
