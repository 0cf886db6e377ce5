"""The persistent library with a tiny model: ingest, reload after a restart, delete, bad input."""
import json

import pytest
import torch

from infllm_engine import Engine, InfLLMConfig, snapshot
from reading.ingest import Outcome, ingest, load_memory, stored_config, tokenize
from reading.service import Answered, ReadingService
from reading.upgrade import backfill, upgrade
from storage import tensors
from storage.library import Library, LibraryError
from documents import DocumentError, read_document

from .conftest import tiny_llama, tiny_tokenizer
from .helpers import format1, old_library

SMALL = dict(n_init=4, n_local=64, block_size=16, repr_topk=2, chunk_size=32, topk=2, cache_blocks=8)
BOOK = "\f".join(f"Page {p}. " + " ".join(f"word{p}x{i}" for i in range(60)) for p in range(1, 6))


@pytest.fixture
def engine():
    return Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL), fingerprint="tiny-a")


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(BOOK)
    return path


def test_a_document_is_read_once_and_its_blocks_map_to_pages(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book, commit_every=2)
    row = library.document(done.doc_id)
    assert (row["status"], row["pages"], row["tokens"]) == ("ready", 5, done.tokens) and done.tokens > 1500
    blocks = library.blocks(done.doc_id)
    assert len(blocks) == row["n_blocks"] > 50
    assert blocks[0]["first_page"] == 1 and blocks[-1]["last_page"] == 5
    assert all(a["first_page"] <= b["first_page"] for a, b in zip(blocks, blocks[1:]))
    assert row["bytes"] > 0 and len(list(library.memory_dir(done.doc_id).glob("state-*"))) == 1
    again = ingest(library, engine, book)
    assert again.outcome == Outcome.FOUND and again.doc_id == done.doc_id
    assert library.document("book")["id"] == done.doc_id          # by title too


def test_blocks_resident_on_the_device_are_read_and_stored_as_on_the_host(tmp_path, engine, book):
    """blocks_on="device" keeps the blocks where they are between commits instead of mapping the file again:
    the files and the answer must be the same, byte for byte, as the host's."""
    resident = engine.with_config(engine.cfg.replace(blocks_on="device"))
    on_host = ingest(Library(tmp_path / "host"), engine, book, commit_every=2)
    on_device = ingest(Library(tmp_path / "device"), resident, book, commit_every=2)
    assert on_device.memory.layers[0].blocks.resident and not on_host.memory.layers[0].blocks.resident
    for a, b in zip(sorted(Library(tmp_path / "host").memory_dir(on_host.doc_id).iterdir()),
                    sorted(Library(tmp_path / "device").memory_dir(on_device.doc_id).iterdir())):
        assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name
    asked = [e.ask(d.memory, "which words?", max_new_tokens=8).wait() for e, d in ((engine, on_host), (resident, on_device))]
    assert asked[0].token_ids == asked[1].token_ids


def test_answers_are_identical_after_a_restart(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book)
    before = engine.ask(done.memory, "which words?", max_new_tokens=10).wait()

    restarted = Engine(engine.model, engine.tokenizer, InfLLMConfig(**SMALL), fingerprint="tiny-a")
    memory = load_memory(Library(tmp_path / "lib"), restarted, done.doc_id)
    after = restarted.ask(memory, "which words?", max_new_tokens=10).wait()
    assert after.token_ids == before.token_ids and after.trace.to_dict() == before.trace.to_dict()


def test_a_document_stored_with_knobs_removed_since_still_opens_and_answers(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book)
    # As a library written before focus_window, focus_neighbours and repetition_penalty were removed keeps it.
    config = {**json.loads(library.document(done.doc_id)["config"]), "focus_window": "pin",
              "focus_neighbours": "both", "repetition_penalty": 1.1}
    library.db["documents"].update(done.doc_id, {"config": json.dumps(config)})
    assert stored_config(library.document(done.doc_id)) == engine.cfg
    *_, answered = ReadingService.start(engine, Library(tmp_path / "lib")).ask(done.doc_id, "which words?",
                                                                                max_new_tokens=10)
    assert isinstance(answered, Answered) and answered.text and answered.trace["pinned"]
    assert ingest(library, engine, book).doc_id == done.doc_id        # the stored memory is the one found


def test_a_memory_from_another_model_is_never_used(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    first = ingest(library, engine, book).doc_id
    other = Engine(engine.model, engine.tokenizer, InfLLMConfig(**SMALL), fingerprint="tiny-b")
    with pytest.raises(LibraryError, match="another model"):
        load_memory(library, other, first)
    assert ingest(library, other, book).doc_id != first               # read again for that model


def test_deleting_frees_the_disk_and_rows(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    doc_id = ingest(library, engine, book).doc_id
    conversation = library.new_conversation(doc_id, "q")
    library.add_message(conversation, doc_id, "user", "q")
    assert library.memory_dir(doc_id).exists()
    library.delete(doc_id)
    assert not library.memory_dir(doc_id).exists() and library.documents() == []
    assert library.db["blocks"].count == library.db["pages"].count == library.db["messages"].count == 0


def test_conversations_round_trip_with_their_traces(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    doc_id = ingest(library, engine, book).doc_id
    answer = engine.ask(load_memory(library, engine, doc_id), "what?", max_new_tokens=4).wait()
    conversation = library.new_conversation(doc_id, "what?")
    library.add_message(conversation, doc_id, "user", "what?")
    library.add_message(conversation, doc_id, "assistant", answer.text, "infllm", answer.trace.to_dict(), answer.timings)
    saved = Library(tmp_path / "lib").messages(conversation)
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert saved[1]["trace"] == answer.trace.to_dict() and saved[1]["content"] == answer.text


def test_a_conversation_takes_messages_about_its_own_document_only(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    doc_id = ingest(library, engine, book).doc_id
    other = ingest(library, engine.with_config(engine.cfg.replace(method="streaming")), book).doc_id
    conversation = library.new_conversation(doc_id, "q")
    quote = {"text": "Gamma text on page three.", "page": "p. 3", "chars": [5, 30]}
    library.add_message(conversation, doc_id, "assistant", "a", quote=quote)
    with pytest.raises(LibraryError, match="about other documents"):
        library.add_message(conversation, other, "user", "q")
    across = library.new_conversation("all", "q")                # a question across the library is its own scope
    library.add_message(across, "all", "user", "q")
    for scope, conv in (("all", conversation), (doc_id, across), ("1,2", across)):
        with pytest.raises(LibraryError, match="about other documents"):
            library.add_message(conv, scope, "user", "q")
    assert [c["id"] for c in library.conversations("all")] == [across]
    assert [c["id"] for c in library.conversations(doc_id)] == [conversation]
    with pytest.raises(LibraryError, match="no conversation 99"):
        library.conversation(99, doc_id)
    assert [m["quote"] for m in library.messages(conversation)] == [quote]        # the quote round-trips


def test_a_document_keeps_its_text_and_where_each_token_starts(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    doc = read_document(book)
    doc_id = ingest(library, engine, book).doc_id
    text, starts = library.text(doc_id)
    tokens = tokenize(engine, doc)
    assert text == doc.text and list(starts) == tokens.document_starts() and len(starts) == tokens.ids.numel()
    pages = library.pages(doc_id)
    assert [(p["physical"], p["start_char"], p["end_char"]) for p in pages] == [(p.number, p.start, p.end)
                                                                                for p in doc.pages]
    page = pages[2]                     # its characters hold its tokens' text
    assert text[page["start_char"]: page["end_char"]].startswith("Page 3. word3x0 ")
    assert text[starts[page["start_token"]]: starts[page["end_token"]]].strip() == \
        text[page["start_char"]: page["end_char"]]


@pytest.mark.parametrize("name, data, words", [
    ("broken.pdf", b"%PDF-1.4\n1 0 obj <<", "not a readable PDF"),
    ("image.pdf", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a readable PDF"),
    ("empty.txt", b"", "empty"),
    ("notes.docx", b"PK\x03\x04 zip", "supported"),
])
def test_bad_files_get_a_clear_message_and_leave_the_library_intact(tmp_path, engine, book, name, data, words):
    library = Library(tmp_path / "lib")
    kept = ingest(library, engine, book).doc_id
    bad = tmp_path / name
    bad.write_bytes(data)
    with pytest.raises(DocumentError, match=words):
        ingest(library, engine, bad)
    assert [d["id"] for d in library.documents()] == [kept]
    assert load_memory(library, engine, kept).length > 0


def test_an_input_over_the_maximum_is_refused_before_anything_is_added(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    small = engine.with_config(engine.cfg.replace(max_tokens=100))
    with pytest.raises(LibraryError, match="over the configured maximum of 100"):
        ingest(library, small, book)
    assert library.documents() == []


def test_an_epub_is_read_into_the_library_with_its_chapters_as_pages(tmp_path, engine):
    from .test_readers import make_epub

    library = Library(tmp_path / "lib")
    done = ingest(library, engine, make_epub(tmp_path / "book.epub"))
    assert library.document(done.doc_id)["kind"] == "epub"
    labels = [p["label"] for p in library.pages(done.doc_id)]
    assert labels == ["Chapter One: Arrival", "Departure", "Chapter 3"]
    pages = library.pages(done.doc_id)
    assert all(a["end_token"] <= b["start_token"] for a, b in zip(pages, pages[1:]))
    answer = engine.ask(load_memory(library, engine, done.doc_id), "Who left?", max_new_tokens=3).wait()
    assert len(answer.token_ids) == 3


def test_each_block_keeps_its_text_for_showing_passages(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book)
    ids = engine.tokenizer(engine.document_prompt("") + BOOK, add_special_tokens=False)["input_ids"]
    for block in library.spans(done.doc_id):
        tokens = " ".join(engine.tokenizer.decode(ids[block["start_token"]:block["end_token"]]).split())
        shown = " ".join(block["text"].split())
        inner = " ".join(tokens.split()[1:-1])          # the words the span holds whole
        assert inner in shown and len(shown) < len(tokens) + 2 * 24   # widened to whole words, no further
        assert set(shown.split()) <= set(BOOK.split() + engine.document_prompt("").split())


def test_passages_show_whole_characters_and_words(tmp_path, engine):
    # The tiny tokenizer is byte-level: every multi-byte character is cut in two somewhere.
    text = " ".join(["café naïve Straße 日本語 ünïcödé"] * 60)
    path = tmp_path / "utf8.txt"
    path.write_text(text)
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, path)
    spans = library.spans(done.doc_id)
    cut = [engine.tokenizer.decode(engine.tokenizer(engine.document_prompt("") + text)["input_ids"][s["start_token"]:
                                                                                                    s["end_token"]])
           for s in spans]
    assert any("\ufffd" in c for c in cut)                         # token spans do cut characters
    words = set(text.split()) | set(engine.document_prompt("").split())
    for span in spans:
        assert "\ufffd" not in span["text"]
        assert set(span["text"].split()) <= words                   # whole words only


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's data, from /proc/self/maps (Linux)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else None
    return None


def test_reading_goes_on_from_the_committed_blocks_on_disk_and_matches_an_all_in_ram_read(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book, commit_every=2)
    ids = tokenize(engine, read_document(book, 2**20)).ids
    in_ram = engine.new_memory()
    step = 2 * engine.cfg.chunk_size
    for a in range(0, ids.numel(), step):     # the same reading with its commits' save and restore in RAM
        engine.read(ids[a: a + step], in_ram)
        in_ram = snapshot.restore(engine.new_memory(), snapshot.state(in_ram), [snapshot.blocks(in_ram)])
    assert done.memory.n_blocks == in_ram.n_blocks > 50
    for layer, ram in zip(done.memory.layers, in_ram.layers):
        assert layer.blocks.tail.n == 0                                  # nothing kept in RAM since the last commit
        assert _mapped_file(layer.blocks.base.fields["k"]).endswith("k.int8.raw")   # read on from the file's mapping
        assert not (_mapped_file(ram.blocks.base.fields["k"]) or "").endswith(".raw")
        got, want = layer.blocks.blocks(), ram.blocks.blocks()
        assert all(torch.equal(got[name], want[name]) for name in want)


def test_the_window_is_kept_as_citable_spans_after_the_memory_blocks(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book)
    blocks, spans = library.blocks(done.doc_id), library.spans(done.doc_id)
    window = spans[len(blocks):]
    assert spans[: len(blocks)] == blocks and all(b["in_memory"] == 1 for b in blocks)
    assert window and all(w["in_memory"] == 0 for w in window)
    assert window[0]["start_token"] == blocks[-1]["end_token"] and window[-1]["end_token"] == done.tokens
    assert [w["block"] for w in window] == list(range(len(blocks), len(spans)))
    assert window[-1]["last_page"] == 5 and "word5x59" in "".join(w["text"] for w in window)


def test_a_library_from_before_window_spans_is_migrated_and_its_blocks_stay_in_memory(tmp_path):
    old = old_library(tmp_path / "lib", 2)
    old.execute("INSERT INTO blocks VALUES (1, 0, 4, 20, 1, 1, 'old text')")
    old.commit()
    old.close()
    library = Library(tmp_path / "lib")
    assert [b["in_memory"] for b in library.blocks(1)] == [1] and library.spans(1) == library.blocks(1)


def test_conversations_and_their_messages_survive_the_table_rebuild_of_migration_8(tmp_path):
    old = old_library(tmp_path / "lib", 7)
    old.execute("INSERT INTO conversations (id, document_id, title) VALUES (4, 1, 'kept')")
    old.execute("INSERT INTO messages (conversation_id, role, content) VALUES (4, 'user', 'still here?')")
    old.commit()
    old.close()
    library = Library(tmp_path / "lib")
    assert [c["title"] for c in library.conversations(1)] == ["kept"]
    assert [m["content"] for m in library.messages(4)] == ["still here?"]
    library.delete(1)                                       # the document's conversations still go with it
    assert library.messages(4) == [] and library.conversations(1) == []


def test_schema_step_9_gives_what_earlier_versions_stored_todays_form_and_flags_what_needs_the_model(tmp_path):
    old = old_library(tmp_path / "lib", 8)
    old.execute("INSERT INTO blocks (document_id, block, start_token, end_token, first_page, last_page, text) "
                "VALUES (1, 0, 4, 20, 1, 1, ?)", ["\ufffdhalf a character\ufffd"])
    old.execute("INSERT INTO conversations (id, document_id, title) VALUES (4, 1, 'q')")
    old.execute("INSERT INTO messages (conversation_id, role, content, trace, quote) VALUES (4, 'assistant', 'a', ?, ?)",
                [json.dumps({"steps": [], "records": []}), json.dumps({"text": "x", "page": "p. 1", "chars": [0, 1]})])
    old.execute("INSERT INTO conversations (id, shelf, title) VALUES (5, 'all', 'q')")
    old.execute("INSERT INTO messages (conversation_id, role, content, method, trace) VALUES (5, 'assistant', 'a', "
                "'infllm', ?)", [json.dumps({"steps": [], "records": [], "documents": [1, 2]})])
    old.commit()
    old.close()
    library = Library(tmp_path / "lib")
    assert library.spans(1)[0]["text"] == "half a character"
    answer, = library.messages(4)
    assert answer["method"] == "infllm" and answer["trace"]["documents"] == [1]
    assert (answer["quote"]["document"], answer["quote"]["title"]) == (1, "t")
    assert library.messages(5)[0]["trace"]["documents"] == [1, 2]           # a shelf's answer names its own
    assert [d["id"] for d in library.to_upgrade()] == [1]                    # no text kept: the model's work


def test_a_failed_document_read_again_is_reading_while_it_resumes(tmp_path, engine, book):
    library = Library(tmp_path / "lib")

    def boom(done: int, total: int) -> None:
        if done > 200:
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        ingest(library, engine, book, progress=boom, commit_every=1)
    (row,) = library.documents()
    assert (row["status"], row["error"]) == ("failed", "disk full") and row["read_tokens"] > 0
    seen = []
    done = ingest(library, engine, book, started=lambda doc_id: seen.append(dict(library.document(doc_id))))
    assert done.doc_id == row["id"] and done.resumed_from == row["read_tokens"]
    assert (seen[0]["status"], seen[0]["error"]) == ("reading", None)     # not "failed" (deletable) meanwhile
    assert library.document(row["id"])["status"] == "ready"


def test_the_unused_segments_table_is_dropped(tmp_path):
    library = Library(tmp_path / "lib")
    assert "segments" not in library.db.table_names() and "blocks" in library.db.table_names()


def write_format1(library: Library, engine: Engine, book) -> tuple[int, object]:
    """A document as this app stored it before memory format 2: K/V unpacked, in the compute dtype,
    hashed with its dtype. Returns (its id, the memory it was read into)."""
    doc = read_document(book, 2**20)
    tokens = tokenize(engine, doc)
    memory = engine.read(tokens.ids)
    doc_id = library.add(title=doc.title, source_name=doc.source_name, kind=doc.kind, sha256=doc.sha256,
                         fingerprint=engine.fingerprint, config_hash="hash-with-dtype", config=engine.cfg.to_dict(),
                         tokens=tokens.ids.numel(), pages=tokens.pages, memory_format=1)
    state, blocks = format1(memory)
    folder = library.memory_dir(doc_id)
    for name in ("k", "v", "reprs"):
        rows = torch.stack([blocks[f"{i}.{name}"] for i in range(len(memory.layers))], dim=1)
        tensors.append_rows(folder / f"blocks_{name}.raw", rows)
    tensors.write(folder / f"state-{memory.length}.safetensors", state)
    library.db["documents"].update(doc_id, {"state_file": f"state-{memory.length}.safetensors",
                                            "n_blocks": memory.n_blocks, "read_tokens": memory.length})
    library.finish(doc_id, [memory.block_span(i) for i in range(memory.n_blocks)])
    library.db["documents"].update(doc_id, {"upgrade": 1})         # as schema step 9 flags it
    return doc_id, memory


def test_a_memory_of_the_old_format_is_converted_in_place_once_when_a_service_opens_the_library(tmp_path, engine,
                                                                                               book):
    library = Library(tmp_path / "lib")
    doc_id, memory = write_format1(library, engine, book)
    before = library.document(doc_id)["bytes"]
    with pytest.raises(LibraryError, match="earlier format"):         # no path but the upgrade reads format 1
        load_memory(library, engine, doc_id)
    seen = []
    ReadingService(engine, library, upgrading=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 1)] and library.to_upgrade() == []
    assert ingest(library, engine, book).outcome == Outcome.FOUND       # re-keyed: the same file is not read twice
    converted = load_memory(library, engine, doc_id)
    row = library.document(doc_id)
    files = sorted(p.name for p in library.memory_dir(doc_id).iterdir())
    assert row["memory_format"] == snapshot.FORMAT and not any(f.startswith("blocks_") for f in files)
    assert {"k.int8.raw", "v.int8.raw", "reprs.float16.raw"} <= set(files) and row["bytes"] < before / 2.5
    assert converted.n_blocks == memory.n_blocks > 10 and converted.length == memory.length
    for old, new in zip(memory.layers, converted.layers):
        ids = torch.arange(memory.n_blocks)
        for a, b in zip(old.blocks.take(ids), new.blocks.take(ids)):     # each block within int8 rounding
            assert (a - b).abs().max() <= a.abs().max() / 127
    assert engine.ask(converted, "which word?", max_new_tokens=4).wait().token_ids
    assert upgrade(library, engine) == 0                                  # converted once: nothing left to do
    assert library.document(doc_id)["state_file"] == row["state_file"]


def test_a_reading_left_unfinished_in_the_old_format_starts_over_in_the_new_one(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    doc_id, _ = write_format1(library, engine, book)
    library.db["documents"].update(doc_id, {"status": "reading", "read_tokens": 512})   # as if stopped midway
    other = Engine(engine.model, engine.tokenizer, InfLLMConfig(**SMALL), fingerprint="tiny-b")
    assert upgrade(library, other) == 0 and library.to_upgrade()         # another model's service leaves it
    assert upgrade(library, engine) == 1
    done = ingest(library, engine, book)
    row = library.document(doc_id)
    assert done.doc_id == doc_id and done.outcome == Outcome.READ and done.resumed_from == 0
    assert (row["status"], row["memory_format"]) == ("ready", snapshot.FORMAT)
    assert not any(p.name.startswith("blocks_") for p in library.memory_dir(doc_id).iterdir())
    assert load_memory(library, engine, doc_id).n_blocks == done.memory.n_blocks > 10


def test_a_memory_read_in_fp32_is_asked_by_a_bf16_engine(tmp_path, engine, book):
    """The stored form is the same in every compute dtype, so a library moves between machines."""
    library = Library(tmp_path / "lib")
    done = ingest(library, engine, book)
    bf16 = Engine(tiny_llama().to(torch.bfloat16), tiny_tokenizer(), InfLLMConfig(**SMALL, dtype="bfloat16"),
                  fingerprint="tiny-a")
    assert bf16.cfg.memory_hash() == engine.cfg.memory_hash()
    assert ingest(library, bf16, book).outcome == Outcome.FOUND              # not read a second time
    memory = load_memory(library, bf16, done.doc_id)
    layer = memory.layers[0]
    assert layer.recent_k.dtype == torch.bfloat16 and layer.blocks.blocks()["reprs"].dtype == torch.bfloat16
    assert torch.equal(layer.blocks.blocks()["k"], done.memory.layers[0].blocks.blocks()["k"])   # the same bytes
    assert bf16.ask(memory, "which word?", max_new_tokens=4).wait().token_ids


def forget_text(library: Library, doc_id: int) -> None:
    """The document as a library of schema 6 left it: no text, pages labelled by their PDF number only."""
    with library.db.conn:
        library.db.execute("DELETE FROM texts WHERE document_id = ?", [doc_id])
        library.db.execute("UPDATE pages SET label = 'p. ' || physical, physical = NULL, printed = NULL, "
                           "start_char = NULL, end_char = NULL WHERE document_id = ?", [doc_id])


def test_a_document_read_before_texts_were_kept_gets_them_from_its_kept_file(tmp_path, engine, book):
    library = Library(tmp_path / "lib")
    doc_id = ingest(library, engine, book).doc_id
    pages, (text, starts) = library.pages(doc_id), library.text(doc_id)
    forget_text(library, doc_id)
    assert library.text(doc_id) is None
    assert backfill(library, engine, doc_id)                         # today's reader gives the same tokens
    assert library.text(doc_id) == (text, starts) and library.pages(doc_id) == pages
    forget_text(library, doc_id)                                     # and the service does it once, on opening
    library.db["documents"].update(doc_id, {"upgrade": 1})
    ReadingService(engine, library)
    assert library.text(doc_id) == (text, starts) and library.to_upgrade() == []


def test_a_pdf_read_with_its_running_heads_gets_its_printed_numbers_but_no_text(tmp_path, engine):
    from .test_readers import make_pdf, running_head_pages

    heads, _ = running_head_pages()
    pdf = tmp_path / "impatient.pdf"
    pdf.write_bytes(make_pdf([p.split("\n") for p in heads]))
    library = Library(tmp_path / "lib")
    doc_id = ingest(library, engine, pdf).doc_id
    forget_text(library, doc_id)
    with library.db.conn:       # read with the heads in its text: its pages' tokens lie elsewhere
        library.db.execute("UPDATE pages SET end_token = end_token + 3 WHERE document_id = ?", [doc_id])
    assert not backfill(library, engine, doc_id) and library.text(doc_id) is None
    pages = library.pages(doc_id)
    assert [p["label"] for p in pages] == [f"PDF p. {n}" for n in range(1, 5)] + [f"p. {n}" for n in range(1, 9)]
    assert [p["physical"] for p in pages] == list(range(1, 13)) and pages[4]["printed"] == "1"


def test_a_mixed_service_reads_with_the_bf16_copy_and_answers_with_the_fp32_weights(tmp_path, engine, book, monkeypatch):
    mixed = engine.with_config(engine.cfg.replace(dtype="mixed"))
    service = ReadingService.start(mixed, Library(tmp_path / "lib"))
    done = service.read_now(book)
    row = service.library.document(done.doc_id)
    assert stored_config(row).dtype == "mixed"
    asked = mixed.cfg.answering(stored_config(row))        # the stored layout, asked in fp32 on this machine
    assert asked.dtype == "float32" and asked.layout() == mixed.cfg.layout()
    used = []
    real_ask = Engine.ask
    monkeypatch.setattr(Engine, "ask", lambda self, memories, *a, **k: used.append(
        (self.model, memories[0].layers[0].recent_k.dtype)) or real_ask(self, memories, *a, **k))
    *_, answered = service.ask(done.doc_id, "which words?", max_new_tokens=6)
    assert isinstance(answered, Answered) and answered.text
    assert used == [(engine.model, torch.float32)]         # the fp32 weights, the memory loaded in fp32
    # A config stored elsewhere (another device, dtype and kernels) is read on and asked here with this engine's.
    config = {**json.loads(row["config"]), "device": "cuda", "dtype": "bfloat16", "kernels": "triton"}
    service.library.db["documents"].update(done.doc_id, {"config": json.dumps(config)})
    here = mixed.cfg.for_memory(stored_config(service.library.document(done.doc_id)))
    assert (here.device, here.dtype, here.kernels) == ("cpu", "mixed", "auto") and here.layout() == mixed.cfg.layout()
