"""What the two small web pages share (the annotation page of `vikdf.web.human_eval` and the chat page of `vikdf.web.chat`):
server-rendered HTML with every value escaped, one style sheet, the `--port` check, and serving on 127.0.0.1 unless
told otherwise."""

from __future__ import annotations

import jinja2
import uvicorn
from fastapi import FastAPI

# Autoescape everywhere: dialogue text comes from models and datasets, and `<script>` in a response must show as text.
_ENVIRONMENT = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

LOCAL_HOST = "127.0.0.1"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.25rem; margin-bottom: .25rem; }
.muted { color: #666; font-size: .9rem; }
.turn { background: #f1f3f5; border-radius: .5rem; padding: .5rem .75rem; margin: .35rem 0; white-space: pre-wrap; }
.turn.model { background: #e3f0ff; }
.box { border: 1px solid #ccd; border-radius: .5rem; padding: .6rem .8rem; margin: .6rem 0; white-space: pre-wrap; }
.box h2 { font-size: .95rem; margin: 0 0 .3rem 0; }
fieldset { border: 1px solid #ccd; border-radius: .5rem; margin: .6rem 0; }
fieldset.active { border: 2px solid #2f6fdf; background: #f5f9ff; }
legend { font-weight: 600; }
.scale label { margin-right: 1rem; }
.error { color: #a00; font-weight: 600; }
textarea { width: 100%; }
button { padding: .35rem 1rem; }
"""


def render(template: str, **values) -> str:
    """`template` (Jinja2 source) rendered with `values`, HTML-escaped; `style` is always available."""
    return _ENVIRONMENT.from_string(template).render(style=STYLE, **values)


def check_port(port: int, flag: str = "--port") -> None:
    """Refuse a port the server could not bind, before anything is loaded (0 would bind a random port that the
    printed address does not name)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"{flag} {port}: a port is a number from 1 to 65535, e.g. 8000.")


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run `app` until interrupted (uvicorn, one process, so requests share the same database or model)."""
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["LOCAL_HOST", "STYLE", "check_port", "render", "serve"]
