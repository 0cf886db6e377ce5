"""InfLLM attention, registered with transformers' AttentionInterface as "infllm".

The model runs with all-zero position ids (HF's rotation is then the identity) and hands us raw
q/k/v; the engine's loop passes the per-call state as the keyword `infllm`. For a chunk of queries at
positions [s, e) and a query p:
  local stage   keys j with p - n_local < j <= p, at their real relative positions;
  global stage  sinks, the retrieved blocks and not-yet-blocked tokens with j <= p - n_local, all at
                one fixed distance (query rotated to n_local, keys at 0).
The two masks are exact complements over the keys a query may see, so no key is counted twice at
chunk boundaries (the reference code's global mask is off by up to a chunk there). The stages merge
by log-sum-exp into one exact softmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import attention_stage, mask_bias, merge_stages, received_mass

from .config import InfLLMConfig
from .errors import EngineError
from .memory import ContextMemory, DenseLayer, LayerMemory
from .rope import Rotary
from .trace import Retrieval, Trace


@dataclass(slots=True)
class ForwardState:
    """What one model forward over a chunk needs besides the hidden states."""

    memory: ContextMemory
    rope: Rotary
    start: int                  # absolute position of the chunk's first token
    trace: Trace | None
    step: int
    # Masks depend on positions only, and block formation is in step across layers: build once per chunk.
    masks: dict = field(default_factory=dict)

    def bias(self, name: str, make) -> torch.Tensor | None:
        if name not in self.masks:
            self.masks[name] = make()
        return self.masks[name]


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
    cfg: InfLLMConfig = state.memory.cfg
    rope, n_local = state.rope, cfg.n_local
    h, c, d = q.shape
    hkv = k.shape[0]
    g = h // hkv
    s = state.start
    e = s + c
    layer.append(k, v)
    keep_mass = cfg.method == "infllm"            # representatives need what each window token received
    tracing = keep_mass and state.trace is not None

    # Local stage: the window [lo, e) at real relative positions (shifted so lo sits at 0).
    lo = max(0, s - n_local + 1)
    k_loc, v_loc = layer.span(lo, e)

    def local_mask():
        rel = torch.arange(s, e, device=q.device)[:, None] - torch.arange(lo, e, device=q.device)[None, :]
        return mask_bias((rel >= 0) & (rel < n_local), g) if c > 1 else None
    local = attention_stage(rope.apply(q, s - lo).view(hkv, g, c, d), rope.apply(k_loc, 0), v_loc,
                            state.bias("local", local_mask), scale, keep_scores=keep_mass)

    # Global stage: memory at the fixed distance n_local; keys keep their raw (position 0) form.
    q_glob = rope.apply_at(q, n_local)
    k_old, v_old, old_pos = layer.old(e - n_local)
    ids, n_blk = None, 0
    if keep_mass and cfg.topk > 0 and layer.blocks.n > 0:
        ids, scores = layer.blocks.retrieve(q_glob.mean(dim=1), cfg.topk)
        k_blk, v_blk = layer.blocks.gather(ids)
        n_blk = k_blk.shape[1]
        k_old, v_old = torch.cat([k_blk, k_old], 1), torch.cat([v_blk, v_old], 1)

    def global_mask():
        if c == 1:
            return None
        visible = old_pos[None, :] <= torch.arange(s, e, device=q.device)[:, None] - n_local
        return mask_bias(torch.cat([visible.new_ones(c, n_blk), visible], 1), g)
    far = attention_stage(q_glob.view(hkv, g, c, d), k_old, v_old, state.bias(f"global{n_blk}", global_mask),
                          scale, keep_scores=tracing)

    out, lse = merge_stages(local, far)
    if keep_mass:
        layer.add_mass(lo, received_mass(local, lse).reshape(h, -1).float())
    if tracing and ids is not None:
        mass = received_mass(far, lse, slice(0, n_blk)).sum(dim=(0, 1)) / (h * c)
        state.trace.records.append(Retrieval(
            layer_idx, state.step, ids, scores, mass.view(-1, cfg.block_size).sum(-1), torch.exp(local.lse - lse).mean()))
    layer.evict(e - n_local)
    return out.reshape(h, c, d)
