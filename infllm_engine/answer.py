"""What a question gives: what its probes found (Found), and the answer streamed after it (Answer)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .evidence import Evidence
from .memory import ContextMemory
from .trace import Trace


@dataclass
class Answer:
    """A streamed answer: iterate for text pieces; afterwards text, tokens, trace and timings are set."""

    pieces: Iterator[str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)
    timings: dict[str, float] = field(default_factory=dict)
    # span -> [2, n]: how much attention the question's words (row 0) and the template (row 1) gave each
    # token of the host's best evidence spans (Probe.weigh); set before the first piece. For quotes.
    token_votes: dict[int, torch.Tensor] = field(default_factory=dict)
    # What the model went on to say after the point where it began to loop (stopping.loop_start), cut off
    # there; None when the answer ended otherwise.
    cut: str | None = None
    document: int = 0           # the memory asked that the answer was written after (Evidence.host)
    evidence: Evidence | None = None

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            self.text += piece
            yield piece

    def wait(self) -> "Answer":
        for _ in self:
            pass
        return self


@dataclass
class Found:
    """What a question points to in the memories asked (Engine.find), before any answer is written."""

    memories: list[ContextMemory]
    ids: torch.Tensor                   # [n] the question's tokens (after the earlier turns, if any)
    evidence: Evidence | None           # None: nothing voted (another method, or no question focus)
    attention: list[torch.Tensor | None]    # each memory's own vote (Probe.attention), before any fusion
    token_votes: dict[int, torch.Tensor]    # Answer.token_votes
    seconds: float                      # the probes' time

    @property
    def host(self) -> int:
        return self.evidence.host if self.evidence is not None else 0
