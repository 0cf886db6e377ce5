"""Which stored spans share a question's rarer words: SQLite FTS5 (BM25) over each span's text.

A 135M model's attention misses some facts that a word match finds at once: on bench.needle, a pass
key asked with "Somebody left a note with a pass key in this book. Which number is it?" drew the
model's attention to a phone number in the local window, while BM25 over the spans' texts put the
planted note first. The question focus (infllm_engine.focus) adds these scores to its own vote.

The index (`span_words`, migration 6) holds the text of every span a document can cite: its memory
blocks and the pieces of its local window, numbered as Library.spans numbers them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from sqlite_utils import Database

# Words that say how a question is asked rather than what about; BM25 would weigh them little anyway,
# but an OR query over them matches nearly every span.
STOPWORDS = frozenset("""
a an the of in on at to for from by with about as into onto than then so if or and not no nor but
is are was were be been being am do does did done has have had having can could will would shall should
may might must it its it's this that these those there here what which who whom whose how when where why
many much any some each every all both either neither one i me my we our us you your he him his she
her they them their mention mentioned mentions according document book text please tell say says said
""".split())


def match_query(question: str) -> str:
    """The FTS5 query for a question: its content words, each quoted, any of them ("" when none)."""
    words = dict.fromkeys(w for w in re.findall(r"[^\W_]+", question.lower()) if w not in STOPWORDS)
    return " OR ".join(f'"{w}"' for w in words)


def search(db: Database, doc_ids: Sequence[int], question: str, limit: int = 32) -> dict[int, dict[int, float]]:
    """Document -> span number -> BM25 score (higher is better) of the best `limit` spans of these documents
    that share a word with the question. One query over one index: the scores of different documents compare."""
    query = match_query(question)
    if not query or not doc_ids:
        return {}
    marks = ",".join("?" * len(doc_ids))
    rows = db.execute(f"SELECT document_id, span, -bm25(span_words) FROM span_words WHERE span_words MATCH ? "
                      f"AND document_id IN ({marks}) ORDER BY bm25(span_words) LIMIT ?",
                      [query, *doc_ids, limit]).fetchall()
    found: dict[int, dict[int, float]] = {}
    for doc, span, score in rows:
        found.setdefault(int(doc), {})[int(span)] = float(score)
    return found
