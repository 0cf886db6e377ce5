"""What an answer retrieved: heatmap over layers x document position, top passages and figures.

Pure functions from a stored trace (Summary.to_dict, or a full Trace.to_dict) and the rows of the
documents it asked (reading.citations.Shelf: one document is a shelf of one) to HTML. The heatmap is SVG
rather than a plotly figure because each cell must be clickable: a click on a cell or a passage carries
its span and its document back to the server (see CLICKS, run by the browser).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import torch

from infllm_engine import Summary
from reading.citations import Shelf, page_label, parts, passages, short_title

MAX_COLUMNS = 240      # wider documents are binned: one column covers several neighbouring blocks
SIGNALS = ("attention", "words", "meaning")     # what ranked an evidence passage (infllm_engine.evidence)
PALETTE = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]

# Runs once in the browser (gr.HTML js_on_load): a click on anything carrying data-block selects it.
# The quote carries its characters instead: "chars:a,b" (index -1). Each names its document: "…@3"
# (handlers.show_source).
CLICKS = """
element.addEventListener('click', (event) => {
  const hit = event.target.closest('[data-block], [data-chars]');
  if (!hit) return;
  const of = '@' + hit.dataset.document;
  if (hit.dataset.chars) trigger('select', {index: -1, value: 'chars:' + hit.dataset.chars + of});
  else trigger('select', {index: Number(hit.dataset.block), value: hit.dataset.block + of});
});
"""


@dataclass(slots=True)
class Figures:
    blocks_retrieved: int       # distinct memory blocks retrieved or re-read by any layer at any step
    n_blocks: int               # memory blocks of the documents asked
    memory_share: float         # mean share of attention on retrieved blocks, over layers and steps
    window_share: float         # ... on the local window; the rest went to sinks and unblocked tokens
    tokens_per_s: float
    first_token_s: float        # from the model taking the question: memories loaded, probes, prefill


def figures(trace: dict, timings: dict | None, documents: Shelf) -> Figures:
    summary = Summary.load(trace)
    timings = timings or {}
    sizes = parts(trace, documents)
    blocks = {sum(sizes[:i]) + j for i, (_, spans, _) in enumerate(documents) if len(spans) == sizes[i]
              for j, span in enumerate(spans) if span["in_memory"]}
    # What the reader waited for once the model took the question: the memories mapped, the question's
    # probes (one per document asked), the quote chosen, the prefill. The engine's first_token_s counts the
    # prefill only.
    waited = sum(timings.get(k, 0.0) for k in ("memory_load_s", "focus_s", "quote_s", "first_token_s"))
    return Figures(len(summary.retrieved() & blocks), len(blocks), summary.memory_share, summary.window_share,
                   timings.get("decode_tokens_per_s", 0.0), waited)


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


@dataclass(slots=True)
class Region:
    """Neighbouring columns of the heatmap, drawn as a group: a document's memory blocks, its local window,
    or (asked across documents) one document's spans."""

    heat: torch.Tensor              # [n_layers, n] the mass of spans first .. first + n - 1
    first: int
    spans: list[dict]               # the document's Library.spans and pages: tooltips and page ticks
    pages: list[dict]
    label: str = ""                 # drawn above the region when there are several (or a window)
    window: bool = False            # the local window: a warm ground, cells of class "cell window"
    document: int = 0               # the document whose spans these are (data-document)
    titled: bool = False            # one document's spans among several: its title begins each cell's tip


def regions(heat_map: torch.Tensor, documents: Shelf, sizes: list[int]) -> list[Region]:
    """The heatmap's column groups. The columns number the documents' spans one document after another
    (Trace.parts). One document: its memory blocks, then its local window's spans. Several: each document's
    spans, labelled with its title. A document deleted since, or whose spans no longer match, is left out."""
    out, offset = [], 0
    for (doc, spans, pages), n in zip(documents, sizes):
        part = heat_map[:, offset:offset + n]
        offset += n
        if not n or len(spans) != n:
            continue
        if len(documents) > 1:
            out.append(Region(part, 0, spans, pages, short_title(doc["title"], 24), document=doc["id"], titled=True))
            continue
        n_blocks = sum(1 for span in spans if span["in_memory"])
        if n_blocks:
            out.append(Region(part[:, :n_blocks], 0, spans, pages, "memory", document=doc["id"]))
        if n > n_blocks:
            out.append(Region(part[:, n_blocks:], n_blocks, spans, pages, "local window", window=True,
                              document=doc["id"]))
    return out


def heatmap_svg(regions: list[Region], axis: str = "position in the document (pages) →") -> str:
    """The regions side by side, separated by a gap and a dashed line; each column a span (or the hottest
    of neighbouring spans, when there are more than MAX_COLUMNS), each row a layer."""
    if not regions or not any(r.heat.shape[1] for r in regions):
        return "<p class='muted'>This document is shorter than the local window: nothing was evicted to memory.</p>"
    n_layers = regions[0].heat.shape[0]
    # A window has few spans (n_local / block_size): it keeps a column each; the other regions share the
    # rest in proportion to their spans.
    window_cols = {i: min(r.heat.shape[1], MAX_COLUMNS // 4) for i, r in enumerate(regions) if r.window}
    rest = sum(r.heat.shape[1] for i, r in enumerate(regions) if i not in window_cols) or 1
    room = MAX_COLUMNS - sum(window_cols.values())
    binned = [_bins(r.heat, r.first, window_cols.get(i) or max(1, room * r.heat.shape[1] // rest))
              for i, r in enumerate(regions)]
    value = torch.cat([b[0] for b in binned], 1)
    span = torch.cat([b[1] for b in binned], 1)
    starts = [x for b in binned for x in b[2]]
    owner = [i for i, b in enumerate(binned) for _ in b[2]]          # each column's region
    cols = value.shape[1]
    top = float(value.max()) or 1.0
    cw, ch, left, bottom = max(2.5, 560 / cols), 8.0, 34.0, 30.0
    gap = 6.0                                           # between regions
    labelled = len(regions) > 1 or regions[0].window
    head = 12.0 if labelled else 0.0                    # room for the regions' labels
    xs = [left + col * cw + owner[col] * gap for col in range(cols)]
    right = xs[-1] + cw
    width, height = right + 8, head + n_layers * ch + bottom
    base = head + n_layers * ch
    svg = [f"<svg class='heatmap' viewBox='0 0 {width:.0f} {height:.0f}' "
           f"role='img' aria-label='retrieval heatmap'>"]
    first_col = 0
    for i, (r, b) in enumerate(zip(regions, binned)):
        x0, w = xs[first_col], len(b[2]) * cw
        ground = "class='window' " if r.window else ""
        fill = "rgb(255,248,231)" if r.window else _colour(0)
        svg.append(f"<rect {ground}x='{x0:.1f}' y='{head}' width='{w:.1f}' height='{n_layers * ch}' fill='{fill}'/>")
        if labelled:
            svg.append(f"<text x='{x0 + w / 2:.1f}' y='{head - 3:.1f}' class='tick' text-anchor='middle'>"
                       f"{html.escape(r.label)}</text>")
        if i:
            svg.append(f"<line x1='{x0 - gap / 2:.1f}' y1='0' x2='{x0 - gap / 2:.1f}' y2='{base:.1f}' "
                       f"stroke='#888' stroke-dasharray='2 2'/>")
        first_col += len(b[2])
    for layer in range(n_layers):
        y = head + (n_layers - 1 - layer) * ch          # layer 0 at the bottom, like a network diagram
        for col in torch.nonzero(value[layer] > 0).flatten().tolist():
            r = regions[owner[col]]
            block, mass = int(span[layer, col]), float(value[layer, col])
            where = f"block {block}" if r.spans[block]["in_memory"] else "local window"
            if r.titled:
                where = f"{r.label} · {where}"
            tip = f"layer {layer} · {where} · {page_label(r.spans[block], r.pages)} · mass {mass:.3f}"
            cls = "cell window" if r.window else "cell"
            svg.append(f"<rect class='{cls}' data-block='{block}' data-document='{r.document}' x='{xs[col]:.1f}' "
                       f"y='{y:.1f}' "
                       f"width='{cw}' height='{ch}' fill='{_colour(mass / top)}'>"
                       f"<title>{html.escape(tip)}</title></rect>")
    for layer in range(0, n_layers, 5):
        y = head + (n_layers - 1 - layer) * ch + ch * 0.8
        svg.append(f"<text x='{left - 4}' y='{y:.1f}' class='tick' text-anchor='end'>{layer}</text>")
    for col in sorted({min(cols - 1, round(t * (cols - 1) / 5)) for t in range(6)}):
        r = regions[owner[col]]
        label = html.escape(r.pages[r.spans[starts[col]]["first_page"] - 1]["label"])
        svg.append(f"<text x='{xs[col] + 0.5 * cw:.1f}' y='{base + 12}' class='tick' "
                   f"text-anchor='middle'>{label}</text>")
    svg.append(f"<text x='{(left + right) / 2:.1f}' y='{height - 3:.0f}' class='axis' "
               f"text-anchor='middle'>{html.escape(axis)}</text>")
    svg.append(f"<text x='8' y='{head + n_layers * ch / 2:.0f}' class='axis' text-anchor='middle' "
               f"transform='rotate(-90 8 {head + n_layers * ch / 2:.0f})'>layer</text></svg>")
    return "".join(svg)


NOTHING_YET = "<div class='inspector muted'>Ask a question: the blocks each layer retrieved for the answer show here.</div>"


def render(trace: dict | None, timings: dict | None, documents: Shelf, n_layers: int, method: str = "infllm",
           quote: dict | None = None) -> str:
    """The whole inspector for one answer as HTML. documents: each document the trace asked, as (row, spans,
    pages), in its order (trace["documents"]); spans: Library.spans rows (memory blocks first)."""
    if trace is None:
        return NOTHING_YET
    titled = len(documents) > 1
    quoted = "" if not quote else (
        f"<blockquote class='quote' data-chars='{quote['chars'][0]},{quote['chars'][1]}' "
        f"data-document='{quote['document']}' title='show the page'>“{html.escape(quote['text'])}” "
        f"<span class='where'>{html.escape(_where(quote, quote['page'], titled))} · show the page</span></blockquote>")
    if method != "infllm":
        return (f"<div class='inspector muted'>This answer used {html.escape(method)} attention, which retrieves "
                "nothing from memory: there is no heatmap. Read the document in infllm mode to see retrieval.</div>")
    sizes = parts(trace, documents)
    heat_map = Summary.load(trace).heat(n_layers, sum(sizes))
    axis = "documents, and the position in each (pages) →" if titled else "position in the document (pages) →"
    f = figures(trace, timings, documents)
    cards = [("blocks retrieved", f"{f.blocks_retrieved} of {f.n_blocks}"),
             ("attention on memory", f"{f.memory_share:.0%}"), ("on the local window", f"{f.window_share:.0%}"),
             ("decode", f"{f.tokens_per_s:.1f} tok/s"), ("first token", f"{f.first_token_s:.2f} s")]
    out = [f"<div class='inspector'>{quoted}<div class='figures'>"]
    out += [f"<div class='figure'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>" for k, v in cards]
    out.append(f"</div>{heatmap_svg(regions(heat_map, documents, sizes), axis)}<ol class='passages'>")
    for p in passages(trace, documents):
        snippet = " ".join(p["text"].split())[:220]
        where = f"block {p['block']}" if p["in_memory"] else "local window"
        ranked = " · ".join(f"{name} #{p['ranks'][name]}" for name in SIGNALS if name in p["ranks"])
        out.append(f"<li data-block='{p['block']}' data-document='{p['document']}'><span class='where'>"
                   f"{html.escape(_where(p, p['pages'], titled))} · {where} · {p['by']} {p['share']:.0%}</span>"
                   + (f"<span class='signals'>{ranked}</span>" if ranked else "") + f"{html.escape(snippet)}…</li>")
    out.append("</ol></div>")
    return "".join(out)


def _where(item: dict, page: str, titled: bool) -> str:
    """A page label, after the document's title across documents: "lshort · p. 58"."""
    return f"{short_title(item['title'])} · {page}" if titled else page
