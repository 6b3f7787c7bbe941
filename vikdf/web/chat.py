"""The chat page: talk to a VIKDF checkpoint and see, beside its response, the knowledge it distilled from the
context put into words (paper §5.4, Fig. 6) and the frozen LLM's response without knowledge.

    python -m vikdf.web.chat --model runs/vikdf-reddit --port 8001

Requests from concurrent visitors are queued and generated together in batches (left padded, so a batch gives the
responses batch size 1 would) with the checkpoint's generation config, as `eval_dialogue.py` decodes by default
(a VIKDF checkpoint carries the released settings). The frozen-LLM response is that of
`eval_dialogue.py --baseline llm`: the same checkpoint and chat template without knowledge slots or CLIP inputs.

The page is a plain HTML form (the conversation so far travels in hidden fields), served on 127.0.0.1 unless
`--host` says otherwise; ``POST /api/reply`` answers ``{"context": [turns]}`` with JSON, the turns as strings or as
chat messages ``{"role": "user" | "assistant", "content": "..."}``.

The server keeps its work bounded: at most `--max_waiting` requests wait for a batch (more are answered 503 with
`Retry-After`), a request whose visitor leaves while it waits is withdrawn unanswered, and bodies and conversations
have a size limit (413, 400).
"""

from __future__ import annotations

import asyncio
import logging as pylogging
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from transformers import HfArgumentParser
from transformers.utils import logging

from pipeline_vikdf import textualise_knowledge
from vikdf.checks import check_model_source
from vikdf.evaluation.dialogues import checkpoint_generation, generate_responses, load_checkpoint
from vikdf.training.arguments import PRECISIONS, resolve_dtype
from vikdf.web.common import LOCAL_HOST, check_port, render, serve

logger = logging.get_logger("vikdf.web.chat")

MAX_MESSAGE_CHARS = 2000
MAX_TURNS = 100
# A conversation of MAX_TURNS longest messages still fits: a character is at most 4 bytes of UTF-8, each sent
# percent-encoded (%XX) by the form, so 12 bytes; JSON's \uXXXX escapes take less.
MAX_BODY_BYTES = MAX_TURNS * MAX_MESSAGE_CHARS * 12
ROLES = ("user", "assistant")


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
    max_waiting: int = field(
        default=64, metadata={"help": "Most requests waiting for a batch; more are answered 503 with Retry-After."}
    )
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


class Busy(RuntimeError):
    """Raised by `BatchedResponder.submit` when the queue is full; `retry_after_s` estimates when it has room."""

    def __init__(self, waiting: int, retry_after_s: int) -> None:
        super().__init__(f"{waiting} requests are waiting already; try again in {retry_after_s} s.")
        self.retry_after_s = retry_after_s


def require_positive(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"{name} {value} must be at least 1.")


class BatchedResponder:
    """A worker thread that answers queued contexts in batches: at most `max_batch_size` per batch, gathered for
    up to `batch_wait_s` after the first arrives. At most `max_waiting` requests wait; cancelling a waiting
    request's future withdraws it. `batch_sizes` records the size of every batch run."""

    def __init__(self, model, processor, *, compare_llm: bool = True, max_batch_size: int = 8,
                 batch_wait_s: float = 0.02, max_waiting: int = 64, generation: dict | None = None) -> None:
        require_positive(max_batch_size, "max_batch_size")
        require_positive(max_waiting, "max_waiting")
        self.model, self.processor = model, processor
        # A LoRA-baseline checkpoint has no knowledge to show: it answers as eval_dialogue.py evaluates it.
        self.with_knowledge = model.config.dialogue_with_knowledge
        self.compare_llm = compare_llm and self.with_knowledge
        self.max_batch_size, self.batch_wait_s, self.max_waiting = max_batch_size, batch_wait_s, max_waiting
        self.generation = checkpoint_generation(model, **(generation or {}))
        self.batch_sizes: list[int] = []
        self._batch_s = 1.0  # how long the last batch took, for Retry-After; a guess until one has run
        # Only live requests wait here: a withdrawn one leaves at once, so it neither holds a place nor is generated.
        self._waiting: deque[tuple[list[str], Future]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="vikdf-chat-generation", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch."""
        with self._changed:
            return len(self._waiting)

    def submit(self, context: list[str]) -> Future:
        """A future of the `Reply` to `context` (a list of turns, the last one the user's); cancel it to withdraw
        the request while it waits. Raises `Busy` when `max_waiting` requests wait already."""
        request = (list(context), Future())
        with self._changed:
            if self._closed:
                raise RuntimeError("The responder is closed; start a new one.")
            if len(self._waiting) >= self.max_waiting:
                batches_ahead = len(self._waiting) / self.max_batch_size + 1  # the queue and the running batch
                raise Busy(len(self._waiting), max(1, math.ceil(batches_ahead * self._batch_s)))
            self._waiting.append(request)
            self._changed.notify()
        request[1].add_done_callback(lambda _: self._withdraw(request))
        return request[1]

    def _withdraw(self, request: tuple[list[str], Future]) -> None:
        with self._changed:
            if request in self._waiting:  # cancelled while waiting (a served request has left the queue already)
                self._waiting.remove(request)

    def close(self) -> None:
        """Answer what waits, then stop the worker."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join()

    def _next_batch(self) -> list[tuple[list[str], Future]]:
        """The first waiting request and those that join it within `batch_wait_s`, up to `max_batch_size`; empty
        once the responder is closed and nothing waits."""
        batch: list[tuple[list[str], Future]] = []
        deadline = None
        with self._changed:
            while len(batch) < self.max_batch_size:
                if self._waiting:
                    request = self._waiting.popleft()
                    # False for a request cancelled a moment ago, before its callback could withdraw it.
                    if request[1].set_running_or_notify_cancel():
                        batch.append(request)
                        if deadline is None:
                            deadline = time.monotonic() + self.batch_wait_s
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    break
                self._changed.wait(left)
        return batch

    def _run(self) -> None:
        while batch := self._next_batch():
            started = time.monotonic()
            try:
                replies = self.answer([context for context, _ in batch])
            except Exception as error:  # every waiting visitor hears of the failure, and the worker goes on
                logger.exception("Generation failed")
                for _, future in batch:
                    future.set_exception(error)
                continue
            self._batch_s = time.monotonic() - started
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


async def _client_left(request: Request) -> None:
    """Returns when the client closes the connection: once the body is read, the server's next message about the
    request is its disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def api_turns(body) -> list[str] | str:
    """The turns of an API request's JSON body, or what is wrong with it."""
    context = body.get("context") if isinstance(body, dict) else None
    if not isinstance(context, list):
        return ('send {"context": [turns]}: a list of strings, or of {"role": "user" | "assistant", "content": "..."} '
                "messages, the last one the user's.")
    turns = []
    for index, turn in enumerate(context):
        if isinstance(turn, dict) and turn.keys() == {"role", "content"}:
            if turn["role"] not in ROLES:
                return f"context[{index}] has the role {turn['role']!r}; use one of {', '.join(ROLES)}."
            turn = turn["content"]
        if not isinstance(turn, str):
            return f"context[{index}] is {type(turn).__name__}, not a string; send every turn as text."
        turns.append(turn)
    return turns


def create_chat_app(responder: BatchedResponder, name: str, max_context_turns: int = 3,
                    timeout_s: float = 300.0) -> FastAPI:
    """The chat web app over `responder`; `name` is what the page calls the model."""
    require_positive(max_context_turns, "max_context_turns")
    app = FastAPI(title=f"Chat with {name}", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=MAX_BODY_BYTES)

    def page(turns: list[str], reply: Reply | None = None, error: str | None = None, status: int = 200,
             headers: dict | None = None) -> HTMLResponse:
        history = turns + [reply.response] if reply else turns
        html = render(_CHAT_PAGE, name=name, turns=turns, reply=reply, error=error, history=history,
                      max_chars=MAX_MESSAGE_CHARS)
        return HTMLResponse(html, status_code=status, headers=headers)

    def check(turns: list[str]) -> str | None:
        if not turns or not turns[-1].strip():
            return "Write a message first."
        if len(turns) > MAX_TURNS:
            return f"Conversations are limited to {MAX_TURNS} turns; start a new conversation."
        if any(len(turn) > MAX_MESSAGE_CHARS for turn in turns):
            return f"Messages are limited to {MAX_MESSAGE_CHARS} characters."
        return None

    async def reply_to(request: Request, turns: list[str]) -> Reply:
        """The reply to `turns`. Raises HTTPException when the queue is full (503), when the client leaves
        (then the request is withdrawn if it still waits; a batch being generated finishes unseen) or when no
        reply comes in `timeout_s` (504)."""
        try:
            reply = asyncio.wrap_future(responder.submit(turns[-max_context_turns:]))
        except Busy as busy:
            raise HTTPException(503, str(busy), headers={"Retry-After": str(busy.retry_after_s)}) from None
        left = asyncio.ensure_future(_client_left(request))
        try:
            await asyncio.wait([reply, left], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if reply.done():
            return reply.result()
        reply.cancel()  # cancels the responder's future too
        if left.done():
            raise HTTPException(499, "The client closed the connection.")  # nginx's code; nobody reads it
        raise HTTPException(504, f"No reply within {timeout_s:.0f} s; try again later.")

    @app.get("/", response_class=HTMLResponse)
    def start() -> HTMLResponse:
        return page([])

    @app.post("/", response_class=HTMLResponse)
    async def chat(request: Request) -> HTMLResponse:
        form = await request.form()
        *turns, message = [*form.getlist("turn"), form.get("message", "")]
        if not all(isinstance(text, str) for text in (*turns, message)):  # a multipart upload is not a turn
            return page([], error="Send the conversation as text.", status=400)
        turns.append(message.strip())
        error = check(turns)
        if error:
            return page(turns[:-1], error=error, status=400)
        try:
            return page(turns, await reply_to(request, turns))
        except HTTPException as refusal:
            return page(turns[:-1], error=refusal.detail, status=refusal.status_code, headers=refusal.headers)

    @app.post("/api/reply")
    async def api_reply(request: Request) -> JSONResponse:
        try:
            turns = api_turns(await request.json())
        except ValueError:
            turns = api_turns(None)
        error = turns if isinstance(turns, str) else check(turns)
        if error:
            return JSONResponse({"error": error}, status_code=400)
        try:
            return JSONResponse(asdict(await reply_to(request, turns)))
        except HTTPException as refusal:
            return JSONResponse({"error": refusal.detail}, status_code=refusal.status_code, headers=refusal.headers)

    return app


def check_chat_arguments(args: ChatArguments) -> None:
    """Refuse what can be seen wrong in the flags before the checkpoint loads (minutes at 7B)."""
    check_model_source(args.model, "--model")
    check_port(args.port)
    for flag in ("max_context_turns", "max_batch_size", "max_waiting"):
        require_positive(getattr(args, flag), f"--{flag}")
    if args.batch_wait_ms < 0:
        raise ValueError(f"--batch_wait_ms {args.batch_wait_ms} must not be negative.")


def build_chat_app(args: ChatArguments) -> tuple[FastAPI, BatchedResponder]:
    """Load the checkpoint named by `args` and build the app (the responder's worker thread is running)."""
    check_chat_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = load_checkpoint(args.model, resolve_dtype(args.precision))
    model.to(device).eval()
    responder = BatchedResponder(model, processor, compare_llm=args.compare_llm, max_batch_size=args.max_batch_size,
                                 batch_wait_s=args.batch_wait_ms / 1000, max_waiting=args.max_waiting)
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
