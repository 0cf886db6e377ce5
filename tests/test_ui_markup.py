"""What the page builds as HTML or Markdown shows titles, labels and names as themselves (issue 41).

A printed page that differs from the file's ("p. 68 (page 74 of the file)") once went into the page
picture's alt attribute as HTML, and its quotes ended the attribute: the page showed broken markup
instead of the picture. Each test parses what the page would render, with the standard library's parser.
"""
from html.parser import HTMLParser

import pytest

from reading.source import Source
from documents.page_images import PageImage
from ui import formatting as fmt
from ui import chat as ch
from ui import handlers as h
from ui import source

from .test_readers import make_pdf
from .test_ui_handlers import QUOTABLE, SETTINGS, app, dropped  # noqa: F401  (app: a fixture)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
NAME = "O'Brien <draft> & \"notes\""


class Parsed(HTMLParser):
    """Tags with their attributes, and the text outside tags."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.texts: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.texts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def printed_68() -> Source:
    page = {"label": "p. 68", "physical": 74, "printed": "68", "start_char": 0, "end_char": 10}
    return Source(NAME, page, "a sentence", image=PageImage(PNG, 918, 1188, [(1.0, 2.0, 3.0, 4.0)]))


def test_a_page_whose_printed_number_differs_shows_one_picture_with_a_plain_label():
    parsed = Parsed(source.render(printed_68()))
    images = parsed.all("img")
    assert len(images) == 1
    assert images[0]["src"].startswith("data:image/png;base64,")
    assert images[0]["alt"] == f"p. 68 (page 74 of the file) · {NAME}"
    # Nothing of the picture or of the label's markup leaks into the text.
    assert parsed.text == f"p. 68 (page 74 of the file) · {NAME}"
    assert "data:image" not in parsed.text and "span" not in parsed.text


def test_a_page_shown_as_text_marks_the_passage_and_escapes_the_page_around_it():
    page = {"label": "Chapter <1>", "physical": 1, "printed": None}
    parsed = Parsed(source.render(Source(NAME, page, "x", excerpt=("if a < b ", "then <b>", " & 'c'"))))
    assert parsed.all("b") == [{}] and len(parsed.all("mark")) == 1
    assert parsed.text == f"Chapter <1> · {NAME} …if a < b then <b> & 'c'…"


def test_a_file_named_with_quotes_and_brackets_shows_as_its_name_everywhere(app, tmp_path):  # noqa: F811
    name = "O'Brien <draft>.pdf"
    pdf = make_pdf([[f"Line {i} of page {p} is only filler here." for i in range(30)] for p in range(1, 3)]
                   + [["The lighthouse keeper of Port Emberly is named Mirela Vance."]
                      + [f"Line {i} of page 3 is only filler here." for i in range(29)]],
                   page_labels=[(0, "r", 1), (2, "D", 1)])
    note = h.upload(app, [dropped(tmp_path, name, pdf)], SETTINGS)
    assert note == f"• {fmt.markdown_text(name)}: queued for reading (infllm)"
    app.worker.wait()
    other = h.upload(app, [dropped(tmp_path, "plain.txt", QUOTABLE)], SETTINGS)
    assert "queued" in other
    app.worker.wait()
    doc_id = app.library.documents()[0]["id"]
    title = "O'Brien <draft>"
    assert app.library.document(doc_id)["title"] == title
    assert h.library_rows(app)[0][1] == title                   # the table and the dropdowns take text
    assert (f"{title} · infllm", doc_id) in h.document_choices(app)
    assert f"✓ {name}: read" in Parsed(h.progress_html(app)).text
    # A question across both: the quote's document named in the chat and on the heatmap.
    chat, conversation, inspector = list(ch.ask(app, "all", None, "Who keeps the lighthouse at Port Emberly?",
                                               SETTINGS))[-1]
    quote = app.library.messages(conversation)[-1]["quote"]
    assert quote["title"] in (title, "plain")
    assert chat[-1]["content"].startswith(fmt.quote_markdown(quote, titled=True))
    assert fmt.quote_markdown({**quote, "title": title}, titled=True).endswith(
        f"— O'Brien \\<draft\\>, {quote['page']}\n\n")                    # Markdown shows it as typed
    assert title in Parsed(inspector).text
    assert f"data-document='{doc_id}'" in inspector
    # The sentence's page: the printed "1" of physical page 3, in words and in the picture's alt.
    text, _ = app.library.text(doc_id)
    a = text.index("The lighthouse keeper")
    page = Parsed(ch.show_source(app, f"chars:{a},{a + 20}@{doc_id}"))
    assert page.text == f"p. 1 (page 3 of the file) · {title}"
    assert page.all("img")[0]["alt"] == f"p. 1 (page 3 of the file) · {title}"
    freed = fmt.size(app.library.document(doc_id)["bytes"])
    assert h.delete(app, doc_id) == f"Deleted “O'Brien \\<draft\\>” and its memory ({freed} freed)."


@pytest.mark.parametrize("typed", ["What does <tt> do?", "Is a & b \\{x\\} fine?"])
def test_the_chat_shows_a_question_and_an_answer_as_typed(typed):
    shown = fmt.prose_markdown(typed)
    # Markdown's backslash escape gives back each of these characters; nothing else changes.
    assert shown.replace("\\<", "<").replace("\\>", ">").replace("\\&", "&").replace("\\\\", "\\") == typed
    assert "<tt>" not in shown
