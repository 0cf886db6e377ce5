"""The page: components and the events between them. The work is done in ui/handlers.py."""
from __future__ import annotations

import functools
import html
import inspect as py_inspect

import gradio as gr

from reading.service import ReadingService

from . import chat as chat_h
from . import handlers as h
from . import inspector, source
from .handlers import App, Settings, UserError

CSS = """
.inspector .figures { display: grid; grid-template-columns: repeat(5, 1fr); gap: 8px; margin-bottom: 10px; }
.inspector .figure { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 8px; }
.inspector .figure b { display: block; font-size: 1.15em; }
.inspector .figure span { font-size: 0.8em; color: var(--body-text-color-subdued); }
.inspector svg.heatmap { width: 100%; height: auto; max-height: 420px; }
.inspector svg .tick { font-size: 7px; fill: var(--body-text-color-subdued); }
.inspector svg .axis { font-size: 7px; fill: var(--body-text-color); }
.inspector svg .cell { cursor: pointer; }
.inspector svg .cell:hover { stroke: #f59e0b; stroke-width: 1; }
.inspector ol.passages { margin-top: 10px; padding-left: 1.4em; }
.inspector ol.passages li { cursor: pointer; margin-bottom: 6px; font-size: 0.92em; }
.inspector ol.passages li:hover { background: var(--background-fill-secondary); }
.inspector .where { display: block; font-weight: 600; font-size: 0.85em; color: var(--color-accent); }
.inspector .signals { display: block; font-size: 0.8em; color: var(--body-text-color-subdued); }
.inspector blockquote.quote { cursor: pointer; margin: 0 0 10px 0; padding: 6px 10px; border-left: 4px solid #f5c400;
  background: var(--background-fill-secondary); }
.source img.page { width: 100%; height: auto; border: 1px solid var(--border-color-primary); }
.source .page-text { white-space: pre-wrap; max-height: 640px; overflow-y: auto; font-size: 0.9em; }
.source mark { background: #ffe066; }
.muted { color: var(--body-text-color-subdued); }
#progress .job { margin: 6px 0; font-size: 0.9em; }
#progress progress { width: 100%; height: 10px; }
#progress .job-stats { color: var(--body-text-color-subdued); font-size: 0.85em; }
#progress .failed { color: var(--error-text-color); }
/* Gradio 6 draws the visible rows as div.body-cell (its <td>s are a hidden sizing table). */
#library .body-cell .text, #library th .header { white-space: nowrap; font-size: 12px; }
#library .body-cell:nth-child(2) .text, #library th:nth-child(2) .header { white-space: normal; }
#library .body-cell .cell-wrap, #library th .cell-wrap { padding-left: 6px; padding-right: 6px; }
/* The chat's label and its buttons float over the top of the chat; the messages scroll in the strip below
   them, or a long answer's first line scrolls under "Conversation". */
#chat .bubble-wrap { margin-top: 36px; height: calc(100% - 36px); }
"""

INTRO = """# InfLLM Reader
Drop a book or paper on the left. It is read once into a persistent InfLLM memory; then ask about it.
For every answer, the heatmap shows which memory blocks (which pages) each layer's attention retrieved."""


def _shown(fn, n_outputs: int = 1):
    """Turn a UserError into a message on the page, for plain and generator handlers.

    Gradio renders a toast's message as HTML: it is escaped, so a title like "O'Brien <draft>" shows as itself.
    A plain handler's is an error (gr.Error). A generator's (the ask) refused before its first update (no
    document chosen, one still being read, an empty question) is a warning toast that leaves its
    n_outputs as they are: an error also marks the handler's components, and a red "Error" over the chat
    reads as if the conversation had broken.
    """
    if py_inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            started = False
            try:
                for update in fn(*args, **kwargs):
                    started = True
                    yield update
            except UserError as err:
                if started:
                    raise gr.Error(html.escape(str(err))) from err
                gr.Warning(html.escape(str(err)))
                yield tuple(gr.skip() for _ in range(n_outputs))
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(html.escape(str(err))) from err
    return call


def build(service: ReadingService, defaults: Settings = Settings()) -> gr.Blocks:
    app = App(service)
    with gr.Blocks(title="InfLLM Reader") as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=400):
                files = gr.File(label="Drop PDFs, EPUBs, text, Markdown or HTML files", file_count="multiple",
                                file_types=h.ACCEPTED, elem_id="upload", height=140)
                note = gr.Markdown(elem_id="note")
                progress = gr.HTML(elem_id="progress")
                table = gr.Dataframe(headers=h.TABLE_HEADERS, value=h.library_rows(app), interactive=False,
                                     wrap=True, elem_id="library", label="Library",
                                     column_widths=["5%", "29%", "14%", "16%", "9%", "11%", "16%"])
            with gr.Column(scale=1):
                with gr.Row():
                    # No value here: the page's first refresh chooses one, and its change opens the conversation.
                    doc = gr.Dropdown(h.document_choices(app), value=None, label="Document", scale=1,
                                      elem_id="document")
                    # scale 0: the buttons keep their width (at 90 px their labels broke in two lines).
                    new_chat = gr.Button("New conversation", scale=0, size="sm", min_width=150, elem_id="new-chat")
                    remove = gr.Button("Delete document", variant="stop", scale=0, size="sm", min_width=150,
                                       elem_id="delete")
                # Shown for the dropdown's "Several documents…": one question across the ones ticked here.
                several = gr.Dropdown(h.ready_documents(app), value=[], multiselect=True, visible=False,
                                      label="Documents to ask together", elem_id="several")
                chat = gr.Chatbot(elem_id="chat", height=440, label="Conversation",
                                  placeholder="Choose a document, then ask a question about it.")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the document…", show_label=False, scale=6,
                                          elem_id="question", submit_btn=False)
                    ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask", min_width=70)
                    stop_btn = gr.Button("Stop", scale=1, elem_id="stop", min_width=70)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown("### What the answer retrieved")
                inspector_html = gr.HTML(inspector.NOTHING_YET, js_on_load=inspector.CLICKS, elem_id="inspector")
            with gr.Column(scale=2):
                gr.Markdown("### The page")
                passage = gr.HTML(source.NOTHING_YET, elem_id="passage")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                method = gr.Radio(list(h.METHODS), value=defaults.method, label="Mode for reading",
                                  info="infllm: sinks + retrieved blocks + window; streaming: sinks + window; "
                                       "full: everything (slow, and the model is trained to 8K tokens)")
                topk = gr.Slider(0, 64, value=defaults.topk, step=1, label="topk: blocks retrieved per layer",
                                 info="while reading new documents; answers re-read the passages "
                                      "their question points to instead (the question focus)")
                n_local = gr.Slider(512, 8192, value=defaults.n_local, step=512, label="local window (tokens)",
                                    info="applies to reading")
                max_new = gr.Slider(16, 1024, value=defaults.max_new_tokens, step=16, label="answer length (tokens)")
            again = gr.Button("Read the chosen document again with these settings", size="sm")
        conversation = gr.State(None)
        seen, shown = gr.State(-1), gr.State("")
        confirmed = gr.Checkbox(visible=False)
        timer = gr.Timer(1.0, active=False)     # polls only while something is read (refresh turns it on and off)
        knobs = [method, topk, n_local, max_new]

        def settings(m, k, n, t) -> Settings:
            return Settings(m, int(k), int(n), int(t))

        def refresh(version, shown, current):
            # Unchanged parts are skipped: the browser shares the two cores with the model.
            r = h.refresh(app, version, current)
            progress_now = h.progress_html(app)
            bar = progress_now if progress_now != shown else gr.skip()
            polling = gr.Timer(active=r.polling)
            if r.rows is None:
                return bar, gr.skip(), gr.skip(), gr.skip(), version, progress_now, polling
            chosen = gr.update(choices=r.choices, value=r.chosen) if r.chosen is not None else gr.update(choices=r.choices)
            return bar, r.rows, chosen, gr.update(choices=r.documents), r.version, progress_now, polling

        def dropped(paths, *k):
            return h.upload(app, paths, settings(*k)), None, gr.Timer(active=True)

        def opened(d, s):
            return *chat_h.open_document(app, h.target(d, s)), gr.update(visible=d == h.SEVERAL)

        def asked(d, c, q, m, k, n, t, s, request: gr.Request):
            for messages, conv, html in chat_h.ask(app, h.target(d, s), c, q, settings(m, k, n, t), request.session_hash):
                yield messages, conv, html, ""

        def deleted(d, ok):
            return h.delete(app, d) if ok else "Nothing deleted."

        def stop(request: gr.Request):
            chat_h.stop(app, request.session_hash)

        def clicked(event: gr.SelectData):
            return chat_h.show_source(app, event.value)

        def picked(d, s, c, event: gr.SelectData):
            asked = h.target(d, s)
            return chat_h.inspect_answer(app, asked, c, event.index), chat_h.answer_source(app, asked, c, event.index)

        panel = dict(fn=refresh, inputs=[seen, shown, doc],
                     outputs=[progress, table, doc, several, seen, shown, timer], show_progress="hidden")
        timer.tick(**panel)
        demo.load(**panel)          # a page opened later shows the library as it is now
        files.upload(_shown(dropped), [files, *knobs], [note, files, timer])
        doc.change(_shown(opened), [doc, several], [chat, conversation, inspector_html, several])
        several.change(_shown(lambda d, s: chat_h.open_document(app, h.target(d, s))), [doc, several],
                       [chat, conversation, inspector_html])
        new_chat.click(lambda: ([], None, inspector.NOTHING_YET),
                       None, [chat, conversation, inspector_html])
        remove.click(_shown(deleted), [doc, confirmed], note,
                     js="(d, ok) => [d, confirm('Delete this document and its memory from the library?')]"
                     ).then(lambda: (None, []), None, [doc, several]).then(**panel)
        # `several` comes last: API clients that ask one document (or "all") can leave it out.
        # No concurrency limit: the model thread is the queue (reading/worker.py), and a question waiting
        # there shows its place in the chat; Gradio's own queue would show nothing with show_progress hidden.
        ask_event = dict(fn=_shown(asked, 4), inputs=[doc, conversation, question, *knobs, several],
                         outputs=[chat, conversation, inspector_html, question], concurrency_limit=None,
                         show_progress="hidden")
        ask_btn.click(**ask_event)
        question.submit(**ask_event)
        stop_btn.click(stop, None, None)
        inspector_html.select(_shown(clicked), None, passage)
        chat.select(_shown(picked), [doc, several, conversation], [inspector_html, passage])
        again.click(_shown(lambda d, *k: (h.read_again(app, d, settings(*k)), gr.Timer(active=True))),
                    [doc, *knobs], [note, timer])
    return demo

