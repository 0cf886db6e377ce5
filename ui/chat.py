"""The chat's handlers, as plain functions: ask, open a conversation, show what an answer retrieved and the
page of its quote or passages. They take the App (ui/handlers.py) and the components' values."""
from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator

from reading.asked import Asked, parse
from reading.service import USER_ERRORS, Answered
from reading.worker import Queued

from . import formatting as fmt
from . import inspector, source
from .handlers import App, Settings, Target, UserError, document, shown_as_user_error

STREAM_INTERVAL_S = 0.5


# -- the conversation ------------------------------------------------------------------------------
def open_document(app: App, chosen: Target | None) -> tuple[list[dict], int | None, str]:
    """The latest conversation of what is chosen (a document, ALL, several): (chat messages, conversation id,
    inspector HTML of its last answer)."""
    if chosen is None or chosen == "" or chosen == []:
        return [], None, inspector.NOTHING_YET
    asked = _asked(app, chosen)
    conversations = app.library.conversations(asked.scope)
    if not conversations:
        return [], None, inspector.NOTHING_YET
    conversation = conversations[-1]["id"]
    messages = app.library.messages(conversation)
    return (fmt.chat(messages, not asked.one), conversation,
            inspect_answer(app, chosen, conversation, len(messages) - 1))


def inspect_answer(app: App, chosen: Target | None, conversation: int | None, index: int) -> str:
    """Inspector HTML of the answer at chat index `index` (a question's index shows its answer)."""
    m = _answer(app, chosen, conversation, index)
    return inspector.NOTHING_YET if m is None else _inspector(app, m["trace"], m["timings"], m["method"], m["quote"])


def show_source(app: App, value: str | None) -> str:
    """The page of what was clicked in the inspector (inspector.CLICKS): a passage ("7@3": span 7 of
    document 3) or the quote ("chars:a,b@3")."""
    what, _, of = (value if isinstance(value, str) else "").partition("@")
    doc = document(app, of or None)
    try:
        chars = tuple(int(x) for x in what.removeprefix("chars:").split(",")) if what.startswith("chars:") else None
        span = None if chars else int(what)
    except ValueError as err:
        raise UserError(f"nothing to show for {value!r}") from err
    with shown_as_user_error():
        return source.render(app.service.source(doc["id"], chars=chars, span=span))


def answer_source(app: App, chosen: Target | None, conversation: int | None, index: int) -> str:
    """The page of the quote of the answer at chat index `index` (a question's index: its answer's)."""
    m = _answer(app, chosen, conversation, index)
    if m is None:
        return source.NOTHING_YET
    if not m["quote"]:
        return "<div class='source muted'>This answer has no quote: the question's words matched no sentence.</div>"
    with shown_as_user_error():        # the quote names its own document
        return source.render(app.service.source(m["quote"]["document"], chars=m["quote"]["chars"]))


def stop(app: App, session: str) -> None:
    app.stops.setdefault(session, threading.Event()).set()


def ask(app: App, chosen: Target | None, conversation: int | None, question: str, settings: Settings,
        session: str = "") -> Iterator[tuple[list[dict], int | None, str]]:
    """Stream an answer about what is chosen (a document, ALL, several: target()): yields (chat messages,
    conversation id, inspector HTML). The question and the answer are saved when the answer ends, also
    when it is stopped."""
    if not (question or "").strip():
        raise UserError("type a question first")
    asked = _asked(app, chosen)
    settings.config(app.service.engine.cfg)         # the page's knobs are checked before anything runs
    conversation = _own(app, asked.scope, conversation)   # about other documents: this question starts a new one
    messages = app.library.messages(conversation) if conversation else []
    chat = fmt.chat(messages, not asked.one) + [{"role": "user", "content": fmt.prose_markdown(question.strip())},
                                                   {"role": "assistant", "content": ""}]
    stopped = app.stops.setdefault(session, threading.Event())
    stopped.clear()
    yield chat, conversation, "<div class='inspector muted'>waiting for the model…</div>"
    shown, quoted, text = 0.0, "", ""
    with shown_as_user_error():
        for piece in app.service.ask(asked, question, conversation, settings.topk, settings.max_new_tokens, stopped):
            if isinstance(piece, Answered):
                chat[-1]["content"] = quoted + fmt.prose_markdown(piece.text)
                yield chat, piece.conversation, _inspector(app, piece.trace, piece.timings, piece.method, piece.quote)
                return
            if isinstance(piece, Queued):       # behind other questions, or a reading's turn: say so, and where
                chat[-1]["content"] = f"*{fmt.markdown_text(str(piece))}…*"
                yield chat, conversation, f"<div class='inspector muted'>{html.escape(str(piece))}…</div>"
                continue
            if isinstance(piece, dict):         # the quote: shown at once, before the model's words
                quoted = fmt.quote_markdown(piece, titled=not asked.one)
            else:
                text += piece
            chat[-1]["content"] = quoted + fmt.prose_markdown(text)
            # Each update re-sends the chat; many a second would take the cores from decoding.
            if not piece or time.perf_counter() - shown > STREAM_INTERVAL_S:
                yield chat, conversation, "<div class='inspector muted'>answering…</div>"
                shown = time.perf_counter()



# -- helpers ---------------------------------------------------------------------------------------
def _asked(app: App, chosen: Target | None) -> Asked:
    """What the chat's choice asks (reading.asked), or what is wrong with it in the page's words."""
    if chosen is None or chosen == "":
        document(app, None)                    # says why nothing can be chosen yet
    if isinstance(chosen, list) and not chosen:
        raise UserError("tick the documents to ask in the box under the document list")
    with shown_as_user_error():
        try:
            return parse(chosen, app.library)
        except ValueError as err:               # not an id: the page sent something else
            raise UserError(f"no document {chosen!r} in the library; it may have been deleted") from err

def _own(app: App, scope: int | str, conversation: int | None) -> int | None:
    """The conversation if it is about this scope (a document, or a shelf's key), else None: a session's
    conversation id travels with whatever a client (the page, or its API) asks next."""
    if conversation is None or conversation == "":
        return None
    try:
        return app.library.conversation(int(conversation), scope)["id"]
    except (*USER_ERRORS, ValueError, TypeError):
        return None

def _answer(app: App, chosen: Target | None, conversation: int | None, index: int) -> dict | None:
    """The saved answer at chat index `index` (a question's: its answer) of a conversation about `chosen`."""
    if chosen is None or chosen == "" or chosen == []:
        return None
    if _own(app, _asked(app, chosen).scope, conversation) is None:
        return None
    messages = app.library.messages(conversation)
    return next((m for i, m in enumerate(messages) if m["role"] == "assistant" and i >= index), None)

def _inspector(app: App, trace: dict | None, timings: dict | None, method: str, quote: dict | None) -> str:
    """inspector.render of an answer, with each document it asked (trace["documents"]): its spans and pages;
    one deleted since shows none."""
    documents = []
    for doc_id in (trace or {}).get("documents", []):
        try:
            documents.append((app.library.document(doc_id), app.library.spans(doc_id), app.library.pages(doc_id)))
        except USER_ERRORS:
            documents.append(({"id": doc_id, "title": "(deleted)"}, [], []))
    return inspector.render(trace, timings, documents, app.service.engine.n_layers, method, quote)
