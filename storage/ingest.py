"""Reading a document into the library: file -> text with pages -> tokens -> memory on disk.

Progress is committed every few chunks. Commits fall on fixed token positions and the engine chunks
by absolute position, so a run that resumes from the last commit (after a crash or kill -9) ends
with the same memory as one that never stopped. A document is 'ready' only after its last commit.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from infllm_engine import ContextMemory, Engine, InfLLMConfig, snapshot

from .library import Library, LibraryError
from .readers import Document, read_document

Progress = Callable[[int, int], None]


@dataclass
class Ingested:
    doc_id: int
    title: str
    status: str            # ready | already in the library
    tokens: int
    seconds: float
    resumed_from: int = 0  # tokens already committed by an earlier, interrupted run
    memory: ContextMemory | None = None   # the memory just built (None when it was already there)


def token_pages(engine: Engine, doc: Document) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """Token ids of the document as the engine reads it, and each page's (label, start, end) token span."""
    prefix = engine.document_prompt("")
    enc = engine.tokenizer(prefix + doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = [max(0, a - len(prefix)) for a, _ in enc["offset_mapping"]]
    page_of_token = doc.page_at(starts)
    spans: dict[int, list[int]] = {}
    for t, p in enumerate(page_of_token):
        spans.setdefault(p, [t, t + 1])[1] = t + 1
    pages = [(doc.pages[p].label, a, b) for p, (a, b) in sorted(spans.items())]
    return ids, pages


def ingest(library: Library, engine: Engine, path: Path, progress: Progress | None = None,
           commit_every: int = 8, max_bytes: int = 200 * 2**20, name: str | None = None) -> Ingested:
    """Read one file into the library (or find it there, or resume it); returns what happened.

    name: the file's original name, when path is an upload that the library keeps (Library.keep_upload).
    """
    path = Path(path)
    doc = read_document(path, max_bytes, name)
    kept = path.name if path.parent.resolve() == (library.dir / "uploads").resolve() else None
    return ingest_document(library, engine, doc, progress, commit_every, kept)


def ingest_document(library: Library, engine: Engine, doc: Document, progress: Progress | None = None,
                    commit_every: int = 8, upload: str | None = None) -> Ingested:
    """Read a document already turned into text (see ingest); upload: its kept file under <data>/uploads."""
    t0 = time.perf_counter()
    ids, pages = token_pages(engine, doc)
    if ids.numel() > engine.cfg.max_tokens:
        raise LibraryError(f"{doc.source_name} is {ids.numel():,} tokens, over the configured maximum of "
                           f"{engine.cfg.max_tokens:,}")
    cfg = engine.cfg
    row = library.find(doc.sha256, engine.fingerprint, cfg.memory_hash())
    if row is not None and row["status"] == "ready":
        return Ingested(row["id"], row["title"], "already in the library", row["tokens"], 0.0)
    memory = engine.new_memory()
    if row is None:
        doc_id = library.add(title=doc.title, source_name=doc.source_name, kind=doc.kind, sha256=doc.sha256,
                             fingerprint=engine.fingerprint, config_hash=cfg.memory_hash(), config=cfg.to_dict(),
                             tokens=ids.numel(), pages=pages, upload=upload)
    else:
        doc_id = row["id"]
        if row["state_file"]:
            state, blocks = library.load(doc_id, memory_shapes(engine), cfg.torch_dtype)
            snapshot.restore(memory, state, [blocks])
    resumed = memory.length
    step = commit_every * cfg.chunk_size
    start = memory.length
    try:
        while start < ids.numel():
            stop = min(ids.numel(), (start // step + 1) * step)
            t = time.perf_counter()
            committed_blocks = memory.n_blocks
            shown = (lambda done, _total, s=start: progress(s + done, ids.numel())) if progress else None
            engine.read(ids[start:stop], memory, progress=shown)
            library.commit(doc_id, snapshot.state(memory), snapshot.blocks(memory, committed_blocks), stop,
                           time.perf_counter() - t)
            # Read on from the committed blocks, mapped: RAM then holds only what retrieval touches.
            snapshot.adopt_blocks(memory, library.map_blocks(doc_id, memory_shapes(engine), cfg.torch_dtype))
            start = stop
    except Exception as err:        # (Ctrl-C is no Exception: the status stays 'reading', the next run resumes)
        library.fail(doc_id, str(err))
        raise
    spans = [memory.block_span(i) for i in range(memory.n_blocks)]
    rest = spans[-1][1] if spans else cfg.n_init          # the window, in block-sized spans: citable too
    spans += [(a, min(a + cfg.block_size, ids.numel())) for a in range(rest, ids.numel(), cfg.block_size)]
    library.finish(doc_id, spans, [engine.tokenizer.decode(ids[a:b].tolist()) for a, b in spans], memory.n_blocks)
    return Ingested(doc_id, doc.title, "ready", ids.numel(), time.perf_counter() - t0, resumed, memory)


def memory_shapes(engine: Engine) -> dict[str, tuple[int, ...]]:
    """Row shapes of a block, per layer, for Library.load."""
    bs = engine.cfg.block_size
    return {"layers": (engine.n_layers,), "k": (engine.n_kv_heads, bs, engine.head_dim),
            "v": (engine.n_kv_heads, bs, engine.head_dim), "reprs": (engine.n_heads, engine.head_dim)}


def load_memory(library: Library, engine: Engine, doc_id: int):
    """A ready document's memory, block arrays memory-mapped: for asking questions."""
    row = library.document(doc_id)
    if row["status"] != "ready":
        raise LibraryError(f"{row['title']!r} is not ready ({row['status']}); ingest it again to finish reading")
    # Retrieval knobs (topk, ...) may differ from reading; the model and the memory's layout may not.
    built = InfLLMConfig(**json.loads(row["config"]))
    if row["model_fingerprint"] != engine.fingerprint or built.layout() != engine.cfg.layout():
        raise LibraryError(f"{row['title']!r} was read with another model or engine settings; ingest it again")
    state, blocks = library.load(doc_id, memory_shapes(engine), engine.cfg.torch_dtype)
    return snapshot.restore(engine.new_memory(), state, [blocks])
