"""The source of a quote or a passage, as HTML: the PDF page with the passage highlighted, or the text
around it with the passage marked. Pure functions of reading.service.Source."""
from __future__ import annotations

import base64
import html

from reading.service import Source

NOTHING_YET = ("<div class='source muted'>Click an answer, its quote, a heatmap cell or a passage: its page "
               "shows here, the sentence highlighted.</div>")


def render(source: Source) -> str:
    page = source.page
    where = html.escape(page["label"])
    if page.get("physical") and page.get("printed") and page["label"] != f"p. {page['physical']}":
        where += f" <span class='muted'>(page {page['physical']} of the file)</span>"
    head = f"<div class='source-head'><b>{where}</b> · {html.escape(source.title)}</div>"
    if source.image is not None:
        image = source.image
        data = base64.b64encode(image.png).decode()
        found = "" if image.boxes else "<div class='muted'>(the passage could not be found on the rendered page)</div>"
        return (f"<div class='source'>{head}{found}<img class='page' alt='{where}' width='{image.width}' "
                f"height='{image.height}' src='data:image/png;base64,{data}'></div>")
    if source.excerpt is not None:
        before, mark, after = (html.escape(part) for part in source.excerpt)
        return (f"<div class='source'>{head}<div class='page-text'>…{before}<mark>{mark}</mark>{after}…</div>"
                "</div>")
    return f"<div class='source'>{head}<div class='page-text'><mark>{html.escape(source.passage)}</mark></div></div>"
