"""bench.questions --retrieval: where each signal puts a question's evidence, without writing any answer.

For every fact, in both wordings: the app's own finding (ReadingService.find: the fused evidence, the quote
and its page), and each signal alone (the attention vote, BM25 over the spans' texts, the sentence
encoder's cosine). A ranking is right at k when the fact's physical page is a page of one of its first k
spans. Judges a fusion change in minutes on every fact of both books; the full bench then confirms with
answers. --dump keeps each question's raw signals (JSON), to try fusions offline.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from reading.question import meanings
from reading.service import ReadingService

SIGNALS = ("attention", "words", "meaning", "app")
AT = (1, 4)


def span_pages(spans: list[dict], pages: list[dict]) -> list[set[int]]:
    """Each span's physical pages."""
    return [{pages[i]["physical"] or pages[i]["number"] for i in range(s["first_page"] - 1, s["last_page"])}
            for s in spans]


def right_at(order: list[int], pages: list[set[int]], physical: int) -> dict[str, bool]:
    return {f"top{k}": any(physical in pages[i] for i in order[:k] if i < len(pages)) for k in AT}


def ranking(scores: torch.Tensor | dict | None, n: int) -> list[int]:
    """Span ids by score, best first, the positive ones only."""
    if scores is None:
        return []
    if isinstance(scores, dict):
        return [i for i, x in sorted(scores.items(), key=lambda kv: -kv[1]) if x > 0 and i < n]
    return [int(i) for i in scores.argsort(descending=True, stable=True) if float(scores[i]) > 0 and int(i) < n]


def retrieve(service: ReadingService, doc_id: int, fact: dict, wording: str, holds, dump: list | None) -> dict:
    """One question's scores (and, with dump, its raw signals)."""
    question = fact[wording]
    t0 = time.perf_counter()
    finding = service.find(doc_id, question)
    seconds = time.perf_counter() - t0
    doc, spans, pages = finding.gathered.rows[0]
    where = span_pages(spans, pages)
    n = len(spans)
    attention = finding.found.attention[0]
    lexical = (finding.gathered.lexical or [None])[0] or {}
    meaning = None
    if service.encoder is not None:
        meaning = (finding.gathered.meaning or meanings(service.library, service.encoder, [doc],
                                                        service.encoder.encode([question])[0]))[0]
    fused = finding.found.evidence.scores if finding.found.evidence is not None else None
    quote = finding.quote or {}
    sample = {"fact": fact["id"], "wording": wording, "question": question, "physical": fact["physical"],
              "page": f"p. {fact['label']}", "seconds": round(seconds, 2), "quote": quote.get("text"),
              "quote_holds": holds(quote.get("text") or "", fact["expect"]),
              "cited_right": (quote.get("page") or (finding.passages[0]["pages"] if finding.passages else None))
              == f"p. {fact['label']}"}
    for name, scores in (("attention", attention), ("words", lexical), ("meaning", meaning), ("app", fused)):
        if scores is not None:
            sample.update({f"{name}_{k}": v for k, v in right_at(ranking(scores, n), where, fact["physical"]).items()})
    if dump is not None:
        dump.append({"fact": fact["id"], "wording": wording, "physical": fact["physical"], "expect": fact["expect"],
                     "attention": [round(float(x), 7) for x in attention.tolist()] if attention is not None else None,
                     "words": {str(k): v for k, v in lexical.items()},
                     "meaning": [round(float(x), 5) for x in meaning.tolist()] if meaning is not None else None,
                     "pages": [sorted(p) for p in where], "n_blocks": sum(1 for s in spans if s["in_memory"])})
    print(json.dumps(sample), file=sys.stderr, flush=True)
    return sample


def table(samples: list[dict]) -> str:
    """Markdown: per wording, each signal's top-1 and top-4 pages, the quote and the cited page."""
    rows = ["| wording | " + " | ".join(f"{s} top-{k}" for s in SIGNALS for k in AT) + " | quote holds it | cited page |",
            "|---|" + "---:|" * (len(SIGNALS) * len(AT) + 2)]
    for wording in ("book", "paraphrase"):
        mine = [s for s in samples if s["wording"] == wording]
        if not mine:
            continue
        count = lambda key: f"{sum(bool(s.get(key)) for s in mine)}/{len(mine)}" if key in mine[0] else ""  # noqa: E731
        cells = [count(f"{s}_top{k}") for s in SIGNALS for k in AT] + [count("quote_holds"), count("cited_right")]
        rows.append(f"| {wording} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_dump(dump: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dump))
