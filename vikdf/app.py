"""The chat page: talk to a VIKDF checkpoint and see, beside its response, the knowledge it distilled from the
context put into words (paper §5.4, Fig. 6) and the frozen LLM's response without knowledge.

    python -m vikdf.app --model runs/vikdf-reddit --port 8001

Requests from concurrent visitors are queued and generated together in batches (left padded, so a batch gives the
responses batch size 1 would) with the released generation settings that `eval_dialogue.py` uses by default
(beam 3, no repeated 3-grams, 32 new tokens, no sampling). The frozen-LLM response is that of
`eval_dialogue.py --baseline llm`: the same checkpoint and chat template without knowledge slots or CLIP inputs.

The page is a plain HTML form (the conversation so far travels in hidden fields), served on 127.0.0.1 unless
`--host` says otherwise; ``POST /api/reply`` answers ``{"context": [turns]}`` with JSON.
"""

from __future__ import annotations

import logging as pylogging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from transformers import HfArgumentParser
from transformers.utils import logging

from vikdf.arguments import PRECISIONS, resolve_dtype
from vikdf.evaluation import RELEASED_GENERATION, generate_responses, load_checkpoint
from vikdf.knowledge import textualise_knowledge
from vikdf.web import LOCAL_HOST, render, serve

logger = logging.get_logger("vikdf.app")

MAX_MESSAGE_CHARS = 2000


@dataclass
class ChatArguments:
    model: str = field(metadata={"help": "VIKDF dialogue checkpoint folder (or hub id) to chat with."})
    host: str = field(default=LOCAL_HOST, metadata={"help": "Address to bind (default: this machine only)."})
    port: int = field(default=8001, metadata={"help": "Port to listen on."})
    compare_llm: bool = field(
        default=True, metadata={"help": "Also show the frozen LLM's response without knowledge (--baseline llm)."}
    )
    max_context_turns: int = field(
        default=3, metadata={"help": "Turns of the conversation the model sees (the released code keeps 2-3)."}
    )
    max_batch_size: int = field(default=8, metadata={"help": "Most requests generated together in one batch."})
    batch_wait_ms: float = field(
        default=20.0, metadata={"help": "How long the first request of a batch waits for others to join it."}
    )
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on a GPU that has it, else fp32), bf16 or fp32.", "choices": list(PRECISIONS)}
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})


@dataclass(frozen=True)
class Reply:
    response: str
    knowledge: str | None
    llm_response: str | None


class BatchedResponder:
    """A worker thread that answers queued contexts in batches: at most `max_batch_size` per batch, gathered for
    up to `batch_wait_s` after the first arrives. `batch_sizes` records the size of every batch run."""

    def __init__(self, model, processor, *, compare_llm: bool = True, max_batch_size: int = 8,
                 batch_wait_s: float = 0.02, generation: dict | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        self.model, self.processor = model, processor
        # A LoRA-baseline checkpoint has no knowledge to show: it answers as eval_dialogue.py evaluates it.
        self.with_knowledge = getattr(model.config, "dialogue_method", "vikdf") != "lora"
        self.compare_llm = compare_llm and self.with_knowledge
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.generation = {**RELEASED_GENERATION, **(generation or {})}
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="vikdf-chat-generation", daemon=True)
        self._worker.start()

    def submit(self, context: list[str]) -> Future:
        """A future of the `Reply` to `context` (a list of turns, the last one the user's)."""
        if self._closed:
            raise RuntimeError("The responder is closed; start a new one.")
        future: Future = Future()
        self._queue.put((list(context), future))
        return future

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join()

    def _gather(self, first) -> list:
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:
                self._queue.put(None)
                break
            batch.append(request)
        return batch

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = self._gather(first)
            contexts = [context for context, _ in batch]
            try:
                replies = self.answer(contexts)
            except Exception as error:  # every waiting visitor hears of the failure, and the worker goes on
                logger.exception("Generation failed")
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batch_sizes.append(len(batch))
            for (_, future), reply in zip(batch, replies):
                future.set_result(reply)

    def answer(self, contexts: list[list[str]]) -> list[Reply]:
        """Replies to `contexts`, generated as one batch each for the response, the knowledge and the LLM alone."""
        settings = dict(batch_size=len(contexts), progress=False, **self.generation)
        responses = generate_responses(self.model, self.processor, contexts, with_knowledge=self.with_knowledge, **settings)
        knowledge = [None] * len(contexts)
        if self.with_knowledge:
            knowledge = textualise_knowledge(self.model, self.processor, contexts, batch_size=len(contexts), **self.generation)
        llm = [None] * len(contexts)
        if self.compare_llm:
            llm = generate_responses(self.model, self.processor, contexts, with_knowledge=False, **settings)
        return [Reply(*parts) for parts in zip(responses, knowledge, llm)]


_CHAT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Chat with {{ name }}</title><style>{{ style }}</style></head>
<body>
<h1>Chat with {{ name }}</h1>
<p class="muted">VIKDF answers from the conversation and the visual knowledge it distils from it; no image is used.</p>
{% for turn in turns %}<div class="turn{% if loop.index is even %} model{% endif %}">{{ turn }}</div>
{% endfor %}
{% if reply %}
<div class="box"><h2>VIKDF's response</h2><div id="response">{{ reply.response }}</div></div>
{% if reply.knowledge is not none %}<div class="box"><h2>Its knowledge, in words (Fig. 6)</h2><div id="knowledge">{{ reply.knowledge }}</div></div>{% endif %}
{% if reply.llm_response is not none %}<div class="box"><h2>The frozen LLM alone, without knowledge</h2><div id="llm-response">{{ reply.llm_response }}</div></div>{% endif %}
{% endif %}
{% if error %}<p class="error">{{ error }}</p>{% endif %}
<form method="post" action="/" id="chat">
{% for turn in history %}<input type="hidden" name="turn" value="{{ turn }}">
{% endfor %}
<textarea name="message" id="message" rows="3" maxlength="{{ max_chars }}" placeholder="Say something" required autofocus></textarea>
<button type="submit">Send</button> <a href="/">new conversation</a>
</form>
<script>
document.getElementById("message").addEventListener("keydown", event => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); document.getElementById("chat").requestSubmit(); }
});
</script>
</body></html>
"""


def create_chat_app(responder: BatchedResponder, name: str, max_context_turns: int = 3,
                    timeout_s: float = 300.0) -> FastAPI:
    """The chat web app over `responder`; `name` is what the page calls the model."""
    if max_context_turns < 1:
        raise ValueError(f"max_context_turns must be at least 1, got {max_context_turns}.")
    app = FastAPI(title=f"Chat with {name}", docs_url=None, redoc_url=None, openapi_url=None)

    def page(turns: list[str], reply: Reply | None = None, error: str | None = None, status: int = 200) -> HTMLResponse:
        history = turns + [reply.response] if reply else turns
        html = render(_CHAT_PAGE, name=name, turns=turns, reply=reply, error=error, history=history,
                      max_chars=MAX_MESSAGE_CHARS)
        return HTMLResponse(html, status_code=status)

    def check(turns: list[str]) -> str | None:
        if not turns or not turns[-1].strip():
            return "Write a message first."
        if any(len(turn) > MAX_MESSAGE_CHARS for turn in turns):
            return f"Messages are limited to {MAX_MESSAGE_CHARS} characters."
        return None

    def reply_to(turns: list[str]) -> Reply:
        return responder.submit(turns[-max_context_turns:]).result(timeout=timeout_s)

    @app.get("/", response_class=HTMLResponse)
    def start() -> HTMLResponse:
        return page([])

    @app.post("/", response_class=HTMLResponse)
    async def chat(request: Request) -> HTMLResponse:
        form = await request.form()
        turns = [str(turn) for turn in form.getlist("turn")] + [str(form.get("message", "")).strip()]
        error = check(turns)
        if error:
            return page(turns[:-1], error=error, status=400)
        return page(turns, await run_in_threadpool(reply_to, turns))

    @app.post("/api/reply")
    async def api_reply(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            turns = [str(turn) for turn in body["context"]] if isinstance(body["context"], list) else None
        except (ValueError, KeyError, TypeError):
            turns = None
        if turns is None:
            return JSONResponse({"error": 'send {"context": ["turn", ...]}'}, status_code=400)
        error = check(turns)
        if error:
            return JSONResponse({"error": error}, status_code=400)
        return JSONResponse(asdict(await run_in_threadpool(reply_to, turns)))

    return app


def build_chat_app(args: ChatArguments) -> tuple[FastAPI, BatchedResponder]:
    """Load the checkpoint named by `args` and build the app (the responder's worker thread is running)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = load_checkpoint(args.model, resolve_dtype(args.precision))
    model.to(device).eval()
    responder = BatchedResponder(model, processor, compare_llm=args.compare_llm, max_batch_size=args.max_batch_size,
                                 batch_wait_s=args.batch_wait_ms / 1000)
    name = Path(args.model).name if os.path.isdir(args.model) else args.model
    return create_chat_app(responder, name, args.max_context_turns), responder


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ChatArguments).parse_args_into_dataclasses(args=argv)
    app, responder = build_chat_app(args)
    logger.info(f"Chat with {args.model} on http://{args.host}:{args.port}")
    try:
        serve(app, args.host, args.port)
    finally:
        responder.close()


if __name__ == "__main__":
    pylogging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=pylogging.INFO)
    main(sys.argv[1:])
