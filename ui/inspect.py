"""What an answer retrieved: heatmap over layers x document position, top passages and figures.

Pure functions from a stored trace (Trace.to_dict) and the document's block rows to HTML. The
heatmap is SVG rather than a plotly figure because each cell must be clickable: a click on a cell
or a passage carries its block id back to the server (see CLICKS, run by the browser).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import torch

from infllm_engine import Trace

MAX_COLUMNS = 240      # wider documents are binned: one column covers several neighbouring blocks
PALETTE = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]

# Runs once in the browser (gr.HTML js_on_load): a click on anything carrying data-block selects it.
CLICKS = """
element.addEventListener('click', (event) => {
  const hit = event.target.closest('[data-block]');
  if (hit) trigger('select', {index: Number(hit.dataset.block), value: hit.dataset.block});
});
"""


@dataclass(slots=True)
class Figures:
    blocks_retrieved: int       # distinct document blocks retrieved by any layer at any step
    n_blocks: int
    memory_share: float         # mean share of attention on retrieved blocks, over layers and steps
    window_share: float         # ... on the local window; the rest went to sinks and unblocked tokens
    tokens_per_s: float
    first_token_s: float


def heat(trace: dict, n_layers: int, n_blocks: int) -> torch.Tensor:
    """[n_layers, n_blocks]: attention mass each block received, summed over the answer's steps.

    A block retrieved often and attended strongly is hot; one retrieved but ignored stays cool.
    """
    return Trace.from_dict(trace).heat(n_layers, n_blocks)


def figures(trace: dict, timings: dict | None, n_blocks: int) -> Figures:
    records = trace["records"]
    seen = {b for r in records for b in r["block_ids"] if b < n_blocks}
    memory = sum(sum(r["block_mass"]) for r in records) / max(len(records), 1)
    window = sum(r["local_mass"] for r in records) / max(len(records), 1)
    timings = timings or {}
    return Figures(len(seen), n_blocks, memory, window, timings.get("decode_tokens_per_s", 0.0),
                   timings.get("first_token_s", 0.0))


def page_label(block: dict, pages: list[dict]) -> str:
    first, last = pages[block["first_page"] - 1]["label"], pages[block["last_page"] - 1]["label"]
    return first if first == last else f"{first} – {last}"


def passages(trace: dict, spans: list[dict], pages: list[dict], k: int = 5) -> list[dict]:
    """The k spans that hold the answer's evidence, best first (Trace.evidence), with pages and text.

    spans: Library.spans rows, memory blocks first and then the local window's pieces.
    """
    n_blocks = sum(1 for r in spans if r.get("in_memory", 1))
    t = Trace.from_dict(trace)
    weight, by = t.evidence_weights(n_blocks)
    order = [i for i in t.evidence(n_blocks) if i < len(spans)][:k]
    return [{"block": i, "pages": page_label(spans[i], pages), "weight": float(weight[i]),
             "by": by, "in_memory": bool(spans[i].get("in_memory", 1)),
             "text": spans[i].get("text") or ""} for i in order]


def citation(trace: dict | None, spans: list[dict], pages: list[dict]) -> str:
    """The answer's inline citation, e.g. "(p. 61)": the page of its first evidence span; "" without one."""
    if not trace or not spans:
        return ""
    best = passages(trace, spans, pages, k=1)
    if not best:
        return ""
    where = best[0]["pages"]
    return f"({where})" if where.startswith("p.") else f"(see {where})"


def _colour(x: float) -> str:
    """x in [0, 1] to a sequential blue scale."""
    x = min(max(x, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(x), len(PALETTE) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(PALETTE[i], PALETTE[i + 1]))
    return f"rgb({r},{g},{b})"


def heatmap_svg(heat_map: torch.Tensor, blocks: list[dict], pages: list[dict]) -> str:
    n_layers, n_blocks = heat_map.shape
    if n_blocks == 0:
        return "<p class='muted'>This document is shorter than the local window: nothing was evicted to memory.</p>"
    per_col = math.ceil(n_blocks / MAX_COLUMNS)
    cols = math.ceil(n_blocks / per_col)
    padded = torch.zeros(n_layers, cols * per_col)
    padded[:, :n_blocks] = heat_map
    binned = padded.view(n_layers, cols, per_col)
    value, arg = binned.max(-1)     # a binned cell shows (and opens) its hottest block
    top = float(value.max()) or 1.0
    cw, ch, left, bottom = max(2.5, 560 / cols), 8.0, 34.0, 30.0
    width, height = left + cols * cw + 8, n_layers * ch + bottom
    parts = [f"<svg class='heatmap' viewBox='0 0 {width:.0f} {height:.0f}' "
             f"role='img' aria-label='retrieval heatmap'>",
             f"<rect x='{left}' y='0' width='{cols * cw}' height='{n_layers * ch}' fill='{_colour(0)}'/>"]
    for layer in range(n_layers):
        y = (n_layers - 1 - layer) * ch          # layer 0 at the bottom, like a network diagram
        for col in torch.nonzero(value[layer] > 0).flatten().tolist():
            block = col * per_col + int(arg[layer, col])
            tip = f"layer {layer} · block {block} · {page_label(blocks[block], pages)} · mass {float(value[layer, col]):.3f}"
            parts.append(f"<rect class='cell' data-block='{block}' x='{left + col * cw:.1f}' y='{y:.1f}' "
                         f"width='{cw}' height='{ch}' fill='{_colour(float(value[layer, col]) / top)}'>"
                         f"<title>{html.escape(tip)}</title></rect>")
    for layer in range(0, n_layers, 5):
        y = (n_layers - 1 - layer) * ch + ch * 0.8
        parts.append(f"<text x='{left - 4}' y='{y:.1f}' class='tick' text-anchor='end'>{layer}</text>")
    for t in range(6):
        col = min(cols - 1, round(t * (cols - 1) / 5))
        label = html.escape(pages[blocks[col * per_col]["first_page"] - 1]["label"])
        parts.append(f"<text x='{left + (col + 0.5) * cw:.1f}' y='{n_layers * ch + 12}' class='tick' "
                     f"text-anchor='middle'>{label}</text>")
    parts.append(f"<text x='{left + cols * cw / 2:.1f}' y='{height - 3:.0f}' class='axis' text-anchor='middle'>"
                 f"position in the document (pages) →</text>")
    parts.append(f"<text x='8' y='{n_layers * ch / 2:.0f}' class='axis' text-anchor='middle' "
                 f"transform='rotate(-90 8 {n_layers * ch / 2:.0f})'>layer</text></svg>")
    return "".join(parts)


NOTHING_YET = "<div class='inspector muted'>Ask a question: the blocks each layer retrieved for the answer show here.</div>"


def render(trace: dict | None, timings: dict | None, spans: list[dict], pages: list[dict], n_layers: int,
           method: str = "infllm") -> str:
    """The whole inspector for one answer as HTML; spans: Library.spans rows (memory blocks first)."""
    if trace is None:
        return NOTHING_YET
    if method != "infllm":
        return (f"<div class='inspector muted'>This answer used {html.escape(method)} attention, which retrieves "
                "nothing from memory: there is no heatmap. Read the document in infllm mode to see retrieval.</div>")
    blocks = [r for r in spans if r.get("in_memory", 1)]
    heat_map = heat(trace, n_layers, len(blocks))
    f = figures(trace, timings, len(blocks))
    cards = [("blocks retrieved", f"{f.blocks_retrieved} of {f.n_blocks}"),
             ("attention on memory", f"{f.memory_share:.0%}"), ("on the local window", f"{f.window_share:.0%}"),
             ("decode", f"{f.tokens_per_s:.1f} tok/s"), ("first token", f"{f.first_token_s:.2f} s")]
    parts = ["<div class='inspector'><div class='figures'>"]
    parts += [f"<div class='figure'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>" for k, v in cards]
    parts.append(f"</div>{heatmap_svg(heat_map, blocks, pages)}<ol class='passages'>")
    for p in passages(trace, spans, pages):
        snippet = " ".join(p["text"].split())[:220]
        where = f"block {p['block']}" if p["in_memory"] else "local window"
        parts.append(f"<li data-block='{p['block']}'><span class='where'>{html.escape(p['pages'])} · {where} · "
                     f"{p['by']} {p['weight']:.2f}</span>{html.escape(snippet)}…</li>")
    parts.append("</ol></div>")
    return "".join(parts)


def passage(block: int, spans: list[dict], pages: list[dict]) -> str:
    """Markdown for the full text of one span (a memory block or a piece of the local window)."""
    if not 0 <= block < len(spans):
        return "That block is not part of this document."
    row = spans[block]
    text = row.get("text") or "(the text of this block was not stored; read the document again to see it)"
    return (f"**{page_label(row, pages)}** · block {block} · tokens {row['start_token']:,}–{row['end_token']:,}"
            f"\n\n> {' '.join(text.split())}")
