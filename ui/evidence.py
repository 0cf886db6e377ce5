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
from reading.citations import page_label, passages

MAX_COLUMNS = 240      # wider documents are binned: one column covers several neighbouring blocks
PALETTE = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]

# Runs once in the browser (gr.HTML js_on_load): a click on anything carrying data-block selects it.
# The quote carries its characters instead: "chars:a,b" (index -1).
CLICKS = """
element.addEventListener('click', (event) => {
  const hit = event.target.closest('[data-block], [data-chars]');
  if (hit && hit.dataset.chars) trigger('select', {index: -1, value: 'chars:' + hit.dataset.chars});
  else if (hit) trigger('select', {index: Number(hit.dataset.block), value: hit.dataset.block});
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


def heat(trace: dict, n_layers: int, n_blocks: int, n_spans: int | None = None) -> torch.Tensor:
    """[n_layers, n_spans]: attention mass each span received, summed over the answer's steps.

    Columns: the n_blocks memory blocks, then (up to n_spans) the document's spans in the local window.
    A block retrieved often and attended strongly is hot; one retrieved but ignored stays cool.
    """
    return Trace.from_dict(trace).heat(n_layers, n_blocks, n_spans=n_spans)


def figures(trace: dict, timings: dict | None, n_blocks: int) -> Figures:
    records = trace["records"]
    seen = {b for r in records for b in r["block_ids"] if b < n_blocks}
    memory = sum(sum(r["block_mass"]) for r in records) / max(len(records), 1)
    window = sum(r["local_mass"] for r in records) / max(len(records), 1)
    timings = timings or {}
    return Figures(len(seen), n_blocks, memory, window, timings.get("decode_tokens_per_s", 0.0),
                   timings.get("first_token_s", 0.0))


def _colour(x: float) -> str:
    """x in [0, 1] to a sequential blue scale."""
    x = min(max(x, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(x), len(PALETTE) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(PALETTE[i], PALETTE[i + 1]))
    return f"rgb({r},{g},{b})"


def _bins(part: torch.Tensor, first: int, max_cols: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """part [L, n] (spans first ..) binned into at most max_cols columns of neighbouring spans:
    (value [L, cols] the hottest span's mass, span [L, cols] its id, the first span id of each column)."""
    n_layers, n = part.shape
    per_col = math.ceil(n / max_cols)
    cols = math.ceil(n / per_col)
    padded = torch.zeros(n_layers, cols * per_col)
    padded[:, :n] = part
    value, arg = padded.view(n_layers, cols, per_col).max(-1)     # a binned cell shows (and opens) its hottest span
    starts = first + torch.arange(cols) * per_col
    return value, arg + starts, starts.tolist()


def heatmap_svg(heat_map: torch.Tensor, spans: list[dict], pages: list[dict], n_blocks: int | None = None) -> str:
    """heat_map [n_layers, n_spans]: the first n_blocks columns are memory blocks (all by default), the
    rest the document's spans in the local window, drawn after a gap, on a warm ground, labelled."""
    n_layers, n_spans = heat_map.shape
    n_blocks = n_spans if n_blocks is None else n_blocks
    if n_spans == 0:
        return "<p class='muted'>This document is shorter than the local window: nothing was evicted to memory.</p>"
    n_window = n_spans - n_blocks
    # The window has few spans (n_local / block_size): it keeps a column each; memory blocks share the rest.
    win = _bins(heat_map[:, n_blocks:], n_blocks, MAX_COLUMNS // 4) if n_window else None
    mem = _bins(heat_map[:, :n_blocks], 0, MAX_COLUMNS - (len(win[2]) if win else 0)) if n_blocks else None
    regions = [r for r in (mem, win) if r is not None]
    value = torch.cat([r[0] for r in regions], 1)
    span = torch.cat([r[1] for r in regions], 1)
    starts = [x for r in regions for x in r[2]]
    cols, mem_cols = value.shape[1], len(mem[2]) if mem else 0
    top = float(value.max()) or 1.0
    cw, ch, left, bottom = max(2.5, 560 / cols), 8.0, 34.0, 30.0
    gap = 6.0 if mem and win else 0.0
    head = 12.0 if win else 0.0                         # room for the regions' labels
    x_of = lambda col: left + col * cw + (gap if col >= mem_cols else 0.0)
    width, height = x_of(cols) + 8, head + n_layers * ch + bottom
    base = head + n_layers * ch
    parts = [f"<svg class='heatmap' viewBox='0 0 {width:.0f} {height:.0f}' "
             f"role='img' aria-label='retrieval heatmap'>"]
    if mem:
        parts.append(f"<rect x='{left}' y='{head}' width='{mem_cols * cw:.1f}' height='{n_layers * ch}' fill='{_colour(0)}'/>")
    if win:
        x0, w = x_of(mem_cols), (cols - mem_cols) * cw
        parts.append(f"<rect class='window' x='{x0:.1f}' y='{head}' width='{w:.1f}' height='{n_layers * ch}' "
                     f"fill='rgb(255,248,231)'/>")
        parts.append(f"<text x='{x0 + w / 2:.1f}' y='{head - 3:.1f}' class='tick' text-anchor='middle'>local window</text>")
        if mem:
            parts.append(f"<text x='{left + mem_cols * cw / 2:.1f}' y='{head - 3:.1f}' class='tick' "
                         f"text-anchor='middle'>memory</text>")
            parts.append(f"<line x1='{x0 - gap / 2:.1f}' y1='0' x2='{x0 - gap / 2:.1f}' y2='{base:.1f}' "
                         f"stroke='#888' stroke-dasharray='2 2'/>")
    for layer in range(n_layers):
        y = head + (n_layers - 1 - layer) * ch          # layer 0 at the bottom, like a network diagram
        for col in torch.nonzero(value[layer] > 0).flatten().tolist():
            block, mass = int(span[layer, col]), float(value[layer, col])
            where = f"block {block}" if block < n_blocks else "local window"
            tip = f"layer {layer} · {where} · {page_label(spans[block], pages)} · mass {mass:.3f}"
            cls = "cell" if block < n_blocks else "cell window"
            parts.append(f"<rect class='{cls}' data-block='{block}' x='{x_of(col):.1f}' y='{y:.1f}' "
                         f"width='{cw}' height='{ch}' fill='{_colour(mass / top)}'>"
                         f"<title>{html.escape(tip)}</title></rect>")
    for layer in range(0, n_layers, 5):
        y = head + (n_layers - 1 - layer) * ch + ch * 0.8
        parts.append(f"<text x='{left - 4}' y='{y:.1f}' class='tick' text-anchor='end'>{layer}</text>")
    for col in sorted({min(cols - 1, round(t * (cols - 1) / 5)) for t in range(6)}):
        label = html.escape(pages[spans[starts[col]]["first_page"] - 1]["label"])
        parts.append(f"<text x='{x_of(col) + 0.5 * cw:.1f}' y='{base + 12}' class='tick' "
                     f"text-anchor='middle'>{label}</text>")
    parts.append(f"<text x='{(left + x_of(cols)) / 2:.1f}' y='{height - 3:.0f}' class='axis' text-anchor='middle'>"
                 f"position in the document (pages) →</text>")
    parts.append(f"<text x='8' y='{head + n_layers * ch / 2:.0f}' class='axis' text-anchor='middle' "
                 f"transform='rotate(-90 8 {head + n_layers * ch / 2:.0f})'>layer</text></svg>")
    return "".join(parts)


NOTHING_YET = "<div class='inspector muted'>Ask a question: the blocks each layer retrieved for the answer show here.</div>"


def render(trace: dict | None, timings: dict | None, spans: list[dict], pages: list[dict], n_layers: int,
           method: str = "infllm", quote: dict | None = None) -> str:
    """The whole inspector for one answer as HTML; spans: Library.spans rows (memory blocks first)."""
    if trace is None:
        return NOTHING_YET
    quoted = "" if not quote else (
        f"<blockquote class='quote' data-chars='{quote['chars'][0]},{quote['chars'][1]}' title='show the page'>"
        f"“{html.escape(quote['text'])}” <span class='where'>{html.escape(quote['page'])} · show the page</span>"
        "</blockquote>")
    if method != "infllm":
        return (f"<div class='inspector muted'>This answer used {html.escape(method)} attention, which retrieves "
                "nothing from memory: there is no heatmap. Read the document in infllm mode to see retrieval.</div>")
    blocks = [r for r in spans if r.get("in_memory", 1)]
    # Traces stored before the window was traced have memory columns only, as they were drawn then.
    n_spans = len(spans) if trace.get("doc_end") is not None else len(blocks)
    heat_map = heat(trace, n_layers, len(blocks), n_spans)
    f = figures(trace, timings, len(blocks))
    cards = [("blocks retrieved", f"{f.blocks_retrieved} of {f.n_blocks}"),
             ("attention on memory", f"{f.memory_share:.0%}"), ("on the local window", f"{f.window_share:.0%}"),
             ("decode", f"{f.tokens_per_s:.1f} tok/s"), ("first token", f"{f.first_token_s:.2f} s")]
    parts = [f"<div class='inspector'>{quoted}<div class='figures'>"]
    parts += [f"<div class='figure'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>" for k, v in cards]
    parts.append(f"</div>{heatmap_svg(heat_map, spans, pages, len(blocks))}<ol class='passages'>")
    for p in passages(trace, spans, pages):
        snippet = " ".join(p["text"].split())[:220]
        where = f"block {p['block']}" if p["in_memory"] else "local window"
        parts.append(f"<li data-block='{p['block']}'><span class='where'>{html.escape(p['pages'])} · {where} · "
                     f"{p['by']} {p['share']:.0%}</span>{html.escape(snippet)}…</li>")
    parts.append("</ol></div>")
    return "".join(parts)
