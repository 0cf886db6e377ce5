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
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import torch

from documents import MAX_BYTES, Document, Page, file_type, read_document
from infllm_engine import ContextMemory, Engine, InfLLMConfig, snapshot
from infllm_engine.encoder import Encoder
from infllm_engine.engine import Progress
from storage.library import Library, LibraryError, Status


WORD_REACH = 24     # characters a span's text may widen by at each end to show whole words
EMBEDDED = 64       # spans embedded at a time once a document is read (about 3 s on 2 cores)


class Outcome(StrEnum):
    READ = "ready"                          # read now (or the rest of an interrupted reading)
    FOUND = "already in the library"        # the same file, model and layout were read before


@dataclass
class Ingested:
    doc_id: int
    title: str
    outcome: Outcome
    tokens: int
    seconds: float
    resumed_from: int = 0  # tokens already committed by an earlier, interrupted run
    memory: ContextMemory | None = None   # the memory just built (None when it was already there)


class Tokens(NamedTuple):
    ids: torch.Tensor                       # [n] token ids of the document as the engine reads it
    pages: list[dict]                       # each page's row (Library.add): label, token and character spans...
    text: str                               # what the engine reads: the document prompt, then the document
    starts: list[int]                       # [n] where each token starts in text
    prompt: int                             # characters of the prompt before the document

    def document_starts(self) -> list[int]:
        """[n] where each token starts in the document's own text (the prompt's tokens at 0)."""
        return [max(0, a - self.prompt) for a in self.starts]


def stored_config(doc: dict) -> InfLLMConfig:
    """The engine config a library document was read with."""
    return InfLLMConfig.from_dict(json.loads(doc["config"]))


def tokenize(engine: Engine, doc: Document) -> Tokens:
    """The document's tokens, with the page and the character offset of each."""
    prefix = engine.document_prompt("")
    text = prefix + doc.text
    enc = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = [a for a, _ in enc["offset_mapping"]]
    spans: dict[int, list[int]] = {}
    for t, p in enumerate(doc.page_at([max(0, a - len(prefix)) for a in starts])):
        spans.setdefault(p, [t, t + 1])[1] = t + 1
    pages = [page_row(doc.pages[p], a, b) for p, (a, b) in sorted(spans.items())]
    return Tokens(ids, pages, text, starts, len(prefix))


def page_row(page: Page, start_token: int, end_token: int) -> dict:
    """A page as the library's pages table holds it."""
    return dict(label=page.label, start_token=start_token, end_token=end_token, physical=page.number,
                printed=page.printed, start_char=page.start, end_char=page.end)


def span_text(text: str, starts: list[int], a: int, b: int) -> str:
    """The text of tokens [a, b), widened to whole words.

    Sliced from the document's characters, not decoded from the tokens: a token span can cut a UTF-8
    character in two, which decodes as '\ufffd' at both ends.
    """
    lo = starts[a] if a < len(starts) else len(text)
    hi = starts[b] if b < len(starts) else len(text)
    # A word is finished within a few characters; text without spaces (Chinese, Japanese) is not cut by them.
    for _ in range(WORD_REACH):
        if lo == 0 or text[lo - 1].isspace():
            break
        lo -= 1
    for _ in range(WORD_REACH):
        if hi == len(text) or text[hi].isspace():
            break
        hi += 1
    return text[lo:hi].strip()


def ingest(library: Library, engine: Engine, path: Path, progress: Progress | None = None,
           commit_every: int = 8, max_bytes: int = MAX_BYTES, name: str | None = None,
           started: Callable[[int], None] | None = None, encoder: Encoder | None = None) -> Ingested:
    """Read one file into the library (or find it there, or resume it); returns what happened.

    name: the file's original name, when path is an upload that the library keeps (Library.keep_upload).
    started: called with the document's id as soon as it has one, before the long part.
    encoder: embeds the document's spans once it is read (their meaning, reading.question), None: not now.
    """
    path = Path(path)
    doc = read_document(path, max_bytes, name)
    # The library keeps its own copy (an upload is one already): the page view shows its pages, and it can be
    # read again in another mode.
    kept = library.keep_upload(path, file_type(doc.source_name))
    return ingest_document(library, engine, doc, progress, commit_every, kept.name, started, encoder)


def ingest_document(library: Library, engine: Engine, doc: Document, progress: Progress | None = None,
                    commit_every: int = 8, upload: str | None = None,
                    started: Callable[[int], None] | None = None, encoder: Encoder | None = None) -> Ingested:
    """Read a document already turned into text (see ingest); upload: its kept file under <data>/uploads."""
    t0 = time.perf_counter()
    tokens = tokenize(engine, doc)
    ids = tokens.ids
    if ids.numel() > engine.cfg.max_tokens:
        raise LibraryError(f"{doc.source_name} is {ids.numel():,} tokens, over the configured maximum of "
                           f"{engine.cfg.max_tokens:,}")
    cfg = engine.cfg
    row = library.find(doc.sha256, engine.fingerprint, cfg.memory_hash())
    if row is not None and row["status"] == Status.READY:
        return Ingested(row["id"], row["title"], Outcome.FOUND, row["tokens"], 0.0)
    memory = engine.new_memory()
    shapes = snapshot.block_shapes(memory)
    if row is None:
        doc_id = library.add(title=doc.title, source_name=doc.source_name, kind=doc.kind, sha256=doc.sha256,
                             fingerprint=engine.fingerprint, config_hash=cfg.memory_hash(), config=cfg.to_dict(),
                             tokens=ids.numel(), pages=tokens.pages, memory_format=snapshot.FORMAT,
                             upload=upload, text=doc.text, token_starts=tokens.document_starts())
    else:
        doc_id = row["id"]
        library.resume(doc_id)
        if row["state_file"]:
            memory = snapshot.restore(memory, *_saved(library, doc_id, shapes))
    if started is not None:
        started(doc_id)
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
            state = snapshot.state(memory)
            library.commit(doc_id, state, snapshot.blocks(memory, committed_blocks), stop, time.perf_counter() - t)
            # Read on from what was committed, as a resumed run would: the packed state (so both end
            # bit-identical), and the blocks mapped (RAM then holds only what retrieval touches). Blocks
            # resident on an accelerator stay where they are: they are what was stored, and copying the
            # file back at every commit would move the whole memory to the device again and again.
            blocks = [] if cfg.resident_blocks else [library.map_blocks(doc_id, shapes)]
            memory = snapshot.restore(engine.new_memory(), state, blocks,
                                      blocks_of=memory if cfg.resident_blocks else None)
            start = stop
    except Exception as err:        # (Ctrl-C is no Exception: the status stays 'reading', the next run resumes)
        library.fail(doc_id, str(err))
        raise
    spans = [memory.block_span(i) for i in range(memory.n_blocks)]
    rest = spans[-1][1] if spans else cfg.n_init          # the window, in block-sized spans: citable too
    spans += [(a, min(a + cfg.block_size, ids.numel())) for a in range(rest, ids.numel(), cfg.block_size)]
    texts = [span_text(tokens.text, tokens.starts, a, b) for a, b in spans]
    library.finish(doc_id, spans, texts, memory.n_blocks)
    if encoder is not None:             # what each span means, for questions in the reader's own words
        vectors = []
        for i in range(0, len(texts), EMBEDDED):
            vectors.append(encoder.encode(texts[i: i + EMBEDDED]))
            if progress is not None:    # between batches a waiting question has its turn (reading.worker)
                progress(ids.numel(), ids.numel())
        library.set_meaning(doc_id, encoder.name, torch.cat(vectors) if vectors else encoder.encode([]))
    return Ingested(doc_id, doc.title, Outcome.READ, ids.numel(), time.perf_counter() - t0, resumed, memory)


def load_memory(library: Library, engine: Engine, doc_id: int) -> ContextMemory:
    """A ready document's memory, block arrays memory-mapped: for asking questions."""
    row = library.document(doc_id)
    if row["status"] != Status.READY:
        raise LibraryError(f"{row['title']!r} is not ready ({row['status']}); ingest it again to finish reading")
    # Retrieval knobs (topk, ...) may differ from reading; the model and the memory's layout may not.
    if row["model_fingerprint"] != engine.fingerprint or stored_config(row).layout() != engine.cfg.layout():
        raise LibraryError(f"{row['title']!r} was read with another model or engine settings; ingest it again")
    if row["memory_format"] != snapshot.FORMAT:        # reading.upgrade converts it when a service opens the library
        raise LibraryError(f"{row['title']!r} is stored in an earlier format; open the library with the app to upgrade it")
    memory = engine.new_memory()
    return snapshot.restore(memory, *_saved(library, doc_id, snapshot.block_shapes(memory)))


def _saved(library: Library, doc_id: int, shapes: dict) -> tuple[dict, list[dict]]:
    state, blocks = library.load(doc_id, shapes)
    return state, [blocks]
