"""Our own prefill/decode loop (gpt-fast style plain functions): chunked, traced, streaming.

transformers' generate() cannot pass our per-step state, chunk the prefill or skip the LM head, so
the model is driven directly: base model forward with zero position ids, LM head on the last row.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import NoRepeatNGramLogitsProcessor

from .attention import ForwardState
from .config import InfLLMConfig
from .focus import Focus
from .memory import ContextMemory
from .rope import Rotary
from .trace import Trace


@torch.inference_mode()
def forward_chunk(model, memory: ContextMemory, rope: Rotary, ids: torch.Tensor, trace: Trace | None, kind: str,
                  want_logits: bool, focus: Focus | None = None, cfg: InfLLMConfig | None = None) -> torch.Tensor | None:
    """Run ids [n] through the model at positions memory.length ..; returns last-row logits [V] if asked.

    cfg: this call's knobs (default: the memory's own); they travel in the forward state, never on the memory.
    """
    step = trace.begin(kind, memory.length, ids.shape[0]) if trace is not None else -1
    state = ForwardState(memory, cfg or memory.cfg, rope, memory.length, trace, step, focus)
    zeros = torch.zeros(1, ids.shape[0], dtype=torch.long, device=ids.device)
    hidden = model.base_model(input_ids=ids[None], position_ids=zeros, use_cache=False, infllm=state).last_hidden_state
    memory.length += ids.shape[0]
    if not want_logits:
        return None
    return model.get_output_embeddings()(hidden[0, -1]).float()


def prefill(model, memory: ContextMemory, rope: Rotary, ids: torch.Tensor, trace: Trace | None = None,
            progress: Callable[[int, int], None] | None = None, want_logits: bool = True,
            focus: Focus | None = None, cfg: InfLLMConfig | None = None) -> torch.Tensor | None:
    """Feed ids [n] in chunks of cfg.chunk_size, aligned to absolute positions so that a text read in
    pieces (document, then question) is chunked exactly as if read at once. Returns last logits [V]."""
    size = memory.cfg.chunk_size
    done, logits = 0, None
    while done < ids.shape[0]:
        n = min(size - memory.length % size, ids.shape[0] - done)
        last = done + n == ids.shape[0]
        logits = forward_chunk(model, memory, rope, ids[done: done + n], trace, "prefill", want_logits and last, focus,
                               cfg)
        done += n
        if progress is not None:
            progress(done, ids.shape[0])
    return logits


def decode(model, memory: ContextMemory, rope: Rotary, logits: torch.Tensor, max_new_tokens: int,
           stop_ids: set[int], trace: Trace | None = None, temperature: float = 0.0,
           generator: torch.Generator | None = None, focus: Focus | None = None,
           no_repeat_ngram: int = 0, cfg: InfLLMConfig | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens token ids, one forward per token; greedy unless temperature > 0.

    no_repeat_ngram: transformers' n-gram block, which keeps a greedy small model out of loops (0: off). It
    sees only the ids generated here, not the prompt: blocking the document's or the question's n-grams
    would stop the model from copying a fact or a name out of them.
    """
    guard = NoRepeatNGramLogitsProcessor(no_repeat_ngram) if no_repeat_ngram else None
    answer = torch.zeros(1, 0, dtype=torch.long, device=logits.device)      # [1, n] the ids so far, for the guard
    for i in range(max_new_tokens):
        if guard is not None and answer.shape[1]:
            logits = guard(answer, logits[None])[0]         # logits: [V] -> the processors' [batch=1, V]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        else:
            next_id = torch.argmax(logits).view(1)
        # The step's one read back to the host: the text streams, and a stop token ends the answer. The
        # next forward takes the id where it is (no copy back to the device).
        token = int(next_id)
        if token in stop_ids:
            return
        answer = torch.cat([answer, next_id.view(1, 1)], 1)
        yield token
        if i + 1 < max_new_tokens:
            logits = forward_chunk(model, memory, rope, next_id, trace, "decode", want_logits=True, focus=focus,
                                   cfg=cfg)
