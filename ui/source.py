"""The source of a quote or a passage, as HTML: the PDF page with the passage highlighted, or the text
around it with the passage marked. Pure functions of reading.service.Source."""
from __future__ import annotations

import base64
import html

from reading.source import Source

NOTHING_YET = ("<div class='source muted'>Click an answer, its quote, a heatmap cell or a passage: its page "
               "shows here, the sentence highlighted.</div>")


def render(source: Source) -> str:
    page = source.page
    where = page["label"]                       # plain text: escaped for each place it goes
    physical = page.get("physical") if page.get("printed") and where != f"p. {page.get('physical')}" else None
    file_page = f"(page {physical} of the file)" if physical else ""
    head = (f"<div class='source-head'><b>{html.escape(where)}</b>"
            + (f" <span class='muted'>{file_page}</span>" if file_page else "")
            + f" · {html.escape(source.title)}</div>")
    if source.image is not None:
        image = source.image
        data = base64.b64encode(image.png).decode()
        alt = html.escape(" ".join(filter(None, (where, file_page, "·", source.title))), quote=True)
        found = "" if image.boxes else "<div class='muted'>(the passage could not be found on the rendered page)</div>"
        return (f"<div class='source'>{head}{found}<img class='page' alt=\"{alt}\" width='{image.width}' "
                f"height='{image.height}' src='data:image/png;base64,{data}'></div>")
    if source.excerpt is not None:
        before, mark, after = (html.escape(part) for part in source.excerpt)
        return (f"<div class='source'>{head}<div class='page-text'>…{before}<mark>{mark}</mark>{after}…</div>"
                "</div>")
    return f"<div class='source'>{head}<div class='page-text'><mark>{html.escape(source.passage)}</mark></div></div>"
