"""The question's words against the spans' texts (storage.lexical), and how the focus weighs them."""
import sqlite3

import pytest
import torch

from reading.ingest import ingest, load_memory
from reading.service import Answered, ReadingService
from storage.lexical import match_query
from storage.library import Library

from .helpers import old_library
from .test_library import book, engine  # noqa: F401  (fixtures: a 5-page book, the tiny engine)


@pytest.fixture
def read(tmp_path, engine, book):  # noqa: F811
    library = Library(tmp_path / "lib")
    return library, ingest(library, engine, book).doc_id


def test_a_query_keeps_the_questions_content_words_and_nothing_fts5_would_parse():
    assert match_query("What is the pass key mentioned in the note left in this book?") == \
        '"pass" OR "key" OR "note" OR "left"'
    assert match_query('Who keeps "it" NEAR(x y)* -- AND OR "') == '"keeps" OR "near" OR "x" OR "y"'
    assert match_query("What is it?") == ""


def test_search_finds_the_spans_that_hold_a_word_numbered_as_the_library_numbers_spans(read):
    library, doc_id = read
    spans = library.spans(doc_id)
    found = library.search([doc_id], "Where does word3x41 appear?")[doc_id]
    assert found and all(score > 0 for score in found.values())
    assert {i for i, s in enumerate(spans) if "word3x41" in s["text"].split()} == set(found)
    both = library.search([doc_id], "word3x41 or word3x42 or word5x7?")[doc_id]
    best = max(both, key=both.get)
    assert {"word3x41", "word3x42"} <= set(spans[best]["text"].split())      # two matches beat one
    assert library.search([doc_id], "what is it?") == {} and library.search([doc_id], "zebra") == {}


def test_restarting_or_deleting_a_document_drops_its_words(read):
    library, doc_id = read
    count = lambda: library.db.execute("SELECT count(*) FROM span_words WHERE document_id = ?", [doc_id]).fetchone()[0]
    assert count() == len(library.spans(doc_id))
    library.restart(doc_id, 2)
    assert count() == 0 and library.search([doc_id], "word3x41") == {}
    library.delete(doc_id)
    assert library.db.execute("SELECT count(*) FROM span_words").fetchone()[0] == 0


def test_a_library_read_before_the_index_is_indexed_when_opened(tmp_path):
    old = old_library(tmp_path / "lib", 5, doc_id=7)
    old.execute("INSERT INTO blocks VALUES (7, 0, 4, 20, 1, 1, 'the lighthouse keeper', 1)")
    old.execute("INSERT INTO blocks VALUES (7, 1, 20, 36, 1, 1, 'of Port Emberly', 0)")
    old.commit()
    old.close()
    assert Library(tmp_path / "lib").search([7], "Who keeps the lighthouse at Port Emberly?")[7].keys() == {0, 1}


def test_word_matches_join_the_vote_by_rank_and_weight(read, engine):  # noqa: F811
    library, doc_id = read
    memory = load_memory(library, engine, doc_id)
    asker = engine.with_config(engine.cfg.replace(focus_blocks=2, focus_lexical=0.0))
    plain = asker.ask(memory, "what is it?", max_new_tokens=2).wait().trace
    target = next(b for b in range(memory.n_blocks) if abs(b - int(plain.pinned[0])) > 2)
    lexical = {target: 3.0, target + 1: 1.0}
    unweighted = asker.ask(memory, "what is it?", max_new_tokens=2, lexical=lexical).wait().trace
    assert torch.equal(unweighted.votes, plain.votes) and torch.equal(unweighted.pinned, plain.pinned)
    weighed = engine.with_config(asker.cfg.replace(focus_lexical=100.0)).ask(
        memory, "what is it?", max_new_tokens=2, lexical=lexical).wait().trace
    assert target in weighed.pinned.tolist() and int(weighed.votes.argmax()) == target
    # Reciprocal ranks (k = 5): the positive votes by their order, plus the weight over the matches' order.
    order = sorted(range(plain.votes.numel()), key=lambda i: -float(plain.votes[i]))
    want = torch.zeros_like(plain.votes)
    for rank, i in enumerate(order, 1):
        want[i] = 1 / (5 + rank) if plain.votes[i] > 0 else 0.0
    want[target] += 100 / (5 + 1)
    want[target + 1] += 100 / (5 + 2)
    assert torch.allclose(weighed.votes, want, atol=1e-5)


def test_the_app_asks_with_the_documents_word_matches(read, engine):  # noqa: F811
    library, doc_id = read
    asker = engine.with_config(engine.cfg.replace(focus_blocks=2, focus_lexical=100.0))
    service = ReadingService.start(asker, library)
    *_, done = service.ask(doc_id, "Which page holds word2x30?", max_new_tokens=2)
    assert isinstance(done, Answered) and "word2x30" in done.evidence[0]["text"].split()
    assert done.trace["pinned"][0] <= done.evidence[0]["block"] <= done.trace["pinned"][-1]
    positive = sum(v for v in done.trace["votes"] if v > 0)          # shown as "vote 97%", not "vote 97.31"
    assert [p["share"] for p in done.evidence] == pytest.approx([p["weight"] / positive for p in done.evidence])


def test_a_sqlite_without_fts5_gets_a_clear_message_and_the_library_stays_as_it_was(tmp_path, monkeypatch):
    from storage import schema
    from storage.library import LibraryError

    old = old_library(tmp_path / "lib", 5)
    old.commit()
    old.close()
    broken = [*schema.MIGRATIONS[:5], schema.MIGRATIONS[5].replace("fts5(", "fts5_missing(")]
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    with pytest.raises(LibraryError, match="no FTS5"):
        Library(tmp_path / "lib")
    with sqlite3.connect(tmp_path / "lib" / "library.db") as db:           # the failed step left nothing
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5 and "span_words" not in {
            r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    monkeypatch.undo()
    library = Library(tmp_path / "lib")                      # a SQLite with FTS5 migrates it as usual
    assert library.db.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    assert library.documents()[0]["title"] == "t"
