"""Find the fact in a real book: facts planted in a real PDF, asked through the app's own path.

    python -m bench.needle --lengths 8192 16384 32768 65536 --docs 2 --json bench/results/needle-cpu.json

A document of about LENGTH tokens is cut from a real book (lshort.pdf by default, read by the app's
own reader, pages and all). Five facts of different kinds (a pass key, a name, a number, a date, a
word) are planted in it as paragraphs of their own, one at each depth 0.1 .. 0.9; rotation r moves
fact j to depth (j + 2r) mod 5, so with --docs 5 every fact visits every depth. The document is read
into a library (reading.ingest, as `app.py ingest` does), then every fact is asked in several
wordings with Engine.ask (the chat template, and the library's word matches, as the app asks; a
variant with focus_lexical=0 asks with the attention vote alone). The reference is the model's own
ability: full attention on an excerpt of --reference-length tokens with the same five facts.

For each question the JSON records the answer, whether it holds the fact, in how many layers the
fact's block was retrieved, and the rank of that block among the answer's cited passages. Variants
(--variants) change only question-time knobs, so one reading serves them all.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.passkey import machine
from infllm_engine import Engine, InfLLMConfig, Trace
from infllm_engine.probe import voting_layers
from reading.ingest import ingest_document, load_memory
from storage.library import Library
from documents import Document, Page, read_document

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Debian's texlive-lang-english ships it: `apt-get download texlive-lang-english` and `dpkg-deb -x` it,
# then point LSHORT_PDF (or --book) at lshort.pdf (tests/test_readers.py fetches it the same way).
DEFAULT_BOOK = Path(os.environ.get("LSHORT_PDF", "/usr/share/doc/texlive-doc/latex/lshort-english/lshort.pdf"))
NAMES = ["Mirela Vance", "Tobias Harrow", "Ingrid Solberg", "Rafael Quintero", "Agnes Whitlock", "Daniel Okafor"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["saffron", "cardamom", "nutmeg", "tarragon", "juniper", "sorrel"]


@dataclass(frozen=True)
class Fact:
    kind: str
    sentence: str              # the planted paragraph
    expect: tuple[str, ...]    # every one must appear in the answer (case-insensitive)
    questions: tuple[str, ...]


def make_facts(rng: random.Random) -> list[Fact]:
    key, loaves, year = rng.randrange(10000, 100000), rng.randrange(120, 990), rng.randrange(1850, 1990)
    name, word = rng.choice(NAMES), rng.choice(WORDS)
    day, month = rng.randrange(2, 28), rng.choice(MONTHS)
    return [
        Fact("passkey", f"A note left in this book: the pass key is {key}. Remember it. {key} is the pass key.",
             (str(key),),
             ("What is the pass key mentioned in the note left in this book?", "What is the pass key?",
              "Somebody left a note with a pass key in this book. Which number is it?")),
        Fact("name", f"The lighthouse keeper of Port Emberly is {name}.", tuple(name.split()),
             ("Who is the lighthouse keeper of Port Emberly?",
              "What is the name of the lighthouse keeper of Port Emberly?",
              "According to the document, who keeps the lighthouse at Port Emberly?")),
        Fact("number", f"The bakery on Quill Street sells {loaves} loaves of bread every morning.", (str(loaves),),
             ("How many loaves of bread does the bakery on Quill Street sell every morning?",
              "How many loaves does the Quill Street bakery sell each morning?",
              "What number of loaves does the bakery on Quill Street sell every morning?")),
        Fact("date", f"The Harwick Bridge was opened on {day} {month} {year}.", (str(year),),
             ("When was the Harwick Bridge opened?", "In which year was the Harwick Bridge opened?",
              "What is the opening date of the Harwick Bridge?")),
        Fact("word", f"The secret ingredient in Aunt Dora's soup is {word}.", (word,),
             ("What is the secret ingredient in Aunt Dora's soup?",
              "Which secret ingredient does Aunt Dora put in her soup?",
              "What does Aunt Dora's soup contain as its secret ingredient?")),
    ]


def correct(answer: str, fact: Fact) -> bool:
    low = answer.lower()
    return all(e.lower() in low for e in fact.expect)


def cut(engine: Engine, book: Document, tokens: int) -> Document:
    """The book's first pages, ending on a line, so that the document prompt is about `tokens` long."""
    prefix = engine.document_prompt("")
    offsets = engine.tokenizer(prefix + book.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if tokens >= len(offsets):
        raise SystemExit(f"{book.source_name} has only {len(offsets):,} tokens; --length {tokens:,} needs a longer book")
    end = offsets[tokens][0] - len(prefix)
    end = book.text.rfind("\n", 0, end)
    pages = [Page(p.number, p.label, p.start, min(p.end, end)) for p in book.pages if p.start < end]
    return dataclasses.replace(book, text=book.text[:end], pages=pages)


def plant(doc: Document, placed: list[tuple[float, Fact]]) -> Document:
    """The document with each fact inserted as a paragraph at the first line break after its depth."""
    text, pages = doc.text, [dataclasses.replace(p) for p in doc.pages]
    for depth, fact in sorted(placed, key=lambda x: -x[0]):       # back to front: earlier offsets stay valid
        at = text.find("\n", int(depth * len(text)))
        at = len(text) if at < 0 else at
        insert = f"\n\n{fact.sentence}"
        text = text[:at] + insert + text[at:]
        for p in pages:
            if p.start >= at:
                p.start += len(insert)
            if p.end >= at:
                p.end += len(insert)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return dataclasses.replace(doc, text=text, pages=pages, sha256=digest, title=f"{doc.title} [needles {digest[:8]}]")


def fact_spans(engine: Engine, doc: Document, fact: Fact, cfg: InfLLMConfig) -> tuple[list[int], int]:
    """The block-grid spans holding the fact's tokens (ids past the memory's blocks lie in the window),
    and the fact's first token."""
    prefix = engine.document_prompt("")
    offsets = engine.tokenizer(prefix + doc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    a = len(prefix) + doc.text.index(fact.sentence)
    b = a + len(fact.sentence)
    toks = [t for t, (s, e) in enumerate(offsets) if s < b and e > a]
    return sorted({(t - cfg.n_init) // cfg.block_size for t in toks if t >= cfg.n_init}), toks[0]


def rankings(trace: Trace, n_blocks: int, n_layers: int, layers: range) -> dict[str, list[int]]:
    """Candidate orders of evidence, to measure which one puts the fact first (the app uses trace.evidence).
    The heat-based ones rank the memory blocks."""
    out = {"evidence": trace.evidence(trace.parts[0] if trace.parts else n_blocks)}
    heat = trace.heat(n_layers, n_blocks)
    out["mass"] = [int(i) for i in heat.sum(0).argsort(descending=True) if heat.sum(0)[i] > 0]
    decode = {i for i, s in enumerate(trace.steps) if s.kind == "decode"}
    mid = trace.heat(n_layers, n_blocks, decode)[list(layers)].sum(0)
    out["decode_mid_mass"] = [int(i) for i in mid.argsort(descending=True) if mid[i] > 0]
    if trace.votes is not None:
        out["votes"] = [int(i) for i in trace.votes.argsort(descending=True)]
        if trace.pinned is not None and trace.pinned.numel():
            pinned = trace.pinned.cpu()            # on the compute device; the heat is on the host
            read = trace.heat(n_layers, int(pinned.max()) + 1, decode).sum(0)[pinned]
            first = pinned[read.argsort(descending=True)].tolist()
            out["answer_pinned"] = first + [b for b in out["votes"] if b not in first]
    return out


def layers_with(trace: dict, blocks: list[int]) -> tuple[int, int]:
    """In how many layers a fact block was retrieved: over all the answer's steps, and in decode steps."""
    decode = {i for i, s in enumerate(trace["steps"]) if s["kind"] == "decode"}
    hit = [r for r in trace["records"] if set(r["block_ids"]) & set(blocks)]
    return len({r["layer"] for r in hit}), len({r["layer"] for r in hit if r["step"] in decode})


def parse_variant(spec: str) -> tuple[str, dict]:
    """NAME or NAME:key=value,key=value (question-time config changes)."""
    name, _, rest = spec.partition(":")
    changes = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        changes[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    return name, changes


def run_document(engine: Engine, library: Library, book: Document, length: int, rotation: int, seed: int,
                 variants: list[tuple[str, dict]], max_new_tokens: int, log) -> list[dict]:
    rng = random.Random(f"{seed}-{rotation}")           # the same facts at every length
    facts = make_facts(rng)
    placed = [(DEPTHS[(j + 2 * rotation) % len(DEPTHS)], f) for j, f in enumerate(facts)]
    doc = plant(cut(engine, book, length), placed)
    t0 = time.perf_counter()
    done = ingest_document(library, engine, doc)
    read_s = time.perf_counter() - t0
    answering = engine.answering()                      # as the app asks ("mixed" answers in fp32)
    memory = load_memory(library, answering, done.doc_id)
    out = []
    for depth, fact in placed:
        spans, first_token = fact_spans(engine, doc, fact, engine.cfg)
        blocks = [b for b in spans if b < memory.n_blocks]
        for name, changes in variants:
            asker = answering.with_config(answering.cfg.replace(**changes))
            for q in fact.questions:
                t1 = time.perf_counter()
                lexical = library.search([done.doc_id], q).get(done.doc_id)
                answer = asker.ask(memory, q, max_new_tokens=max_new_tokens, lexical=lexical).wait()
                trace = answer.trace.to_dict()
                focus_layers = voting_layers(engine.n_layers, asker.cfg.focus_layers)
                ranked = rankings(answer.trace, memory.n_blocks, engine.n_layers, focus_layers)
                rank = {k: next((i + 1 for i, b in enumerate(v) if b in spans), None) for k, v in ranked.items()}
                n_layers, n_decode_layers = layers_with(trace, blocks)
                sample = {
                    "variant": name, "length": done.tokens, "target_length": length, "rotation": rotation,
                    "depth": depth, "kind": fact.kind, "question": q, "expect": list(fact.expect),
                    "answer": answer.text.strip(), "correct": correct(answer.text, fact),
                    "fact_blocks": blocks, "in_window": not blocks, "fact_token": first_token,
                    "layers_retrieved": n_layers, "decode_layers_retrieved": n_decode_layers,
                    "passage_rank": rank["evidence"], "ranks": rank, "pinned": trace.get("pinned"),
                    "top_passage": ranked["evidence"][0] if ranked["evidence"] else None,
                    "seconds": round(time.perf_counter() - t1, 2), "read_seconds": round(read_s, 1),
                }
                out.append(sample)
                print(json.dumps(sample), file=log, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, default=DEFAULT_BOOK, help="a long PDF/EPUB/text (default: lshort.pdf)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--docs", type=int, default=2, help="rotations of the facts over the depths, per length")
    parser.add_argument("--variants", nargs="+", default=["infllm"],
                        help="NAME or NAME:knob=value,... question-time config changes")
    parser.add_argument("--reference-length", type=int, default=4096, help="0: no full-attention reference")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/needle-library"),
                        help="library the planted documents are read into (kept: a second run reads nothing)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--knobs", default="", help="reading-time config changes, key=value,...")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    _, reading = parse_variant("reading:" + args.knobs)
    cfg = InfLLMConfig(device=args.device, dtype=args.dtype, max_tokens=max(args.lengths) * 2, **reading)
    engine = Engine.load(args.model, cfg, args.data_dir)
    library = Library(args.data_dir)
    book = read_document(args.book)
    variants = [parse_variant(v) for v in args.variants]
    samples = []
    for length in args.lengths:
        for r in range(args.docs):
            samples += run_document(engine, library, book, length, r, args.seed, variants, args.max_new_tokens, sys.stderr)
    if args.reference_length:
        full = engine.with_config(cfg.replace(method="full"))
        for r in range(args.docs):
            ref = run_document(full, library, book, args.reference_length, r, args.seed, [("full", {})],
                               args.max_new_tokens, sys.stderr)
            samples += [{**s, "variant": "reference"} for s in ref]
    result = {"book": args.book.name, "config": cfg.to_dict(), "machine": machine(), "date": date.today().isoformat(),
              "command": "python -m bench.needle " + " ".join(argv if argv is not None else sys.argv[1:]),
              "samples": samples}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    for name in dict.fromkeys(s["variant"] for s in samples):
        mine = [s for s in samples if s["variant"] == name]
        print(f"{name}: {sum(s['correct'] for s in mine)}/{len(mine)} correct")
    return result


if __name__ == "__main__":
    main()
