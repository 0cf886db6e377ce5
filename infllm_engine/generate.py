"""Our own prefill/decode loop (gpt-fast style plain functions): chunked, traced, streaming.

transformers' generate() cannot pass our per-step state, chunk the prefill or skip the LM head, so
the model is driven directly: base model forward with zero position ids, LM head on the last row.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import NoRepeatNGramLogitsProcessor

from .attention import ForwardState
from .config import InfLLMConfig
from .evidence import Evidence
from .memory import ContextMemory
from .probe import Probe
from .rope import Rotary
from .trace import Trace


@dataclass(frozen=True, slots=True)
class Call:
    """What travels with every forward of one call besides the tokens: its knobs, and a question's probe or
    evidence. cfg None: the memory's own."""

    cfg: InfLLMConfig | None = None
    trace: Trace | None = None
    probe: Probe | None = None
    evidence: Evidence | None = None
    first_span: int = 0             # the memory's span 0 among the spans of every memory asked


@torch.inference_mode()
def forward_chunk(model, memory: ContextMemory, rope: Rotary, ids: torch.Tensor, kind: str, want_logits: bool,
                  call: Call = Call()) -> torch.Tensor | None:
    """Run ids [n] through the model at positions memory.length ..; returns last-row logits [V] if asked."""
    trace = call.trace
    step = trace.begin(kind, memory.length, ids.shape[0]) if trace is not None else -1
    state = ForwardState(memory, call.cfg or memory.cfg, rope, memory.length, trace, step, call.probe, call.evidence,
                         call.first_span)
    zeros = torch.zeros(1, ids.shape[0], dtype=torch.long, device=ids.device)
    hidden = model.base_model(input_ids=ids[None], position_ids=zeros, use_cache=False, infllm=state).last_hidden_state
    memory.length += ids.shape[0]
    if not want_logits:
        return None
    return model.get_output_embeddings()(hidden[0, -1]).float()


def prefill(model, memory: ContextMemory, rope: Rotary, ids: torch.Tensor, call: Call = Call(),
            progress: Callable[[int, int], None] | None = None, want_logits: bool = True) -> torch.Tensor | None:
    """Feed ids [n] in chunks of cfg.chunk_size, aligned to absolute positions so that a text read in
    pieces (document, then question) is chunked exactly as if read at once. Returns last logits [V]."""
    size = memory.cfg.chunk_size
    done, logits = 0, None
    while done < ids.shape[0]:
        n = min(size - memory.length % size, ids.shape[0] - done)
        last = done + n == ids.shape[0]
        logits = forward_chunk(model, memory, rope, ids[done: done + n], "prefill", want_logits and last, call)
        done += n
        if progress is not None:
            progress(done, ids.shape[0])
    return logits


def decode(model, memory: ContextMemory, rope: Rotary, logits: torch.Tensor, max_new_tokens: int,
           stop_ids: set[int], call: Call = Call(), no_repeat_ngram: int = 0) -> Iterator[int]:
    """Yield up to max_new_tokens token ids, greedy, one forward per token.

    no_repeat_ngram: transformers' n-gram block, which keeps a greedy small model out of loops (0: off). It
    sees only the ids generated here, not the prompt: blocking the document's or the question's n-grams
    would stop the model from copying a fact or a name out of them.
    """
    guard = NoRepeatNGramLogitsProcessor(no_repeat_ngram) if no_repeat_ngram else None
    answer = torch.zeros(1, 0, dtype=torch.long, device=logits.device)      # [1, n] the ids so far, for the guard
    for i in range(max_new_tokens):
        if guard is not None and answer.shape[1]:
            logits = guard(answer, logits[None])[0]         # logits: [V] -> the processors' [batch=1, V]
        next_id = torch.argmax(logits).view(1)
        # The step's one read back to the host: the text streams, and a stop token ends the answer. The
        # next forward takes the id where it is (no copy back to the device).
        token = int(next_id)
        if token in stop_ids:
            return
        answer = torch.cat([answer, next_id.view(1, 1)], 1)
        yield token
        if i + 1 < max_new_tokens:
            logits = forward_chunk(model, memory, rope, next_id, "decode", want_logits=True, call=call)
