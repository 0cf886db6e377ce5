"""The retrieval trace: which blocks each layer retrieved at each step, and how much attention they got.

This is the data behind the heatmap, so it stays cheap: tensors are appended as they are (no host
sync in the hot loop) and converted once, when the call is over. An answer stores its Summary (the
sums over its steps, ~6 KB), not the per-step Trace (~340 KB).

Columns are spans of the documents asked, numbered as Library.spans numbers each document's and one
document after another (Trace.parts): span i of a document holds its positions n_init + i * block_size ..
(ContextMemory.block_span), so memory block i is span i, and the block-sized pieces of the document
still in the local window continue after the last block.
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
    block_ids: torch.Tensor     # [k] long: the spans retrieved (memory blocks) or re-read (infllm_engine.evidence)
    scores: torch.Tensor        # [k] query . representative, or the span's evidence
    block_mass: torch.Tensor    # [k] share of the step's attention each of them received
    local_mass: torch.Tensor    # []  share of the step's attention on the local window
    window_first: int = 0       # span id of window_mass[0]
    window_mass: torch.Tensor | None = None   # [w] share on each span of the document in the window (sinks: none)


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    records: list[Retrieval] = field(default_factory=list)
    votes: torch.Tensor | None = None     # [spans] the question's evidence (infllm_engine.evidence), every document's
    pinned: torch.Tensor | None = None    # [k] the spans every layer re-read
    # Positions before doc_end are the document: what memory held when the traced call began (the first
    # step's start, unless set). Window spans end there; the question and the answer are no evidence.
    doc_end: int | None = None
    # Each document's number of spans, as the question's probes counted them: columns, votes and pinned ids
    # number the documents' spans one document after another. None: one document, not probed.
    parts: list[int] | None = None
    # The best evidence spans' ranks by each signal that ranks them (Evidence.signals): span -> name -> rank.
    ranks: dict[int, dict[str, int]] | None = None

    def begin(self, kind: str, start: int, n_tokens: int) -> int:
        if self.doc_end is None:
            self.doc_end = start
        self.steps.append(Step(kind, start, n_tokens))
        return len(self.steps) - 1

    def to_dict(self) -> dict:
        """Every record as plain lists and numbers, ready for JSON (debugging, benches; answers store summary()).

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
        return _with_place(data, self.doc_end, self.parts, self.ranks)

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        trace = cls([Step(**s) for s in data["steps"]], doc_end=data.get("doc_end"), parts=data.get("parts"),
                    ranks=_ranks(data.get("ranks")))
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

    def summary(self, steps: set[int] | None = None) -> "Summary":
        """What the answer's pages need of this trace, the chosen steps (None: all) summed (Summary)."""
        chosen = [r for r in self.records if steps is None or r.step in steps]
        blocks = Sums.of([(r.layer, r.block_ids, r.block_mass) for r in chosen])
        window = Sums.of([(r.layer, torch.arange(r.window_first, r.window_first + r.window_mass.numel()), r.window_mass)
                          for r in chosen if r.window_mass is not None])
        n = max(len(chosen), 1)
        memory = sum(float(r.block_mass.float().sum()) for r in chosen) / n
        local = sum(float(r.local_mass) for r in chosen) / n
        tokens = {kind: sum(s.n_tokens for s in self.steps if s.kind == kind) for kind in ("prefill", "decode")}
        # Only a positive vote is evidence (Summary.evidence): the rest is stored as 0, which costs 2 bytes.
        votes = None if self.votes is None else self.votes.detach().float().cpu().clamp(min=0)
        pinned = None if self.pinned is None else self.pinned.cpu()
        return Summary(blocks, window, memory, local, tokens, votes, pinned, self.doc_end, self.parts, self.ranks)

    def heat(self, n_layers: int, n_spans: int, steps: set[int] | None = None) -> torch.Tensor:
        """Summary.heat over the chosen steps (None: all)."""
        return self.summary(steps).heat(n_layers, n_spans)

    def evidence(self, n_spans: int) -> list[int]:
        return self.summary().evidence(n_spans)


@dataclass(slots=True)
class Sums:
    """Attention mass summed per (layer, span) over a trace's steps: one entry per pair that was attended."""
    layer: torch.Tensor     # [n] long
    span: torch.Tensor      # [n] long
    mass: torch.Tensor      # [n] float32

    @classmethod
    def of(cls, parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> "Sums":
        """parts: (layer, span ids [k], mass [k]) per record."""
        if not parts:
            return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        layer = torch.cat([torch.full((ids.numel(),), layer, dtype=torch.long) for layer, ids, _ in parts])
        span = torch.cat([ids.cpu() for _, ids, _ in parts])
        mass = torch.cat([m.detach().float().cpu() for _, _, m in parts])
        width = int(span.max()) + 1 if span.numel() else 1
        keys, inverse = torch.unique(layer * width + span, return_inverse=True)
        return cls(keys // width, keys % width, torch.zeros(keys.numel()).index_add_(0, inverse, mass))

    def add_to(self, heat: torch.Tensor, keep: torch.Tensor) -> None:
        heat.index_put_((self.layer[keep], self.span[keep]), self.mass[keep], accumulate=True)

    def to_dict(self) -> dict:
        return {"layer": self.layer.tolist(), "span": self.span.tolist(), "mass": [round(x, 5) for x in self.mass.tolist()]}

    @classmethod
    def from_dict(cls, data: dict) -> "Sums":
        return cls(torch.tensor(data["layer"], dtype=torch.long), torch.tensor(data["span"], dtype=torch.long),
                   torch.tensor(data["mass"], dtype=torch.float32))


@dataclass
class Summary:
    """What is stored with an answer: the heatmap's sums, the figures' means and the evidence order.

    A Trace keeps a record per layer and step (~30 × the answer's tokens of them: ~340 KB of JSON for an
    answer of the default length); the pages only ever show their sums over the answer. Trace.to_dict
    keeps the full record for debugging (ReadingService's full_traces); load() reads either.
    """
    blocks: Sums                  # spans are memory block ids (those from n_blocks on were formed while answering)
    window: Sums                  # spans are the document's span ids in the local window
    memory_share: float           # mean share of a step's attention on the retrieved blocks, over layers and steps
    window_share: float           # ... on the local window
    tokens: dict[str, int]        # {"prefill": tokens read with the question, "decode": tokens generated}
    votes: torch.Tensor | None = None     # [spans] >= 0: the question focus's evidence (Trace.votes)
    pinned: torch.Tensor | None = None
    doc_end: int | None = None
    parts: list[int] | None = None
    ranks: dict[int, dict[str, int]] | None = None

    @classmethod
    def load(cls, data: dict) -> "Summary":
        """A stored trace: a summary (to_dict), or a full trace (Trace.to_dict: debugging, or stored before
        summaries)."""
        if "records" in data:
            return Trace.from_dict(data).summary()
        votes, pinned = data.get("votes"), data.get("pinned")
        return cls(Sums.from_dict(data["blocks"]), Sums.from_dict(data["window"]), data["memory_share"],
                   data["window_share"], dict(data["tokens"]), None if votes is None else torch.tensor(votes),
                   None if pinned is None else torch.tensor(pinned, dtype=torch.long), data.get("doc_end"),
                   data.get("parts"), _ranks(data.get("ranks")))

    def to_dict(self) -> dict:
        data = {"blocks": self.blocks.to_dict(), "window": self.window.to_dict(),
                "memory_share": round(self.memory_share, 5), "window_share": round(self.window_share, 5),
                "tokens": self.tokens,
                "votes": None if self.votes is None else [round(x, 6) if x > 0 else 0 for x in self.votes.tolist()],
                "pinned": None if self.pinned is None else self.pinned.tolist()}
        return _with_place(data, self.doc_end, self.parts, self.ranks)

    @property
    def n_layers(self) -> int:
        return max((int(s.layer.max()) for s in (self.blocks, self.window) if s.layer.numel()), default=-1) + 1

    def retrieved(self) -> set[int]:
        """The spans that some layer retrieved or re-read."""
        return set(self.blocks.span.tolist())

    def heat(self, n_layers: int, n_spans: int) -> torch.Tensor:
        """[n_layers, n_spans]: attention mass each span received, summed over the answer's steps: as a
        retrieved or re-read span, and in the local window.

        Spans from n_spans on are no document's: blocks formed from the question and the answer while
        answering. They are left out.
        """
        heat = torch.zeros(n_layers, n_spans)
        for sums in (self.blocks, self.window):
            sums.add_to(heat, sums.span < n_spans)
        return heat

    def evidence_weights(self, n_spans: int) -> tuple[torch.Tensor, str]:
        """Each span's weight as evidence for the answer, and what it is ("vote" or "mass").

        With a question focus it is the vote (infllm_engine.evidence): spans of the memory blocks and of
        the local window alike, so a fact read in the window is cited too. Without one (plain InfLLM, or
        answers stored before the focus) it is the attention mass each span received as a retrieved block,
        summed over layers and steps. On bench.needle the vote put the fact first for 100 of 100 correct
        answers, the summed mass for 60 of them: the bottom layers pour mass on the same early blocks
        whatever the question.
        """
        if self.votes is not None:
            return self.votes, "vote"
        heat = torch.zeros(max(self.n_layers, 1), n_spans)
        self.blocks.add_to(heat, self.blocks.span < n_spans)
        return heat.sum(0), "mass"

    def evidence(self, n_spans: int) -> list[int]:
        """The spans that hold the answer's evidence, most likely first (citations, passages)."""
        weight, _ = self.evidence_weights(n_spans)
        return [int(i) for i in weight.argsort(descending=True, stable=True) if weight[i] > 0]


def _with_place(data: dict, doc_end: int | None, parts: list[int] | None,
                ranks: dict[int, dict[str, int]] | None = None) -> dict:
    """A stored trace's doc_end, parts and ranks, only where set: traces stored before them have none of these
    keys, and reading one back must give the same dict."""
    if doc_end is not None:
        data["doc_end"] = doc_end
    if parts is not None:
        data["parts"] = list(parts)
    if ranks is not None:
        data["ranks"] = {str(span): dict(r) for span, r in ranks.items()}
    return data


def _ranks(stored: dict | None) -> dict[int, dict[str, int]] | None:
    """Stored ranks (JSON keys are strings) back to span -> name -> rank."""
    return None if stored is None else {int(span): dict(r) for span, r in stored.items()}
