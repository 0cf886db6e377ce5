"""The page's handlers as plain functions, with a tiny model: upload, progress, chat, inspection, delete."""
import json
import re
import threading
import time

import pytest

from infllm_engine import Engine, InfLLMConfig, Summary
from reading.service import ReadingService
from reading.worker import Job
from storage.library import Library, LibraryError
from ui import chat as ch
from ui import handlers as h
from ui import formatting as fmt
from ui import inspector

from .conftest import tiny_llama, tiny_tokenizer
from .test_readers import make_pdf

SMALL = dict(n_init=4, n_local=64, block_size=16, repr_topk=2, chunk_size=32, topk=2, cache_blocks=8)
BOOK = "\f".join(f"Page {p}. " + " ".join(f"word{p}x{i}" for i in range(60)) for p in range(1, 6))
SETTINGS = h.Settings("infllm", topk=2, n_local=64, max_new_tokens=6)
QUOTABLE = ("\f".join(f"Page {p}. " + " ".join(f"Word {p} {i} is here." for i in range(40)) for p in range(1, 4))
            + "\fThe lighthouse keeper of Port Emberly is named Mirela Vance. It is a quiet post.")


@pytest.fixture
def app(tmp_path):
    engine = Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL), fingerprint="tiny")
    return h.App(ReadingService.start(engine, Library(tmp_path / "data"), max_upload_bytes=1 << 20))


def dropped(tmp_path, name: str, data: str | bytes) -> str:
    """A file as Gradio hands it over: a temp path that ends in the original name."""
    folder = tmp_path / "gradio-tmp" / str(time.monotonic_ns())
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def read(app, tmp_path, name="book.txt", data=BOOK) -> int:
    note = h.upload(app, [dropped(tmp_path, name, data)], SETTINGS)
    assert "queued" in note
    app.worker.wait()
    return app.library.documents()[-1]["id"]


def test_a_dropped_file_is_kept_under_its_hash_read_in_the_background_and_listed(app, tmp_path):
    doc_id = read(app, tmp_path)
    kept = list((app.library.dir / "uploads").iterdir())
    assert [p.name for p in kept] == [f"{app.library.document(doc_id)['sha256']}.txt"]
    rows = h.library_rows(app)
    assert rows[0][:6] == [doc_id, "book", "infllm", "ready", 5, fmt.count(app.library.document(doc_id)["tokens"])]
    assert h.document_choices(app) == [("book · infllm", doc_id)]
    assert "✓ book.txt: read" in h.progress_html(app)


def test_counts_and_sizes_fit_the_librarys_narrow_columns():
    assert [fmt.count(n) for n in (0, 812, 9_994, 9_996, 31_531, 220_935, 999_499, 999_500, 1_050_000, 2_000_000_000)] == \
        ["0", "812", "9.99K", "10.0K", "31.5K", "221K", "999K", "1.00M", "1.05M", "2.00G"]
    assert [fmt.size(n) for n in (512, 2**10 * 850, 380_843_212, 2_900_000_000, int(2**20 * 999.6))] == \
        ["512 B", "850 KB", "363 MB", "2.7 GB", "1.0 GB"]


def test_a_file_name_never_becomes_a_path(app, tmp_path):
    doc_id = read(app, tmp_path, name="..%2F..%2Fevil.txt")
    assert app.library.document(doc_id)["source_name"] == "..%2F..%2Fevil.txt"
    stored = {p.relative_to(app.library.dir).parts[0] for p in app.library.dir.rglob("*") if p.is_file()}
    assert stored <= {"library.db", "library.db-wal", "library.db-shm", "uploads", "memory"}
    assert [p.name for p in (app.library.dir / "uploads").iterdir()] == [f"{app.library.document(doc_id)['sha256']}.txt"]


def test_bad_uploads_get_readable_messages_and_add_nothing(app, tmp_path):
    note = h.upload(app, [dropped(tmp_path, "notes.docx", "x"), dropped(tmp_path, "big.txt", "y" * (2 << 20))],
                    SETTINGS)
    assert "unsupported file type '.docx'" in note and "over the 1 MB limit" in note
    note = h.upload(app, [dropped(tmp_path, "empty.txt", "")], SETTINGS)
    app.worker.wait()
    assert "empty (0 bytes)" in h.progress_html(app) and app.library.documents() == []
    with pytest.raises(h.UserError, match="n_local"):
        h.upload(app, [dropped(tmp_path, "ok.txt", BOOK)], h.Settings(n_local=0))


def test_progress_shows_tokens_per_second_and_eta_while_reading(app, tmp_path):
    h.upload(app, [dropped(tmp_path, "long.txt", BOOK * 6)], SETTINGS)
    seen = ""
    deadline = time.monotonic() + 60
    while app.worker.active() and time.monotonic() < deadline:
        html = h.progress_html(app)
        if "tok/s" in html:
            seen = html
        time.sleep(0.01)
    assert re.search(r"<progress value='\d+' max='\d+'>.*[\d,]+ / [\d,]+ tokens · [\d,]+ tok/s · (ETA|starting)", seen)


def test_an_answer_streams_is_saved_and_comes_back_with_its_heatmap(app, tmp_path):
    doc_id = read(app, tmp_path)
    steps = list(ch.ask(app, doc_id, None, "What is on page 3?", SETTINGS))
    chat, conversation, html = steps[-1]
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"]
    assert len(steps) >= 2 and "class='heatmap'" in html and "data-block=" in html
    saved = app.library.messages(conversation)
    assert saved[0]["content"] == chat[0]["content"]
    assert chat[1]["content"] == fmt.quote_markdown(saved[1]["quote"]) + fmt.prose_markdown(saved[1]["content"])  # quote first
    assert saved[1]["trace"]["blocks"]["span"] and saved[1]["timings"]["decode_tokens_per_s"] > 0
    assert "records" not in saved[1]["trace"]          # the summary, not every step's record (full_traces)
    # After a restart (a new App on the same library), the conversation and its inspector are back.
    again = h.App(ReadingService.start(app.service.engine, Library(app.library.dir)))
    chat2, conversation2, html2 = ch.open_document(again, doc_id)
    assert (chat2, conversation2) == (chat, conversation)
    assert html2 == html


def test_full_traces_store_every_step_and_draw_the_same_inspector(app, tmp_path):
    """The debug setting keeps each step's record; the page draws the same heatmap, passages and figures."""
    doc_id = read(app, tmp_path)
    longer = h.Settings("infllm", 2, 64, max_new_tokens=32)
    _, lean_conversation, lean_html = list(ch.ask(app, doc_id, None, "What is on page 3?", longer))[-1]
    app.service.full_traces = True
    _, full_conversation, full_html = list(ch.ask(app, doc_id, None, "What is on page 3?", longer))[-1]
    lean, full = (app.library.messages(c)[1]["trace"] for c in (lean_conversation, full_conversation))
    assert "records" in full and "records" not in lean
    assert len(json.dumps(lean)) < len(json.dumps(full)) / 5
    timings = re.compile(r"<b>[\d.,]+ (tok/)?s</b>")                # the two runs' speeds differ
    assert timings.sub("", lean_html) == timings.sub("", full_html)     # the same answer, drawn alike


def test_a_question_behind_another_shows_its_place_in_the_chat_until_the_model_takes_it(app, tmp_path):
    doc_id = read(app, tmp_path)
    hold = threading.Event()

    def other(emit) -> None:         # another tab's answer holds the model thread
        emit("")
        hold.wait(30)

    busy = app.worker.stream(other)
    next(busy)
    steps = ch.ask(app, doc_id, None, "What is on page 3?", SETTINGS)
    next(steps)                                               # the question, and "waiting for the model…"
    chat, _, html = next(steps)
    assert chat[-1]["content"] == "*waiting for the model: 1 question ahead of yours…*"
    assert "1 question ahead of yours" in html
    hold.set()
    list(busy)
    chat, _, html = list(steps)[-1]
    assert "waiting" not in chat[-1]["content"] and "class='heatmap'" in html


def test_a_follow_up_question_carries_the_conversation(app, tmp_path):
    doc_id = read(app, tmp_path)
    _, conversation, _ = list(ch.ask(app, doc_id, None, "first?", SETTINGS))[-1]
    chat, same, _ = list(ch.ask(app, doc_id, conversation, "second?", SETTINGS))[-1]
    assert same == conversation and [m["content"] for m in chat][::2] == ["first?", "second?"]
    assert len(app.library.messages(conversation)) == 4


def test_stop_ends_the_answer_early_and_keeps_what_was_said(app, tmp_path):
    doc_id = read(app, tmp_path)
    long = h.Settings("infllm", 2, 64, max_new_tokens=200)
    steps = ch.ask(app, doc_id, None, "Tell me everything.", long, session="s1")
    next(steps)
    ch.stop(app, "s1")
    chat, conversation, _ = list(steps)[-1]
    assert chat[-1]["content"].endswith("…(stopped)")
    assert chat[-1]["content"].endswith(fmt.prose_markdown(app.library.messages(conversation)[-1]["content"]))
    assert app.library.messages(conversation)[-1]["trace"]["tokens"]["decode"] < 200


def test_a_click_on_a_cell_or_passage_shows_that_blocks_text_on_its_page(app, tmp_path):
    doc_id = read(app, tmp_path)
    block = app.library.blocks(doc_id)[7]
    page = app.library.pages(doc_id)[block["first_page"] - 1]
    html = ch.show_source(app, f"7@{doc_id}")
    assert f"<b>{page['label']}</b> · book" in html
    marked = re.search(r"<mark>(.*?)</mark>", html, re.S).group(1)
    assert block["text"].split()[1] in marked and "…" in html            # the page's text around it
    with pytest.raises(h.UserError, match="has no passage 10000"):
        ch.show_source(app, f"10000@{doc_id}")


def test_an_answer_shows_the_documents_sentence_first_and_clicking_it_shows_its_page(app, tmp_path):
    doc_id = read(app, tmp_path, "book.txt", QUOTABLE)
    chat, conversation, html = list(ch.ask(app, doc_id, None, "Who keeps the lighthouse at Port Emberly?",
                                          SETTINGS))[-1]
    saved = app.library.messages(conversation)[-1]
    quote = saved["quote"]
    text, _ = app.library.text(doc_id)
    assert quote["text"] == " ".join(text[slice(*quote["chars"])].split()) and quote["document"] == doc_id
    assert chat[-1]["content"].startswith("> “") and chat[-1]["content"].endswith(fmt.prose_markdown(saved["content"]))
    assert saved["content"].endswith(f"({quote['page']})")                   # the answer cites the quote's page
    assert f"data-chars='{quote['chars'][0]},{quote['chars'][1]}'" in html   # the inspector's quote is clickable
    page = ch.answer_source(app, doc_id, conversation, 1)
    assert "<mark>" in page and ch.show_source(app, "chars:{},{}@{}".format(*quote["chars"], doc_id)) == page
    # after a restart the chat shows the quote above the answer again
    again = h.App(ReadingService.start(app.service.engine, Library(app.library.dir)))
    assert ch.open_document(again, doc_id)[0][-1]["content"] == chat[-1]["content"]


def test_a_quote_in_a_pdf_opens_its_page_as_a_picture_highlighted_within_a_second(app, tmp_path):
    pdf = make_pdf([[f"Line {i} of page {p} has nothing to say." for i in range(30)] for p in range(1, 4)]
                   + [["The lighthouse keeper of Port Emberly is named Mirela Vance."]
                      + [f"Line {i} of page 4 has nothing to say." for i in range(29)]], title="Keepers")
    doc_id = read(app, tmp_path, "keepers.pdf", pdf)
    page = app.library.pages(doc_id)[3]
    text, _ = app.library.text(doc_id)
    sentence = "The lighthouse keeper of Port Emberly is named Mirela Vance."
    a, b = text.index(sentence), text.index(sentence) + len(sentence)
    started = time.perf_counter()
    html = ch.show_source(app, f"chars:{a},{b}@{doc_id}")
    assert time.perf_counter() - started < 1.0
    assert "<img class='page'" in html and "data:image/png;base64," in html and page["label"] == "p. 4"
    assert "could not be found" not in html                                   # the sentence is highlighted
    shown = app.service.source(doc_id, chars=(a, b))
    assert shown.image.boxes and shown.page["physical"] == 4


def test_a_conversation_is_only_ever_continued_with_its_own_document(app, tmp_path):
    first = read(app, tmp_path)
    second = read(app, tmp_path, "other.txt", BOOK.replace("word", "term"))
    _, conversation, _ = list(ch.ask(app, first, None, "first?", SETTINGS))[-1]
    # A client that sends the first document's conversation with a question about the second (the API does):
    chat, other, _ = list(ch.ask(app, second, conversation, "second?", SETTINGS))[-1]
    assert other != conversation and [m["content"] for m in chat][::2] == ["second?"]
    assert [m["content"] for m in app.library.messages(conversation)][::2] == ["first?"]
    assert ch.inspect_answer(app, second, conversation, 1) == inspector.NOTHING_YET
    with pytest.raises(LibraryError, match="about other documents"):         # the service refuses the pair
        list(app.service.ask(second, "third?", conversation))


def test_the_heatmap_puts_each_retrieved_blocks_mass_in_its_layer_and_column(app, tmp_path):
    doc_id = read(app, tmp_path)
    documents = [(app.library.document(doc_id), app.library.spans(doc_id), app.library.pages(doc_id))]
    trace = {"steps": [{"kind": "decode", "start": 0, "n_tokens": 1}] * 2, "records": [
        {"layer": 1, "step": 0, "block_ids": [3, 9], "scores": [1, 1], "block_mass": [0.5, 0.1], "local_mass": 0.3},
        {"layer": 1, "step": 1, "block_ids": [3, 10**6], "scores": [1, 1], "block_mass": [0.25, 0.9], "local_mass": 0.5},
    ]}
    heat = Summary.load(trace).heat(2, len(documents[0][1]))          # block 10**6: no span of the document
    assert heat[1, 3] == pytest.approx(0.75) and heat[1, 9] == pytest.approx(0.1) and heat.sum() == pytest.approx(0.85)
    f = inspector.figures(trace, {"decode_tokens_per_s": 12.5}, documents)
    assert (f.blocks_retrieved, f.window_share, f.tokens_per_s) == (2, pytest.approx(0.4), 12.5)
    html = inspector.render(trace, {}, documents, 2)
    assert html.count("class='cell'") == 2 and "layer 1 · block 3 · p. " in html
    assert re.search(rf"<li data-block='3' data-document='{doc_id}'>.*mass 88%", html)     # 0.75 of all 0.85


def test_delete_frees_the_document_and_its_upload(app, tmp_path):
    doc_id = read(app, tmp_path)
    freed = fmt.size(app.library.document(doc_id)["bytes"])
    note = h.delete(app, doc_id)
    assert note == f"Deleted “book” and its memory ({freed} freed)." and app.library.documents() == []
    assert not list((app.library.dir / "uploads").iterdir())
    with pytest.raises(h.UserError, match="no document"):
        h.delete(app, doc_id)


def test_another_mode_reads_the_kept_file_again_as_a_second_entry(app, tmp_path):
    doc_id = read(app, tmp_path)
    h.read_again(app, doc_id, h.Settings("streaming", 2, 64, 6))
    app.worker.wait()
    assert [r[2] for r in h.library_rows(app)] == ["infllm", "streaming"]
    streaming = app.library.documents()[-1]["id"]
    *_, html = list(ch.ask(app, streaming, None, "What?", SETTINGS))[-1]
    assert "streaming attention, which retrieves nothing" in html


def test_bad_questions_say_what_is_wrong(app, tmp_path):
    doc_id = read(app, tmp_path)
    for doc, question, message in [(None, "q", "choose a document"), (doc_id, "  ", "type a question"),
                                   (999, "q", "no document")]:
        with pytest.raises(h.UserError, match=message):
            list(ch.ask(app, doc, None, question, SETTINGS))
    with pytest.raises(h.UserError, match="answer length"):
        list(ch.ask(app, doc_id, None, "q", h.Settings(max_new_tokens=0)))
    app.library.resume(doc_id)          # as if it were still being read: it cannot be chosen yet
    with pytest.raises(h.UserError, match="'book' is not read to the end yet"):
        list(ch.ask(app, None, None, "q", SETTINGS))
    # Dropped a moment ago: queued behind another reading, so not in the library yet.
    app.service.worker.jobs.append(Job("notes.pdf", tmp_path / "notes.pdf", app.service.engine))
    with pytest.raises(h.UserError, match="'notes.pdf' is not read to the end yet"):
        list(ch.ask(app, None, None, "q", SETTINGS))


def test_progress_and_delete_follow_the_document_not_its_file_name(app, tmp_path):
    first = read(app, tmp_path, "long.txt", BOOK * 6)
    app.library.resume(first)           # as if its reading had been paused: status 'reading', no job
    job = app.service.read_again(first, InfLLMConfig(**{**SMALL, "method": "streaming"}))
    deadline = time.monotonic() + 60
    while job.doc_id is None and time.monotonic() < deadline:
        time.sleep(0.005)
    rows = {r[0]: r[3] for r in h.library_rows(app)}
    assert rows[first].startswith("paused ") and job.doc_id != first
    assert h.delete(app, first).startswith("Deleted")    # the other mode's reading does not hold it
    if app.worker.active():
        with pytest.raises(h.UserError, match="being read"):
            h.delete(app, job.doc_id)
    app.worker.wait()


def test_a_document_just_read_is_chosen_and_polling_stops_when_nothing_is_read(app, tmp_path):
    idle = h.refresh(app, -1, None)
    assert idle.rows == [] and not idle.polling and idle.chosen is None
    assert h.refresh(app, idle.version, None).rows is None        # nothing changed: nothing re-sent
    h.upload(app, [dropped(tmp_path, "a.txt", BOOK)], SETTINGS)
    assert h.refresh(app, idle.version, None).polling            # a read is queued or running: keep polling
    app.worker.wait()
    done = h.refresh(app, idle.version, None)
    first = app.library.documents()[-1]["id"]
    assert (done.chosen, done.polling) == (first, False)
    h.upload(app, [dropped(tmp_path, "b.txt", BOOK.replace("word", "term"))], SETTINGS)
    app.worker.wait()
    second = app.library.documents()[-1]["id"]
    assert h.refresh(app, done.version, first).chosen == second   # the one just read, over the one chosen
    assert h.refresh(app, -1, None).chosen == second              # a page opened now
    app.service.delete(first)
    restarted = h.App(ReadingService.start(app.service.engine, Library(app.library.dir)))
    assert h.refresh(restarted, -1, None).chosen == second        # the only document
    assert h.refresh(restarted, -1, second).chosen is None        # already chosen: left alone


def test_all_documents_heads_the_list_once_two_are_ready(app, tmp_path):
    book = read(app, tmp_path)
    assert [v for _, v in h.document_choices(app)] == [book]            # one document: nothing to gather
    keepers = read(app, tmp_path, "keepers.txt", QUOTABLE)
    assert h.document_choices(app)[:2] == [("All documents", "all"), ("Several documents…", h.SEVERAL)]
    assert h.ready_documents(app) == [("book · infllm", book), ("keepers · infllm", keepers)]
    assert (h.target("all", [book]), h.target(h.SEVERAL, [keepers, book]), h.target(book, [keepers])) == \
        ("all", [keepers, book], book)
    with pytest.raises(h.UserError, match="tick the documents"):
        list(ch.ask(app, [], None, "q", SETTINGS))
    with pytest.raises(h.UserError, match="needs one document"):
        h.delete(app, "all")


def test_a_question_across_the_library_names_the_document_of_its_quote_and_passages(app, tmp_path):
    book, keepers = read(app, tmp_path), read(app, tmp_path, "keepers.txt", QUOTABLE)
    chat, conversation, html = list(ch.ask(app, "all", None, "Who keeps the lighthouse at Port Emberly?",
                                          SETTINGS))[-1]
    assert [c["id"] for c in app.library.conversations("all")] == [conversation]
    saved = app.library.messages(conversation)[-1]
    quote, titles = saved["quote"], {book: "book", keepers: "keepers"}
    assert titles[quote["document"]] == quote["title"]
    assert chat[-1]["content"].startswith(f"> “{quote['text']}”  \n> — {quote['title']}, {quote['page']}")
    assert f"({quote['title']}, {quote['page']})" in saved["content"]          # the citation names it too
    # Each passage says which document it is from, and a click on it opens that document's page.
    passages = re.findall(r"<li data-block='(\d+)' data-document='(\d+)'><span class='where'>([^<]*)", html)
    assert passages and all(where.startswith(titles[int(d)] + " · p. ") for _, d, where in passages)
    block, doc, where = passages[0]
    page = ch.show_source(app, f"{block}@{doc}")
    assert f"<b>{where.split(' · ')[1]}</b> · {titles[int(doc)]}" in page
    # So does the quote, in the inspector and in the chat.
    assert f"data-chars='{quote['chars'][0]},{quote['chars'][1]}' data-document='{quote['document']}'" in html
    assert ch.answer_source(app, "all", conversation, 1) == \
        ch.show_source(app, "chars:{},{}@{}".format(*quote["chars"], quote["document"]))


def test_the_heatmap_of_a_question_across_documents_groups_its_columns_by_document(app, tmp_path):
    book, keepers = read(app, tmp_path), read(app, tmp_path, "keepers.txt", QUOTABLE)
    shelf = [(app.library.document(d), app.library.spans(d), app.library.pages(d)) for d in (keepers, book)]
    parts = [len(spans) for _, spans, _ in shelf]
    # The trace numbers the documents' spans one after another: keepers' span 3, then book's span 5.
    trace = {"steps": [{"kind": "decode", "start": 0, "n_tokens": 1}], "parts": parts, "documents": [keepers, book],
             "votes": None, "pinned": [3, parts[0] + 5], "records": [
                 {"layer": 1, "step": 0, "block_ids": [3, parts[0] + 5], "scores": [1, 1], "block_mass": [0.5, 0.25],
                  "local_mass": 0.25}]}
    html = inspector.render(trace, {}, shelf, 2)
    cells = re.findall(r"<rect class='cell' data-block='(\d+)' data-document='(\d+)' x='([\d.]+)'", html)
    assert [(int(b), int(d)) for b, d, _ in cells] == [(3, keepers), (5, book)]
    assert float(cells[0][2]) < float(cells[1][2])                        # keepers' columns come first
    assert html.index(">keepers</text>") < html.index(">book</text>") and html.count("stroke-dasharray") == 1
    assert "layer 1 · book · block 5 · p. " in html
    assert re.search(rf"<li data-block='3' data-document='{keepers}'><span class='where'>keepers · p. 1 ", html)


def test_a_conversation_across_the_library_comes_back_and_is_never_continued_with_one_document(app, tmp_path):
    book, keepers = read(app, tmp_path), read(app, tmp_path, "keepers.txt", QUOTABLE)
    chat, conversation, html = list(ch.ask(app, "all", None, "Who keeps the lighthouse?", SETTINGS))[-1]
    again = h.App(ReadingService.start(app.service.engine, Library(app.library.dir)))
    assert ch.open_document(again, "all") == (chat, conversation, html)       # chosen again after a restart
    assert ch.open_document(again, book) == ([], None, inspector.NOTHING_YET)
    # The page sends the conversation of "All documents" with a question about one document: a new one.
    chat2, other, _ = list(ch.ask(again, book, conversation, "And the harbour?", SETTINGS))[-1]
    assert other != conversation and [m["content"] for m in chat2][::2] == ["And the harbour?"]
    assert len(app.library.messages(conversation)) == 2
    assert ch.inspect_answer(again, book, conversation, 1) == inspector.NOTHING_YET
    # Two documents ticked are a scope of their own ("1,2"), whatever their order.
    _, ticked, _ = list(ch.ask(again, [keepers, book], conversation, "Who?", SETTINGS))[-1]
    assert ticked != conversation and app.library.conversations(f"{book},{keepers}")[0]["id"] == ticked
    assert ch.open_document(again, [book, keepers])[1] == ticked


def test_a_document_still_being_read_is_left_out_of_a_library_question_and_named(app, tmp_path):
    book, keepers = read(app, tmp_path), read(app, tmp_path, "keepers.txt", QUOTABLE)
    app.library.add(title="half read", source_name="half.txt", kind="txt", sha256="x", fingerprint="tiny",
                    config_hash="c", config={}, tokens=10, pages=[], memory_format=2)
    *_, answered = app.service.ask("all", "Who keeps the lighthouse at Port Emberly?", max_new_tokens=4)
    assert answered.note == "Not searched: “half read” (reading)." and answered.text.endswith(answered.note)
    assert sorted(answered.trace["documents"]) == [book, keepers]
    # One document ticked is that document: its own conversation, no shelf.
    *_, alone = app.service.ask([book], "Who keeps the lighthouse at Port Emberly?", max_new_tokens=4)
    assert [c["id"] for c in app.library.conversations(book)] == [alone.conversation] and not alone.note


def test_the_first_token_figure_counts_the_memories_and_the_probes_the_reader_waited_for():
    trace = {"steps": [], "records": []}
    timings = {"memory_load_s": 0.5, "focus_s": 2.0, "first_token_s": 0.25, "decode_tokens_per_s": 9.0}
    assert inspector.figures(trace, timings, []).first_token_s == 2.75
    assert inspector.figures(trace, {"first_token_s": 0.25}, []).first_token_s == 0.25    # answers saved before
