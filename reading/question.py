"""One question on the model's thread: the documents it probes, their memories, and the three signals that
say where its evidence is beside attention: the question's words (BM25 over the spans' texts) and its
meaning (a sentence encoder's cosine between the question and each span).

Runs on the model thread (reading.worker): the encoder is a model too, and a second thread computing with
torch brings its own OpenMP pool, which halved decoding on two cores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from infllm_engine import ContextMemory, Engine
from infllm_engine.encoder import Encoder
from storage.library import Library

from .citations import Shelf
from .ingest import load_memory

SPAN_MATCHES = 32   # spans of each document asked that word matches may name (storage.lexical)
RANK_K = 5          # the documents' rank fusion damping, as the spans' (infllm_engine.evidence)


@dataclass
class Gathered:
    documents: list[dict]                   # the documents probed, in the order of the memories
    rows: Shelf                             # each one's (row, spans, pages)
    memories: list[ContextMemory]
    lexical: list[dict[int, float] | None] | None     # None: word matches are off (focus_lexical 0)
    meaning: list[torch.Tensor | None] | None         # None: no encoder, or focus_meaning 0
    load_s: float                           # the memories mapped, the meanings made or loaded
    asked: torch.Tensor | None = None       # [dim] the question's embedding (with meaning)


def gather(library: Library, engine: Engine, encoder: Encoder | None, documents: list[dict], question: str,
           probed: int | None) -> Gathered:
    """The `probed` best of the documents (None: all) by their best word match and their best meaning, with
    what Engine.ask takes about each."""
    t0 = time.perf_counter()
    cfg = engine.cfg
    ids = [d["id"] for d in documents]
    words = library.search(ids, question, SPAN_MATCHES * len(ids)) if cfg.focus_lexical else {}
    asked = encoder.encode([question])[0] if encoder is not None and cfg.focus_meaning else None
    meant = meanings(library, encoder, documents, asked) if asked is not None else None
    if probed is not None and len(documents) > probed:
        documents = _best(documents, words, meant, probed)
        meant = [meant[ids.index(d["id"])] for d in documents] if meant is not None else None
    rows = [(d, library.spans(d["id"]), library.pages(d["id"])) for d in documents]
    memories = [load_memory(library, engine, d["id"]) for d in documents]
    lexical = [words.get(d["id"]) for d in documents] if cfg.focus_lexical else None
    return Gathered(documents, rows, memories, lexical, meant, time.perf_counter() - t0, asked)


def meanings(library: Library, encoder: Encoder, documents: list[dict], asked: torch.Tensor) -> list[torch.Tensor]:
    """Each document's [spans] cosine between its spans' embeddings and the question's (`asked`). A document
    read before its spans were embedded (or by another encoder) gets them now, once, from its spans' texts."""
    out = []
    for doc in documents:
        vectors = library.meaning(doc["id"], encoder.name)
        if vectors is None:
            vectors = embed(library, encoder, doc["id"])
        out.append(vectors.float() @ asked)
    return out


def embed(library: Library, encoder: Encoder, doc_id: int) -> torch.Tensor:
    """Embed and keep a document's spans' texts ([spans, dim]), in Library.spans order."""
    vectors = encoder.encode([span["text"] or "" for span in library.spans(doc_id)])
    library.set_meaning(doc_id, encoder.name, vectors)
    return vectors


def _best(documents: list[dict], words: dict, meant: list[torch.Tensor] | None, n: int) -> list[dict]:
    """The n documents ranked first by their best word match and their best meaning, fused by rank."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: -values[i])
        out = [0.0] * len(values)
        for r, i in enumerate(order, 1):
            out[i] = 1 / (RANK_K + r) if values[i] > 0 else 0.0
        return out
    score = ranks([max(words.get(d["id"], {0: 0.0}).values()) for d in documents])
    if meant is not None:
        score = [a + b for a, b in zip(score, ranks([float(m.max()) if m.numel() else 0.0 for m in meant]))]
    order = sorted(range(len(documents)), key=lambda i: -score[i])       # stable: the library's order breaks ties
    return [documents[i] for i in order[:n]]
