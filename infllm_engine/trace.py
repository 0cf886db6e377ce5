"""The retrieval trace: which blocks each layer retrieved at each step, and how much attention they got.

This is the data behind the heatmap, so it stays cheap: tensors are appended as they are (no host
sync in the hot loop) and converted once, when the call is over.

Columns are spans of the document, numbered as Library.spans numbers them: span i holds positions
n_init + i * block_size .. (ContextMemory.block_span), so memory block i is span i, and the
block-sized pieces of the document still in the local window continue after the last block.
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
    window_first: int = 0       # span id of window_mass[0]
    window_mass: torch.Tensor | None = None   # [w] share on each span of the document in the window (sinks: none)


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    records: list[Retrieval] = field(default_factory=list)
    votes: torch.Tensor | None = None     # [spans] the question focus's evidence (Focus.evidence): blocks, then window spans
    pinned: torch.Tensor | None = None    # [k] blocks the vote gave every layer
    # Positions before doc_end are the document: what memory held when the traced call began (the first
    # step's start, unless set). Window spans end there; the question and the answer are no evidence.
    doc_end: int | None = None
    # Asked across documents (infllm_engine.shelf): each document's number of spans. Columns, votes and
    # pinned ids then number the documents' spans one document after another; None: one document.
    parts: list[int] | None = None

    def begin(self, kind: str, start: int, n_tokens: int) -> int:
        if self.doc_end is None:
            self.doc_end = start
        self.steps.append(Step(kind, start, n_tokens))
        return len(self.steps) - 1

    def to_dict(self) -> dict:
        """Plain lists and numbers, ready for JSON or SQLite.

        Traces stored before the window spans have no "doc_end" and no record "window_mass": from_dict
        reads them as doc_end None and records without window data (the heatmap then has blocks only).
        """
        records = []
        for r in self.records:
            record = {
                "layer": r.layer,
                "step": r.step,
                "block_ids": r.block_ids.tolist(),
                "scores": [round(x, 4) for x in r.scores.float().tolist()],
                "block_mass": [round(x, 5) for x in r.block_mass.float().tolist()],
                "local_mass": round(float(r.local_mass), 5),
            }
            if r.window_mass is not None:
                record["window_first"] = r.window_first
                record["window_mass"] = [round(x, 5) for x in r.window_mass.float().tolist()]
            records.append(record)
        data = {
            "steps": [{"kind": s.kind, "start": s.start, "n_tokens": s.n_tokens} for s in self.steps],
            "records": records,
            "votes": None if self.votes is None else [round(x, 6) for x in self.votes.float().tolist()],
            "pinned": None if self.pinned is None else self.pinned.tolist(),
        }
        if self.doc_end is not None:
            data["doc_end"] = self.doc_end
        if self.parts is not None:
            data["parts"] = list(self.parts)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        trace = cls([Step(**s) for s in data["steps"]], doc_end=data.get("doc_end"), parts=data.get("parts"))
        if data.get("votes") is not None:
            trace.votes = torch.tensor(data["votes"])
        if data.get("pinned") is not None:
            trace.pinned = torch.tensor(data["pinned"], dtype=torch.long)
        for r in data["records"]:
            window = r.get("window_mass")
            trace.records.append(Retrieval(
                r["layer"], r["step"], torch.tensor(r["block_ids"], dtype=torch.long), torch.tensor(r["scores"]),
                torch.tensor(r["block_mass"]), torch.tensor(r["local_mass"]), r.get("window_first", 0),
                None if window is None else torch.tensor(window, dtype=torch.float32),
            ))
        return trace

    def heat(self, n_layers: int, n_blocks: int, steps: set[int] | None = None,
             n_spans: int | None = None) -> torch.Tensor:
        """[n_layers, n_spans]: attention mass each span received, summed over the chosen steps.

        Columns [0, n_blocks) are the memory blocks. Blocks from n_blocks on were formed from the
        document's tail, the question and the answer while answering; they are left out. Columns
        [n_blocks, n_spans) (none by default) are the spans of the document in the local window.
        """
        n_spans = n_blocks if n_spans is None else n_spans
        heat = torch.zeros(n_layers, n_spans)
        for r in self.records:
            if steps is None or r.step in steps:
                ids, mass = r.block_ids.cpu(), r.block_mass.float().cpu()
                keep = ids < n_blocks
                heat[r.layer].index_add_(0, ids[keep], mass[keep])
                if r.window_mass is not None and n_spans > n_blocks:
                    mass = r.window_mass.float().cpu()
                    ids = torch.arange(r.window_first, r.window_first + mass.numel())
                    keep = (ids >= n_blocks) & (ids < n_spans)
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
