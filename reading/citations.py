"""Where an answer's evidence is in the documents asked: its passages, best first, and the inline citation.

Pure functions from a stored trace (Summary.to_dict, or a full Trace.to_dict) and the rows of the
documents it asked. A trace's columns number the documents' spans one document after another
(Trace.parts); a question about one document is a question about a shelf of one.
"""
from __future__ import annotations

from infllm_engine import Summary

Shelf = list[tuple[dict, list[dict], list[dict]]]      # each document asked: (its row, its spans, its pages)


def page_label(span: dict, pages: list[dict]) -> str:
    """"p. 3", or "p. 3 – p. 4" for a span that crosses a page break."""
    first, last = pages[span["first_page"] - 1]["label"], pages[span["last_page"] - 1]["label"]
    return first if first == last else f"{first} – {last}"


def parts(trace: dict, documents: Shelf) -> list[int]:
    """Each document's number of trace columns: as the question's probes counted them, else its spans."""
    return trace.get("parts") or [len(spans) for _, spans, _ in documents]


def passages(trace: dict, documents: Shelf, k: int = 5) -> list[dict]:
    """The k spans that hold the answer's evidence, best first (Summary.evidence), each with its document, its
    pages and its text. share: the span's part of all the positive evidence (a vote for a vague question is a
    tiny number); ranks: where each signal ranked it ({"attention": 1, "words": 3, ...}, those that rank it).
    A document deleted since, or whose spans no longer match the trace, gives none."""
    sizes = parts(trace, documents)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    summary = Summary.load(trace)
    weight, by = summary.evidence_weights(sum(sizes))
    total = float(weight.clamp(min=0).sum()) or 1.0
    found = []
    for g in summary.evidence(sum(sizes)):
        i = max(j for j, o in enumerate(offsets) if o <= g and sizes[j])
        doc, spans, pages = documents[i]
        span = g - offsets[i]
        if span >= len(spans):
            continue
        row = spans[span]
        found.append({"document": doc["id"], "title": doc["title"], "block": span, "pages": page_label(row, pages),
                      "weight": float(weight[g]), "share": float(weight[g]) / total, "by": by,
                      "in_memory": bool(row["in_memory"]), "tokens": [row["start_token"], row["end_token"]],
                      "text": row["text"] or "", "ranks": (summary.ranks or {}).get(g, {})})
        if len(found) == k:
            break
    return found


def cite(where: str, title: str | None = None) -> str:
    """A page label as an inline citation: "(p. 61)", "(PDF p. 5)", "(see Chapter 3)"; with a document's
    title, for a question across documents: "(lshort, p. 61)"."""
    if title:
        return f"({short_title(title)}, {where})"
    return f"({where})" if where.startswith(("p.", "PDF p.")) else f"(see {where})"


def short_title(title: str, limit: int = 40) -> str:
    return title if len(title) <= limit else title[: limit - 1].rstrip() + "…"
