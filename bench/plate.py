"""A book with one unnumbered page inserted mid-book, as a plate, a map or a merged note would be, and its facts
moved with it: the check of the printed page numbers (issue 37).

    python -m bench.plate --book impatient.pdf --facts bench/data/impatient-facts.json --pages 120 --after 60 \
        --out bench/out/impatient-plate.pdf

Writes the first --pages pages of the book with a blank page after page --after, and beside it the facts file
(<out>.facts.json) of the facts on those pages, their physical page moved by one after the insert; then
`python -m bench.questions --facts <out>.facts.json --book <out> --retrieval` scores the cited pages.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pypdf


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, required=True)
    parser.add_argument("--facts", type=Path, required=True)
    parser.add_argument("--pages", type=int, default=120)
    parser.add_argument("--after", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench/out/plate.pdf"))
    args = parser.parse_args(argv)
    source = pypdf.PdfReader(args.book)
    writer = pypdf.PdfWriter()
    for i in range(min(args.pages, len(source.pages))):
        writer.add_page(source.pages[i])
        if i + 1 == args.after:
            writer.add_blank_page()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer.write(args.out)
    facts = json.loads(args.facts.read_text())
    first, _ = facts.get("pages") or (1, None)
    kept = [dict(f, physical=f["physical"] + (f["physical"] > args.after)) for f in facts["facts"]
            if f["physical"] <= args.pages]
    moved = {**facts, "book": args.out.name, "pages": [first, args.pages + 1], "facts": kept,
             "source": f"{facts.get('source', '')}; its first {args.pages} pages, a blank page inserted after page "
                       f"{args.after} (bench.plate)"}
    facts_out = args.out.with_name(args.out.name + ".facts.json")
    facts_out.write_text(json.dumps(moved, indent=1))
    print(f"{args.out}: {args.pages + 1} pages; {facts_out}: {len(kept)} facts")
    return args.out


if __name__ == "__main__":
    main()
