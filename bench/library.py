"""One question across a library: is the fact's document found, and is the answer as good as asking it alone?

    python -m bench.library --books lshort.pdf impatient.pdf ttb_en.pdf latexcourse-rug.pdf visualFAQ.pdf \
        --tokens 12288 --json bench/results/library-cpu.json

Each book's first pages (about --tokens tokens, documents/ as the app reads them) become one
document of the library. Document d gets fact d of bench.needle's five (a pass key, a name, a number,
a date, a word), planted at depth 0.1 .. 0.9 (rotation r moves it by 2r), so every fact is in exactly
one document. Every wording of every fact is asked through the reading service, as the page asks:
- across the library ("All documents"): the word index ranks the documents, the best --probed of them
  are probed by attention (reading.service.PROBED is the app's; "all" probes every one);
- of the fact's document alone (the reference).
A question scores: the document quoted and cited first is the fact's; the quoted page holds the fact;
the answer holds it. The JSON keeps every answer, with its first-token time.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import date
from pathlib import Path

from bench.needle import DEPTHS, correct, cut, make_facts, plant
from bench.passkey import machine
from infllm_engine import Engine, InfLLMConfig
from infllm_engine.encoder import Encoder
from reading.ingest import ingest_document
from reading.service import ALL, Answered, ReadingService
from storage.library import Library
from documents import read_document


def fact_page(doc, fact) -> str:
    """The label of the page that holds the planted sentence."""
    at = doc.text.index(fact.sentence)
    return next(p.label for p in reversed(doc.pages) if p.start <= at)


def ask(service: ReadingService, target, question: str, max_new_tokens: int, probed) -> tuple[Answered, float]:
    t0, first = time.perf_counter(), None
    pieces = service.ask(target, question, max_new_tokens=max_new_tokens, probed=probed)
    for piece in pieces:
        if first is None and (isinstance(piece, dict) or isinstance(piece, str) and piece):
            first = time.perf_counter() - t0          # what a reader sees first: the quote, or the answer's first words
        if isinstance(piece, Answered):
            return piece, first or 0.0
    raise RuntimeError("no answer")


def score(answered: Answered, doc_id: int, page: str, fact) -> dict:
    quote = answered.quote or {}
    first = answered.evidence[0] if answered.evidence else {}
    return {"answer": answered.text, "citation": answered.citation, "correct": correct(answered.text, fact),
            "quote_document": quote.get("document"), "quote_page": quote.get("page"),
            "passage_document": first.get("document", doc_id if first else None),
            "document_right": quote.get("document", first.get("document", doc_id if first else None)) == doc_id,
            "page_right": quote.get("page") == page and quote.get("document") == doc_id,
            "quote_holds": correct(quote.get("text", ""), fact), "timings": answered.timings}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, nargs="+", required=True, help="one PDF/EPUB/text per document")
    parser.add_argument("--tokens", type=int, default=12288, help="each document's length")
    parser.add_argument("--rotation", type=int, default=0)
    parser.add_argument("--probed", nargs="+", default=["all", "4", "2"],
                        help="documents probed by attention across the library: a number, or all")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/library-bench"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--no-encoder", action="store_true", help="attention and words alone (no meaning)")
    args = parser.parse_args(argv)

    cfg = InfLLMConfig(dtype=args.dtype)
    engine = Engine.load(args.model, cfg, args.data_dir)
    library = Library(args.data_dir)
    encoder = None if args.no_encoder else Encoder.load()
    service = ReadingService(engine, library, encoder=encoder)
    facts = make_facts(random.Random(f"{args.seed}-{args.rotation}"))
    docs = []
    for d, book in enumerate(args.books):
        fact = facts[d % len(facts)]
        depth = DEPTHS[(d + 2 * args.rotation) % len(DEPTHS)]
        doc = plant(cut(engine, read_document(book), args.tokens), [(depth, fact)])
        t0 = time.perf_counter()
        done = ingest_document(library, engine, doc, encoder=encoder)
        print(f"read {book.name}: {done.tokens:,} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        docs.append((done.doc_id, doc, fact, depth))
    samples = []
    for doc_id, doc, fact, depth in docs:
        page = fact_page(doc, fact)
        for q in fact.questions:
            runs = [("alone", doc_id, None)] + [(f"library, probed {p}", ALL, None if p == "all" else int(p))
                                                 for p in args.probed]
            for name, target, probed in runs:
                answered, first_s = ask(service, target, q, args.max_new_tokens, probed)
                sample = {"system": name, "book": doc.title, "document": doc_id, "kind": fact.kind, "depth": depth,
                          "question": q, "page": page, "first_token_s": round(first_s, 2),
                          **score(answered, doc_id, page, fact)}
                samples.append(sample)
                print(json.dumps(sample), file=sys.stderr, flush=True)
    result = {"books": [b.name for b in args.books], "tokens": args.tokens, "config": cfg.to_dict(),
              "encoder": encoder.name if encoder else None,
              "machine": machine(), "date": date.today().isoformat(),
              "command": "python -m bench.library " + " ".join(argv if argv is not None else sys.argv[1:]),
              "samples": samples}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


def table(result: dict) -> str:
    rows = ["| asked | document first | page right | quote holds it | answer right | first token s (median) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(s["system"] for s in result["samples"]):
        mine = [s for s in result["samples"] if s["system"] == name]
        n = len(mine)
        times = sorted(s["first_token_s"] for s in mine)
        count = lambda key: f"{sum(s[key] for s in mine)}/{n}"
        rows.append(f"| {name} | {count('document_right')} | {count('page_right')} | {count('quote_holds')} | "
                    f"{count('correct')} | {times[n // 2]:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
