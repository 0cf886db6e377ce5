"""Where an answer's evidence is in the document: its passages, best first, and the inline citation.

Pure functions from a stored trace (Summary.to_dict, or a full Trace.to_dict) and the document's
span and page rows.
"""
from __future__ import annotations

from infllm_engine import Summary

REPLACEMENT = "\ufffd"


def page_label(span: dict, pages: list[dict]) -> str:
    """"p. 3", or "p. 3 – p. 4" for a span that crosses a page break."""
    first, last = pages[span["first_page"] - 1]["label"], pages[span["last_page"] - 1]["label"]
    return first if first == last else f"{first} – {last}"


def stored_text(span: dict) -> str:
    """A span's stored text. Libraries read before whole-word spans decoded token spans that could cut a
    character in two: the halves show as '\ufffd' at the ends, and are dropped."""
    return (span.get("text") or "").strip(REPLACEMENT)


def passages(trace: dict, spans: list[dict], pages: list[dict], k: int = 5) -> list[dict]:
    """The k spans that hold the answer's evidence, best first (Summary.evidence), with pages and text.

    share: the span's part of all the positive evidence (a vote for a vague question is a tiny number).

    spans: Library.spans rows, memory blocks first and then the local window's pieces.
    """
    n_blocks = sum(1 for r in spans if r.get("in_memory", 1))
    t = Summary.load(trace)
    weight, by = t.evidence_weights(n_blocks)
    order = [i for i in t.evidence(n_blocks) if i < len(spans)][:k]
    total = float(weight.clamp(min=0).sum()) or 1.0
    return [{"block": i, "pages": page_label(spans[i], pages), "weight": float(weight[i]),
             "share": float(weight[i]) / total, "by": by, "in_memory": bool(spans[i].get("in_memory", 1)),
             "tokens": [spans[i]["start_token"], spans[i]["end_token"]], "text": stored_text(spans[i])}
            for i in order]


def citation(trace: dict | None, spans: list[dict], pages: list[dict]) -> str:
    """The answer's inline citation, e.g. "(p. 61)": the page of its first evidence span; "" without one."""
    if not trace or not spans:
        return ""
    best = passages(trace, spans, pages, k=1)
    return cite(best[0]["pages"]) if best else ""


def cite(where: str, title: str | None = None) -> str:
    """A page label as an inline citation: "(p. 61)", "(PDF p. 5)", "(see Chapter 3)"; with a document's
    title, for a question across documents: "(lshort, p. 61)"."""
    if title:
        return f"({short_title(title)}, {where})"
    return f"({where})" if where.startswith(("p.", "PDF p.")) else f"(see {where})"


def short_title(title: str, limit: int = 40) -> str:
    return title if len(title) <= limit else title[: limit - 1].rstrip() + "…"


def shelf_passages(trace: dict, documents: list[tuple[dict, list[dict], list[dict]]], k: int = 5) -> list[dict]:
    """passages() of a question across documents: trace columns number the documents' spans one document
    after another (Trace.parts); each passage names its document ("document", "title").

    documents: (document row, its spans, its pages), in the trace's order.
    """
    parts = trace.get("parts") or [len(s) for _, s, _ in documents]
    offsets = [sum(parts[:i]) for i in range(len(parts))]
    t = Summary.load(trace)
    weight, by = t.evidence_weights(sum(parts))
    total = float(weight.clamp(min=0).sum()) or 1.0
    found = []
    for g in t.evidence(sum(parts)):
        i = max(j for j, o in enumerate(offsets) if o <= g and parts[j])
        doc, spans, pages = documents[i]
        span = g - offsets[i]
        if span >= len(spans):
            continue
        found.append({"document": doc["id"], "title": doc["title"], "block": span, "pages": page_label(spans[span], pages),
                      "weight": float(weight[g]), "share": float(weight[g]) / total, "by": by,
                      "in_memory": bool(spans[span].get("in_memory", 1)),
                      "tokens": [spans[span]["start_token"], spans[span]["end_token"]], "text": stored_text(spans[span])})
        if len(found) == k:
            break
    return found
