"""The annotation page: one item per screen (context, response, the paper's three 1-5 questions), keyboard
shortcuts, a progress line, every rating stored on submit, and resuming where the annotator left off.

Routes (the token is the annotator's login link):

- ``GET /a/{token}``: the first item not yet rated (or the "all done" page);
- ``GET /a/{token}/{position}``: one item, to look back at or change a rating;
- ``POST /a/{token}/rate``: form fields ``item``, ``relevance``, ``informativeness``, ``fluency``.

An unknown token gets 403; a rating other than exactly `1` to `5`, a missing field or an item that is not the
annotator's gets 400, and nothing is stored; a position outside the annotator's list gets 404. Plain HTML forms
work without JavaScript; a few lines of inline JavaScript add the keys.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from vikdf.web.common import render
from vikdf.web.human_eval.study import (
    CRITERIA,
    CRITERION_KEYS,
    SCALE,
    annotator_id,
    assignment_of,
    item_at,
    next_position,
    open_study,
    progress,
    save_rating,
)

# The only ratings taken, as the page's radio buttons send them: `int()` would also read " 3 ", "03", "٣" and "0_3".
_RATINGS = {str(value): value for value in SCALE}
# A rating form is four short fields; more is not a rating.
MAX_BODY_BYTES = 16 * 1024

_ITEM_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rating {{ rated }} / {{ total }}</title>
<style>{{ style }}</style></head>
<body>
<h1>Human evaluation</h1>
<p class="muted" id="progress">{{ rated }} / {{ total }} rated · item {{ item.position }} of {{ total }}</p>
<h2 class="muted">Dialogue context</h2>
{% for turn in context %}<div class="turn">{{ turn }}</div>
{% endfor %}
<div class="box"><h2>Generated response</h2><div id="response">{{ item.response }}</div></div>
<form method="post" action="/a/{{ token }}/rate" id="rating">
<input type="hidden" name="item" value="{{ item.item }}">
{% for key, title, question in criteria %}
<fieldset id="{{ key }}" data-criterion="{{ key }}"><legend>{{ title }}</legend>
<div class="muted">{{ question }}</div>
<div class="scale">{% for value in scale %}
<label><input type="radio" name="{{ key }}" value="{{ value }}" required{% if item[key] == value %} checked{% endif %}> {{ value }}</label>
{% endfor %}</div></fieldset>
{% endfor %}
<button type="submit">Save and next</button>
{% if item.position > 1 %}<a href="/a/{{ token }}/{{ item.position - 1 }}" id="previous">previous item</a>{% endif %}
{% if item.position < total %}<a href="/a/{{ token }}/{{ item.position + 1 }}" id="next">next item</a>{% endif %}
</form>
<p class="muted">Keys: 1-5 rate the highlighted question and move to the next, Backspace goes back a question,
Enter saves, ← / → previous / next item. 1 = very poor, 5 = excellent.</p>
<script>
const groups = [...document.querySelectorAll("fieldset[data-criterion]")];
let active = Math.max(0, groups.findIndex(g => !g.querySelector("input:checked")));
const show = () => groups.forEach((g, i) => g.classList.toggle("active", i === active));
show();
document.addEventListener("keydown", event => {
  if (event.ctrlKey || event.altKey || event.metaKey) return;
  if (event.key >= "1" && event.key <= "5") {
    groups[active].querySelector(`input[value="${event.key}"]`).checked = true;
    active = Math.min(active + 1, groups.length - 1);
  } else if (event.key === "Backspace") {
    active = Math.max(active - 1, 0);
  } else if (event.key === "Enter") {
    document.getElementById("rating").requestSubmit();
  } else if (event.key === "ArrowLeft" && document.getElementById("previous")) {
    location = document.getElementById("previous").href;
  } else if (event.key === "ArrowRight" && document.getElementById("next")) {
    location = document.getElementById("next").href;
  } else {
    return;
  }
  event.preventDefault();
  show();
});
</script>
</body></html>
"""

_DONE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Done</title><style>{{ style }}</style></head>
<body><h1>Human evaluation</h1>
<p class="muted" id="progress">{{ rated }} / {{ total }} rated</p>
<p>Thank you: every item is rated. <a href="/a/{{ token }}/1">Look back at the items</a> to change a rating.</p>
</body></html>
"""

_MESSAGE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style></head>
<body><h1>{{ title }}</h1><p class="{{ css }}">{{ message }}</p></body></html>
"""


def _message(status: int, title: str, message: str) -> HTMLResponse:
    css = "error" if status >= 400 else "muted"
    return HTMLResponse(render(_MESSAGE_PAGE, title=title, message=message, css=css), status_code=status)


def _forbidden() -> HTMLResponse:
    return _message(403, "Unknown login link", "This login link is not part of the study; ask for yours.")


def _parse_scores(form: dict[str, str]) -> dict[str, int] | str:
    """The three ratings as ints in 1-5, or what was wrong with them."""
    scores = {}
    for key in CRITERION_KEYS:
        raw = form.get(key)
        if not raw:
            return f"{key} is missing; rate all three questions."
        if raw not in _RATINGS:
            return f"{key}={raw!r} is not one of {', '.join(_RATINGS)}; rate from 1 (very poor) to 5 (excellent)."
        scores[key] = _RATINGS[raw]
    return scores


def create_annotation_app(db_path: str | os.PathLike) -> FastAPI:
    """The annotation web app over the study in `db_path` (one SQLite connection per request)."""
    open_study(db_path).close()
    app = FastAPI(title="VIKDF human evaluation", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=MAX_BODY_BYTES)

    @contextmanager
    def database() -> Iterator[sqlite3.Connection]:
        connection = open_study(db_path)
        try:
            yield connection
        finally:
            connection.close()

    def item_page(connection: sqlite3.Connection, token: str, annotator: int, position: int) -> HTMLResponse:
        rated, total = progress(connection, annotator)
        # Checked first: SQLite cannot even look up a position beyond 64 bits.
        item = item_at(connection, annotator, position) if 1 <= position <= total else None
        if item is None:
            return _message(404, "No such item", f"There is no item {position} in your list of {total}.")
        page = render(_ITEM_PAGE, token=token, item=item, context=json.loads(item["context"]), rated=rated,
                      total=total, criteria=CRITERIA, scale=SCALE)
        return HTMLResponse(page)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return _message(200, "VIKDF human evaluation", "Open the login link you were given to start rating.")

    @app.get("/a/{token}", response_class=HTMLResponse)
    def resume(token: str) -> HTMLResponse:
        with database() as connection:
            annotator = annotator_id(connection, token)
            if annotator is None:
                return _forbidden()
            position = next_position(connection, annotator)
            if position is None:
                rated, total = progress(connection, annotator)
                return HTMLResponse(render(_DONE_PAGE, token=token, rated=rated, total=total))
            return item_page(connection, token, annotator, position)

    @app.get("/a/{token}/{position}", response_class=HTMLResponse)
    def show(token: str, position: int) -> HTMLResponse:
        with database() as connection:
            annotator = annotator_id(connection, token)
            if annotator is None:
                return _forbidden()
            return item_page(connection, token, annotator, position)

    def store(token: str, form: dict[str, str]):
        with database() as connection:
            annotator = annotator_id(connection, token)
            if annotator is None:
                return _forbidden()
            assignment = assignment_of(connection, annotator, str(form.get("item", "")))
            if assignment is None:
                return _message(400, "Not your item", "This item is not in your list; nothing was saved.")
            scores = _parse_scores(form)
            if isinstance(scores, str):
                return _message(400, "Rating not saved", scores)
            save_rating(connection, assignment, scores)
        return RedirectResponse(f"/a/{token}", status_code=303)

    @app.post("/a/{token}/rate")
    async def rate(token: str, request: Request):
        form = {key: str(value) for key, value in (await request.form()).items()}
        # SQLite calls block: run them off the event loop, as FastAPI does for plain `def` routes.
        return await run_in_threadpool(store, token, form)

    return app


__all__ = ["create_annotation_app"]
