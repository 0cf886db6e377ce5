"""InfLLM attention, registered with transformers' AttentionInterface as "infllm".

The model runs with all-zero position ids (HF's rotation is then the identity) and hands us raw
q/k/v; the engine's loop passes the per-call state as the keyword `infllm`. For a chunk of queries at
positions [s, e) and a query p:
  window  keys j with p - n_local < j <= p, at their real relative positions;
  memory  sinks, the retrieved blocks and not-yet-blocked tokens with j <= p - n_local, all at one
          fixed distance (query rotated to n_local, keys at 0).
The two rules are exact complements over the keys a query may see, so no key is counted twice at
chunk boundaries (the reference code's global mask is off by up to a chunk there), and one softmax
covers both (kernels.chunk: the torch twin on the CPU, Triton on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import Keys, chunk_attention

from .config import InfLLMConfig
from .errors import EngineError
from .evidence import Evidence
from .memory import ContextMemory, DenseLayer, LayerMemory
from .probe import Probe
from .rope import Rotary
from .trace import Retrieval, Trace


@dataclass(slots=True)
class ForwardState:
    """What one model forward over a chunk needs besides the hidden states."""

    memory: ContextMemory
    cfg: InfLLMConfig           # the knobs of this call (topk, kernels...); the memory's layout must match
    rope: Rotary
    start: int                  # absolute position of the chunk's first token
    trace: Trace | None
    step: int
    probe: Probe | None = None          # a question's probe: its words vote (infllm_engine.probe)
    evidence: Evidence | None = None    # an answer's: the ranges it re-reads (infllm_engine.evidence)
    first_span: int = 0         # the span id of this memory's span 0, spans numbered over the memories asked


def infllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, infllm=None, **kwargs):
    # query: [1, H, C, d]   key, value: [1, Hkv, C, d]   (un-rotated)   -> out [1, C, H, d], no weights
    if infllm is None:
        raise EngineError("the infllm attention runs only inside the engine's prefill/decode loop")
    if query.shape[0] != 1:
        raise EngineError("the infllm engine reads one sequence at a time (batch size 1)")
    state: ForwardState = infllm
    layer = state.memory.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(layer, DenseLayer):
        out = _full(layer, query[0], key[0], value[0], state, scale)
    else:
        out = _infllm(layer, module.layer_idx, query[0], key[0], value[0], state, scale)
    return out.transpose(0, 1).unsqueeze(0), None


def _full(layer: DenseLayer, q, k, v, state: ForwardState, scale: float) -> torch.Tensor:
    """The model's own attention: true positions, every past key (sdpa, as HF would run it)."""
    s, c = state.start, q.shape[1]
    keys, values = layer.append(state.rope.apply(k, s), v)
    q = state.rope.apply(q, s)
    mask = None
    if c > 1:
        mask = torch.arange(s + c, device=q.device)[None, :] <= torch.arange(s, s + c, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


def _infllm(layer: LayerMemory, layer_idx: int, q, k, v, state: ForwardState, scale: float) -> torch.Tensor:
    cfg = state.cfg
    rope, n_local = state.rope, cfg.n_local
    h, c, d = q.shape
    g = h // k.shape[0]
    s, e = state.start, state.start + c
    layer.append(k, v)
    keep_mass = cfg.method == "infllm"            # representatives need what each window token received
    tracing = keep_mass and state.trace is not None

    q_global = rope.apply_at(q, n_local)
    probe, evidence = state.probe, state.evidence if keep_mass else None
    # A document shorter than the window has no blocks, but its window is voted on all the same (quotes).
    if probe is not None and keep_mass and (layer.blocks.n > 0 or probe.doc_end > layer.r0):
        tail = layer.recent_k[:, : max(0, probe.doc_end - layer.r0)]
        probe.vote(layer_idx, q_global, s, layer.blocks.keys(), tail, scale)
    near = evidence.keys(layer_idx, rope, n_local) if evidence is not None and evidence.reads else None
    # Window [lo, e) at real relative positions; memory at the fixed distance n_local, keys raw (position 0).
    # Evidence read alone leaves out the document's recent tokens (and sinks-side recent ones) but the question.
    alone = near is not None and evidence.alone
    lo = max(0, s - n_local + 1, evidence.doc_end if alone else 0)
    k_win, v_win, base = layer.window(lo, e, rope)
    q_local = rope.apply(q, s - base).view(-1, g, c, d)
    memory = layer.memory(layer.r0 if alone else e - n_local)
    # An answer with evidence re-reads it instead of retrieving (also when it re-reads nothing: its
    # evidence is in the window); plain InfLLM, and the probe, retrieve per layer.
    ids = None
    if keep_mass and evidence is None and cfg.topk > 0 and layer.blocks.n > 0:
        ids, scores = layer.blocks.retrieve(q_global.mean(dim=1), cfg.topk, cfg.kernels)
        k_blk, v_blk, slot_ids = layer.blocks.gather(ids, reuse=c == 1)
        memory.append(Keys(k_blk, v_blk, None))
    if near is not None:
        memory.append(near)
    res = chunk_attention(q_local, q_global.view(-1, g, c, d), s, Keys(k_win, v_win, lo), memory, n_local,
                          scale, window_mass=keep_mass, memory_mass=tracing, backend=cfg.kernels, exact_mass=tracing)
    if keep_mass:
        layer.add_mass(lo, res.window_mass.reshape(h, -1))
    if tracing:
        own = (ids, scores, slot_ids) if ids is not None else None
        _record(state, layer_idx, res, lo, own, evidence if near is not None else None, cfg)
    layer.evict(e - n_local)
    return res.out.reshape(h, c, d)


def _record(state: ForwardState, layer_idx: int, res, lo: int, own, evidence: Evidence | None,
            cfg: InfLLMConfig) -> None:
    """One trace record: the spans the step attended, by id (numbered over the memories asked), with the
    share of its attention each got: the re-read ranges, or the layer's own retrieved blocks; and the
    document's spans in the window [lo, ..). Nothing when the step attended none of them.

    The memory parts' masses come last: the layer's own blocks, then the re-read ranges.
    """
    h, c, bs = res.out.shape[0] * res.out.shape[1], res.out.shape[2], cfg.block_size
    per_key = res.window_mass.sum(dim=(0, 1)) / (h * c)          # [N] share of each window key, lo ..
    first, window = _window_spans(per_key, lo, state.trace.doc_end, cfg.n_init, bs)
    if own is None and evidence is None and window is None:
        return
    masses, dev = list(res.memory_mass), res.out.device
    if evidence is not None:
        lengths = [r.end - r.start for r in evidence.reads]
        mass = torch.stack([m.sum() for m in masses.pop().sum(dim=(0, 1)).split(lengths)]) / (h * c)
        ids = evidence.pinned.to(dev)
        scores = evidence.scores[evidence.pinned].to(dev, torch.float32)
    elif own is not None:
        ids, scores, slot_ids = own
        per_block = masses.pop().sum(dim=(0, 1)).view(-1, bs).sum(-1) / (h * c)
        ids, scores, mass = ids + state.first_span, scores.float(), per_block[torch.argsort(slot_ids)]   # ascending
    else:
        empty = res.out.new_zeros(0, dtype=torch.float32)
        ids, scores, mass = empty.long(), empty, empty
    state.trace.records.append(Retrieval(layer_idx, state.step, ids, scores, mass, per_key.sum(),
                                         first + state.first_span, window))


def _window_spans(per_key: torch.Tensor, lo: int, doc_end: int | None, n_init: int, bs: int):
    """Mass of the window keys [lo, lo + N) summed per span of the document: (first span id, [w]) or (0, None).

    Span i holds positions n_init + i*bs .. (ContextMemory.block_span), so the spans in the window take
    the ids after the memory blocks (Library.spans). Sinks and positions from doc_end on are in no span.
    """
    a, b = max(lo, n_init), min(lo + per_key.numel(), doc_end or 0)
    if a >= b:
        return 0, None
    first = (a - n_init) // bs
    skip = a - (n_init + first * bs)                     # the first span may have left the window in part
    n = -(-(skip + b - a) // bs)
    padded = F.pad(per_key[a - lo: b - lo], (skip, n * bs - skip - (b - a)))
    return first, padded.view(n, bs).sum(-1)
