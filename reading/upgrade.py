"""Old libraries brought to today's formats once, when a service opens them: then every path knows one format.

The schema's steps (storage.schema) run whenever the library opens. What needs the model that read a
document runs here, for the documents step 9 flagged (documents.upgrade) and this engine's model:
- a memory of format 1 (K/V in the dtype it was read in, about 45 MiB per 1K tokens) is packed to
  today's int8 (about 11.5), in place, all or nothing; one left half-read starts over in today's format;
- a document read before texts were kept (schema step 7) gets its text and its pages' numbers from its
  kept file, where today's reader gives the very tokens its memory was read from.
Documents of another model keep their flag until a service of that model opens the library.
"""
from __future__ import annotations

import re

from infllm_engine import Engine, snapshot
from infllm_engine.engine import Progress
from storage.library import Library, Status
from documents import DocumentError, read_document

from .ingest import stored_config, tokenize


def upgrade(library: Library, engine: Engine, progress: Progress | None = None) -> int:
    """Upgrade every flagged document of this engine's model; progress(done, total) after each. Returns how
    many were upgraded (0, at once, for a library of today's formats)."""
    flagged = library.to_upgrade()
    for row in flagged:
        # Format 1 hashed a memory with its compute dtype, which no longer shapes one: today's hash, so the
        # same file dropped again is found rather than read twice (whatever model it was read with).
        if row["memory_format"] == 1 and row["config_hash"] != stored_config(row).memory_hash():
            library.set_config_hash(row["id"], stored_config(row).memory_hash())
    mine = [row for row in flagged if row["model_fingerprint"] == engine.fingerprint]
    for done, row in enumerate(mine, start=1):
        if row["memory_format"] != snapshot.FORMAT:
            if row["status"] == Status.READY:
                pack(library, engine, row["id"])
            else:
                library.restart(row["id"], snapshot.FORMAT)
        if library.text(row["id"]) is None:
            backfill(library, engine, row["id"])
        library.upgraded(row["id"])
        if progress is not None:
            progress(done, len(mine))
    return len(mine)


def pack(library: Library, engine: Engine, doc_id: int) -> None:
    """Convert a ready document's memory from format 1 to packed int8, in place; the old files go once the
    new ones are committed (Library.replace_memory)."""
    row = library.document(doc_id)
    stored = stored_config(row)
    bs, dtype = stored.block_size, stored.torch_dtype
    kv = ((engine.n_kv_heads, bs, engine.head_dim), dtype)
    shapes = {"layers": engine.n_layers, "k": kv, "v": kv, "reprs": ((engine.n_heads, engine.head_dim), dtype)}
    files = {"k": "blocks_k.raw", "v": "blocks_v.raw", "reprs": "blocks_reprs.raw"}
    state, blocks = snapshot.from_format1(*library.load(doc_id, shapes, files), bs)
    library.replace_memory(doc_id, state, blocks, snapshot.FORMAT, stored.memory_hash())


def backfill(library: Library, engine: Engine, doc_id: int) -> bool:
    """Give a document read before quotes (library schema 7) its text and its pages' numbers, from its kept file.

    The text is kept only where today's reader gives the very tokens the memory was read from (as many, on
    the same pages): a PDF whose running heads the reader now drops was read with them, and gets its pages'
    printed numbers but no text (its answers have no quote until it is read again). Returns whether the
    text was kept.
    """
    row = library.document(doc_id)
    path = library.upload_path(doc_id)
    if path is None:
        return False
    try:
        doc = read_document(path, name=row["source_name"])
    except DocumentError:
        return False
    tokens = tokenize(engine, doc)
    stored = library.pages(doc_id)
    spans = lambda pages: [(p["start_token"], p["end_token"]) for p in pages]     # noqa: E731
    if tokens.ids.numel() == row["tokens"] and spans(tokens.pages) == spans(stored):
        library.set_text(doc_id, doc.text, tokens.document_starts(), tokens.pages)
        return True
    if doc.kind == "pdf":               # its pages were labelled "p. N", N the physical number
        by_number = {p.number: p for p in doc.pages}
        numbers = [int(m.group(1)) if (m := re.fullmatch(r"p\. (\d+)", p["label"])) else None for p in stored]
        library.set_pages(doc_id, [dict(physical=n, printed=by_number[n].printed, label=by_number[n].label)
                                   if n in by_number else {} for n in numbers])
    return False
