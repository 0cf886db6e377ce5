"""Real questions about a real book: what the book states, asked in its words and paraphrased.

    python -m bench.questions --facts bench/data/lshort-facts.json --json bench/results/questions-cpu.json

Each fact of the facts file is a sentence the book itself states (nothing planted), with the strings
a right answer holds and two questions: one in the book's words, one paraphrased without the
sentence's rare words. The book is read into a library as `app.py ingest` reads it (--pages takes a
slice of a PDF's physical pages), and every question is put to three systems with the same model:
- app: ReadingService.ask, the app's own path (question focus, word matches, the quote, the citation);
- library (only when asked for): the same question asked across every document of the library at
  --data-dir ("All documents"), scored as app, and whether the quote is from the fact's book;
- bm25: a plain RAG peer: the 4 best 128-token spans by BM25 (the library's FTS5 index), then the
  question, read with full attention;
- oracle: the model handed the ~300 tokens around the answering sentence, with full attention.
Scores per system and wording: the answer right (all expected strings in it), in its first sentence,
its first paragraph and its first 32/64/128 tokens; the quote holding the answer (app); the cited page
being the fact's printed page; and whether an answer repeats a 4-word phrase three times.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

from bench import retrieval
from bench.needle import parse_variant
from bench.passkey import machine
from infllm_engine import Engine, InfLLMConfig
from infllm_engine.encoder import Encoder
from reading import quotes
from reading.citations import short_title
from reading.ingest import ingest_document, load_memory, stored_config, tokenize
from reading.service import Answered, ReadingService
from storage.library import Library
from documents import Document, read_document

SYSTEMS = ("app", "library", "bm25", "oracle")
WORDINGS = ("book", "paraphrase")
CUTS = (32, 64, 128)
# Broad questions that drew word salad from the 135M model ("commands that produce commands that ..."):
# asked with --vague, to see where the loop stop (infllm_engine.stopping) cuts an answer.
VAGUE = ("What does this part of the book explain?", "Summarize the document.", "What is this book about?",
         "Tell me about the commands.", "What does the book say about commands?", "Explain the last chapter.",
         "What is important here?", "What should I know before I start?")
PASSAGES = 4            # the BM25 peer's budget: as many 128-token spans as the app re-reads blocks
ORACLE_TOKENS = 150     # on each side of the answering sentence


def holds(text: str, expect: list[str]) -> bool:
    """Every expected string is in text (case and runs of spaces ignored)."""
    low = " ".join(text.lower().split())
    return all(" ".join(e.lower().split()) in low for e in expect)


def first_sentence(text: str) -> str:
    """The answer's first sentence, bounded as quotes are ("Donald E. Knuth." is one)."""
    text = text.strip()
    bounds = quotes.sentences(text, 0, len(text))
    return text[: bounds[0][1]] if bounds else text


def first_paragraph(text: str) -> str:
    return text.strip().split("\n\n", 1)[0]


def repeats(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some phrase of n words comes back `times` times (the issue's word-salad check)."""
    words = re.findall(r"\w+", text.lower())
    return any(c >= times for c in Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1)).values())


def pages_slice(doc: Document, first: int, last: int) -> Document:
    """The document's physical pages first..last (a PDF's), as a document of their own."""
    kept = [p for p in doc.pages if first <= p.number <= last]
    if not kept:
        raise SystemExit(f"{doc.source_name} has no text on pages {first}-{last}")
    lo = kept[0].start
    pages = [dataclasses.replace(p, start=p.start - lo, end=p.end - lo) for p in kept]
    text = doc.text[lo: kept[-1].end]
    return dataclasses.replace(doc, text=text, pages=pages, sha256=hashlib.sha256(text.encode()).hexdigest(),
                               title=f"{doc.title or doc.source_name} [pp. {first}-{last}]")


def locate(doc: Document, fact: dict) -> tuple[int, int]:
    """[a, b) of the fact's sentence in the document's text: found on its page, spaces and line-end hyphens
    ignored; the page's first expected string where the sentence is not found as written."""
    page = next(p for p in doc.pages if p.number == fact["physical"])
    squash = lambda s: re.sub(r"[\s\-\u00ad]+", "", s.lower())   # noqa: E731
    body = doc.text[page.start: page.end]
    flat, where = [], []
    for i, ch in enumerate(body):
        if squash(ch):
            flat.append(squash(ch))
            where.append(i)
    at = "".join(flat).find(squash(fact["sentence"]))
    if at >= 0:
        return page.start + where[at], page.start + where[at + len(squash(fact["sentence"])) - 1] + 1
    low = body.lower()
    a = max(0, low.find(fact["expect"][0].lower()))
    return page.start + a, page.start + a + len(fact["expect"][0])


def full_answer(engine: Engine, context: str, question: str, max_new_tokens: int) -> str:
    """The model's answer with `context` as its whole document, full attention (the peers)."""
    memory = engine.read(engine.encode(engine.document_prompt(context)))
    return engine.ask(memory, question, max_new_tokens).wait().text


def scores(answer: str, expect: list[str], tokenizer) -> dict:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    out = {"right": holds(answer, expect), "first_sentence": holds(first_sentence(answer), expect),
           "first_paragraph": holds(first_paragraph(answer), expect), "repeats": repeats(answer),
           "chars": len(answer.strip())}
    out.update({f"tokens_{n}": holds(tokenizer.decode(ids[:n]), expect) for n in CUTS})
    return out


def ask_app(service: ReadingService, doc_id: int | str, question: str, max_new_tokens: int) -> tuple[str, Answered]:
    text, answered = "", None
    for piece in service.ask(doc_id, question, max_new_tokens=max_new_tokens):
        if isinstance(piece, Answered):
            answered = piece
        elif isinstance(piece, str):
            text += piece
    return text, answered


def run(args) -> dict:
    facts = json.loads(Path(args.facts).read_text())
    cfg = InfLLMConfig(device=args.device, dtype=args.dtype, **dict(parse_variant("q:" + args.knobs)[1]))
    engine = Engine.load(args.model, cfg, args.data_dir)
    full = engine.with_config(cfg.replace(method="full"))
    library = Library(args.data_dir)
    doc = read_document(args.book)
    args.pages = args.pages or facts.get("pages")
    if args.pages:
        doc = pages_slice(doc, *args.pages)
    encoder = None if args.no_encoder else Encoder.load()
    t0 = time.perf_counter()
    done = ingest_document(library, engine, doc, encoder=encoder)
    read_s = time.perf_counter() - t0
    service = ReadingService(engine, library, encoder=encoder)
    if args.retrieval:
        return run_retrieval(args, facts, cfg, service, doc, done, read_s)
    spans, pages = library.spans(done.doc_id), library.pages(done.doc_id)
    page_of = {p["number"]: p["label"] for p in pages}
    starts = tokenize(engine, doc).document_starts()
    samples = []
    for fact in facts["facts"][:: args.every][: args.limit]:
        where = locate(doc, fact)
        cited_right = f"p. {fact['label']}"
        for wording in WORDINGS:
            q = fact[wording]
            base = {"fact": fact["id"], "wording": wording, "question": q, "expect": fact["expect"],
                    "page": cited_right}
            for system, target in (("app", done.doc_id), ("library", "all")):
                if system not in args.systems:
                    continue
                t1 = time.perf_counter()
                text, answered = ask_app(service, target, q, args.max_new_tokens)
                quote = answered.quote or {}
                chars = quote.get("chars") or [0, 0]
                first = answered.evidence[0] if answered.evidence else {}
                on_book = quote.get("document", first.get("document", done.doc_id)) == done.doc_id
                cited = f"({cited_right})" if system == "app" else f"({short_title(doc.title)}, {cited_right})"
                samples.append({**base, "system": system, "answer": text.strip(),
                                **scores(text, fact["expect"], engine.tokenizer),
                                "quote": quote.get("text"), "quote_holds": holds(quote.get("text") or "", fact["expect"]),
                                "quote_on_sentence": on_book and chars[0] < where[1] and chars[1] > where[0],
                                "document_right": on_book,
                                "citation": answered.citation, "cited_right": answered.citation == cited,
                                "first_passage": first.get("pages"),
                                "first_passage_right": on_book and first.get("pages") == cited_right,
                                "seconds": round(time.perf_counter() - t1, 2)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            if "bm25" in args.systems:
                t1 = time.perf_counter()
                best = list(library.search([done.doc_id], q, limit=PASSAGES).get(done.doc_id, {}))
                context = "\n\n".join(" ".join(spans[i]["text"].split()) for i in best)
                text = full_answer(full, context, q, args.max_new_tokens) if best else ""
                top = page_of[spans[best[0]]["first_page"]] if best else None
                samples.append({**base, "system": "bm25", "answer": text.strip(), **scores(text, fact["expect"], engine.tokenizer),
                                "quote": None, "passages_hold": holds(context, fact["expect"]),
                                "citation": top, "cited_right": top == cited_right,
                                "seconds": round(time.perf_counter() - t1, 2)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            if "oracle" in args.systems:
                t1 = time.perf_counter()
                a = max(0, _token_at(starts, where[0]) - ORACLE_TOKENS)
                b = min(len(starts) - 1, _token_at(starts, where[1]) + ORACLE_TOKENS)
                text = full_answer(full, doc.text[starts[a]: starts[b]], q, args.max_new_tokens)
                samples.append({**base, "system": "oracle", "answer": text.strip(),
                                **scores(text, fact["expect"], engine.tokenizer),
                                "seconds": round(time.perf_counter() - t1, 2)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
    vague = ask_vague(service, engine, done.doc_id, args.max_new_tokens) if args.vague else []
    return {"book": doc.title, "file": Path(args.book).name, "pages": args.pages, "tokens": done.tokens,
            "read_seconds": round(read_s, 1), "facts": Path(args.facts).name, "config": cfg.to_dict(),
            "max_new_tokens": args.max_new_tokens, "machine": machine(), "date": date.today().isoformat(),
            "command": "python -m bench.questions " + " ".join(sys.argv[1:]), "samples": samples, "vague": vague}


def run_retrieval(args, facts: dict, cfg: InfLLMConfig, service: ReadingService, doc, done, read_s: float) -> dict:
    """--retrieval: every fact's evidence found by each signal and by the app, without answers (bench.retrieval)."""
    dump: list | None = [] if args.dump else None
    samples = [retrieval.retrieve(service, done.doc_id, fact, wording, holds, dump)
               for fact in facts["facts"][:: args.every][: args.limit] for wording in WORDINGS]
    if dump is not None:
        retrieval.write_dump(dump, Path(args.dump))
    return {"book": doc.title, "file": Path(args.book).name, "pages": args.pages, "tokens": done.tokens,
            "read_seconds": round(read_s, 1), "facts": Path(args.facts).name, "config": cfg.to_dict(),
            "encoder": service.encoder.name if service.encoder else None, "machine": machine(),
            "date": date.today().isoformat(), "command": "python -m bench.questions " + " ".join(sys.argv[1:]),
            "retrieval": True, "samples": samples}


def ask_vague(service: ReadingService, engine: Engine, doc_id: int, max_new_tokens: int) -> list[dict]:
    """The VAGUE questions on the app's engine path (its question config and word matches; no quote): the
    answer shown, whether the loop stop cut it, and what the model would have gone on to say."""
    doc = service.library.document(doc_id)
    asking = engine.answering(stored_config(doc))
    memory = load_memory(service.library, asking, doc_id)
    rows = []
    for q in VAGUE:
        t1 = time.perf_counter()
        lexical = service.library.search([doc_id], q).get(doc_id) if asking.cfg.focus_lexical else None
        answer = asking.ask(memory, q, max_new_tokens, lexical=lexical).wait()
        rows.append({"question": q, "answer": answer.text, "repeats": repeats(answer.text), "cut": answer.cut,
                     "chars": len(answer.text), "seconds": round(time.perf_counter() - t1, 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _token_at(starts: list[int], char: int) -> int:
    import bisect
    return max(0, bisect.bisect_right(starts, char) - 1)


def table(result: dict) -> str:
    """Markdown: one row per system and wording."""
    keys = [("right", "answer right"), ("first_sentence", "in its first sentence"),
            ("first_paragraph", "first paragraph"), *((f"tokens_{n}", f"first {n} tokens") for n in CUTS),
            ("quote_holds", "quote holds it"), ("cited_right", "cited page right"), ("document_right", "its book"),
            ("repeats", "repeats a phrase")]
    rows = ["| system | wording | " + " | ".join(k[1] for k in keys) + " | mean chars |",
            "|---|---|" + "---|" * (len(keys) + 1)]
    for system in SYSTEMS:
        for wording in WORDINGS:
            mine = [s for s in result["samples"] if s["system"] == system and s["wording"] == wording]
            if not mine:
                continue
            cells = [f"{sum(bool(s.get(k)) for s in mine)}/{len(mine)}" if k in mine[0] and mine[0][k] is not None
                     else "" for k, _ in keys]
            chars = sum(s["chars"] for s in mine) / len(mine)
            rows.append(f"| {system} | {wording} | " + " | ".join(cells) + f" | {chars:.0f} |")
    if result.get("vague"):
        vague = result["vague"]
        rows.append(f"\n{len(vague)} vague questions: the loop stop cut {sum(v['cut'] is not None for v in vague)}; "
                    f"{sum(v['repeats'] for v in vague)} answers shown repeat a 4-word phrase 3 times; "
                    f"mean {sum(v['chars'] for v in vague) / len(vague):.0f} characters.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=Path, default=Path("bench/data/lshort-facts.json"))
    parser.add_argument("--book", type=Path, default=None, help="default: the facts file's book, in $LSHORT_PDF's folder")
    parser.add_argument("--pages", type=int, nargs=2, default=None, help="physical pages FIRST LAST of a PDF")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["app", "bm25", "oracle"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--every", type=int, default=1, help="every Nth fact (2: half of them, still spread over the book)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N facts (after --every)")
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/questions-library"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--vague", action="store_true", help="also ask the VAGUE questions and report the loop stop")
    parser.add_argument("--retrieval", action="store_true",
                        help="score where each signal and the app put the evidence, without answers (minutes)")
    parser.add_argument("--dump", default=None, help="with --retrieval: keep each question's raw signals (JSON)")
    parser.add_argument("--knobs", default="", help="question-time config changes, key=value,... (focus_meaning=1)")
    parser.add_argument("--no-encoder", action="store_true", help="without the sentence encoder")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="score a results file's saved answers again (after a change to the scoring) and print its table")
    args = parser.parse_args(argv)
    if args.rescore:
        result = json.loads(args.rescore.read_text())
        tokenizer = Engine.load(args.model, InfLLMConfig(device=args.device, dtype="float32"), args.data_dir).tokenizer
        for sample in result["samples"]:
            sample.update(scores(sample["answer"], sample["expect"], tokenizer))
        args.rescore.write_text(json.dumps(result, indent=1))
        print(table(result))
        return result
    if args.book is None:
        from bench.needle import DEFAULT_BOOK
        args.book = DEFAULT_BOOK.parent / json.loads(args.facts.read_text())["book"]
    result = run(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    print(retrieval.table(result["samples"]) if args.retrieval else table(result))
    return result


if __name__ == "__main__":
    main()
