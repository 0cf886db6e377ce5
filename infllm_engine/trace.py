"""The retrieval trace: which blocks each layer retrieved at each step, and how much attention they got.

This is the data behind the heatmap, so it stays cheap: tensors are appended as they are (no host
sync in the hot loop) and converted once, when the call is over.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Step:
    kind: str          # "prefill" (a chunk of the input) or "decode" (one generated token)
    start: int         # first token position of the step
    n_tokens: int


@dataclass(slots=True)
class Retrieval:
    layer: int
    step: int
    block_ids: torch.Tensor     # [k] long
    scores: torch.Tensor        # [k] query . representative
    block_mass: torch.Tensor    # [k] share of the step's attention each retrieved block received
    local_mass: torch.Tensor    # []  share of the step's attention on the local window


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    records: list[Retrieval] = field(default_factory=list)
    votes: torch.Tensor | None = None     # [spans] the question focus's evidence (Focus.evidence): blocks, then window spans
    pinned: torch.Tensor | None = None    # [k] blocks the vote gave every layer

    def begin(self, kind: str, start: int, n_tokens: int) -> int:
        self.steps.append(Step(kind, start, n_tokens))
        return len(self.steps) - 1

    def to_dict(self) -> dict:
        """Plain lists and numbers, ready for JSON or SQLite."""
        return {
            "steps": [{"kind": s.kind, "start": s.start, "n_tokens": s.n_tokens} for s in self.steps],
            "records": [
                {
                    "layer": r.layer,
                    "step": r.step,
                    "block_ids": r.block_ids.tolist(),
                    "scores": [round(x, 4) for x in r.scores.float().tolist()],
                    "block_mass": [round(x, 5) for x in r.block_mass.float().tolist()],
                    "local_mass": round(float(r.local_mass), 5),
                }
                for r in self.records
            ],
            "votes": None if self.votes is None else [round(x, 6) for x in self.votes.float().tolist()],
            "pinned": None if self.pinned is None else self.pinned.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        trace = cls([Step(**s) for s in data["steps"]])
        if data.get("votes") is not None:
            trace.votes = torch.tensor(data["votes"])
        if data.get("pinned") is not None:
            trace.pinned = torch.tensor(data["pinned"], dtype=torch.long)
        for r in data["records"]:
            trace.records.append(Retrieval(
                r["layer"], r["step"], torch.tensor(r["block_ids"], dtype=torch.long), torch.tensor(r["scores"]),
                torch.tensor(r["block_mass"]), torch.tensor(r["local_mass"]),
            ))
        return trace

    def heat(self, n_layers: int, n_blocks: int, steps: set[int] | None = None) -> torch.Tensor:
        """[n_layers, n_blocks]: attention mass each block received, summed over the chosen steps.

        Blocks from n_blocks on were formed from the question and answer themselves; they are left out.
        """
        heat = torch.zeros(n_layers, n_blocks)
        for r in self.records:
            if steps is None or r.step in steps:
                ids, mass = r.block_ids.cpu(), r.block_mass.float().cpu()
                keep = ids < n_blocks
                heat[r.layer].index_add_(0, ids[keep], mass[keep])
        return heat

    def evidence_weights(self, n_blocks: int) -> tuple[torch.Tensor, str]:
        """Each span's weight as evidence for the answer, and what it is ("vote" or "mass").

        With a question focus it is the vote (Focus.evidence): span i < n_blocks is memory block i, and
        spans from n_blocks on are block-sized pieces of the local window, so a fact read in the window
        is cited too. Without one (plain InfLLM, or traces stored before the focus) it is the attention
        mass each block received, summed over layers and steps. On bench.needle the vote put the fact
        first for 100 of 100 correct answers, the summed mass for 60 of them: the bottom layers pour
        mass on the same early blocks whatever the question.
        """
        if self.votes is not None:
            return self.votes, "vote"
        layers = max((r.layer for r in self.records), default=-1) + 1
        return self.heat(layers, n_blocks).sum(0), "mass"

    def evidence(self, n_blocks: int) -> list[int]:
        """The spans that hold the answer's evidence, most likely first (citations, passages)."""
        weight, _ = self.evidence_weights(n_blocks)
        return [int(i) for i in weight.argsort(descending=True, stable=True) if weight[i] > 0]
