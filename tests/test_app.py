"""The chat page (`python -m vikdf.web.chat`): batched generation behind it, what it shows, its refusals and defaults."""

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from vikdf.web import chat
from modeling_vikdf import PAPER_GENERATION
from vikdf.web.human_eval import __main__ as human_eval_cli


@pytest.fixture
def checkpoint(build_tiny, tmp_path):
    """A tiny VIKDF dialogue checkpoint folder."""
    model, processor = build_tiny("llama")
    folder = tmp_path / "tiny-vikdf"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def responder(build_tiny):
    model, processor = build_tiny("llama")
    # A long wait so that requests submitted together surely share one batch.
    responder = chat.BatchedResponder(model, processor, max_batch_size=3, batch_wait_s=1.0,
                                      generation={"max_new_tokens": 8})
    yield responder
    responder.close()


def test_concurrent_requests_are_generated_in_one_batch_with_the_answers_of_batch_size_one(responder):
    contexts = [["hello there", "what did you see at the park today?"], ["a dog in the park"], ["hi"], ["the cat"]]
    futures = [responder.submit(context) for context in contexts]
    replies = [future.result(timeout=120) for future in futures]
    assert responder.batch_sizes == [3, 1]  # at most max_batch_size per batch
    for context, reply in zip(contexts, replies):
        assert reply == responder.answer([context])[0]
        assert isinstance(reply.response, str) and isinstance(reply.knowledge, str) and isinstance(reply.llm_response, str)
    # The knowledge-free comparison is the frozen LLM's own answer, not VIKDF's.
    assert any(reply.llm_response != reply.response for reply in replies)


def test_a_failed_batch_fails_its_requests_and_the_worker_goes_on(responder, monkeypatch):
    answer = responder.answer

    def failing(contexts):
        if ["boom"] in contexts:
            raise RuntimeError("generation failed")
        return answer(contexts)

    monkeypatch.setattr(responder, "answer", failing)
    with pytest.raises(RuntimeError, match="generation failed"):
        responder.submit(["boom"]).result(timeout=120)
    assert responder.submit(["hi"]).result(timeout=120) == answer([["hi"]])[0]
    responder.close()
    with pytest.raises(RuntimeError, match="closed"):
        responder.submit(["hi"])


def test_chat_page_shows_response_knowledge_and_llm_escaped_and_keeps_the_conversation(responder):
    client = TestClient(chat.create_chat_app(responder, "tiny", max_context_turns=2))
    assert 'id="message"' in client.get("/").text
    message = "<script>alert(1)</script> is the sky blue?"
    page = client.post("/", data={"message": message}).text
    reply = responder.answer([[message]])[0]
    assert str(escape(message)) in page and "<script>alert(1)" not in page
    for element, text in (("response", reply.response), ("knowledge", reply.knowledge), ("llm-response", reply.llm_response)):
        assert f'<div id="{element}">{escape(text)}</div>' in page
    # The next message carries the conversation; the model sees its last two turns.
    page = client.post("/", data={"turn": [message, reply.response], "message": "and at night?"}).text
    assert page.count('class="turn') == 3
    second = responder.answer([[reply.response, "and at night?"]])[0]
    assert f'<div id="response">{escape(second.response)}</div>' in page

    api = client.post("/api/reply", json={"context": ["hi"]})
    assert api.status_code == 200 and api.json() == {"response": responder.answer([["hi"]])[0].response,
                                                      "knowledge": responder.answer([["hi"]])[0].knowledge,
                                                      "llm_response": responder.answer([["hi"]])[0].llm_response}


@pytest.mark.parametrize(
    ("path", "body"),
    [("/", {"data": {"message": "   "}}), ("/", {"data": {"message": "x" * 2001}}), ("/api/reply", {"json": {"context": []}}),
     ("/api/reply", {"json": {"text": "hi"}}), ("/api/reply", {"content": b"not json"})],
)
def test_empty_overlong_or_malformed_messages_get_400(responder, path, body):
    response = TestClient(chat.create_chat_app(responder, "tiny")).post(path, **body)
    assert response.status_code == 400
    assert responder.batch_sizes == []


def test_servers_bind_localhost_by_default_and_chat_uses_the_released_generation(checkpoint, tmp_path, monkeypatch):
    served = []
    monkeypatch.setattr(chat, "serve", lambda app, host, port: served.append((app, host, port)))
    monkeypatch.setattr(human_eval_cli, "serve", lambda app, host, port: served.append((app, host, port)))
    chat.main(["--model", str(checkpoint)])
    assert served[-1][1:] == ("127.0.0.1", 8001)

    app, responder = chat.build_chat_app(chat.ChatArguments(model=str(checkpoint)))
    assert responder.generation == PAPER_GENERATION and responder.compare_llm
    responder.close()

    db = tmp_path / "study.sqlite"
    (tmp_path / "p.jsonl").write_text('{"context": ["hi"], "reference": "hello", "hypothesis": "hey"}\n')
    human_eval_cli.main(["create", "--predictions", str(tmp_path / "p.jsonl"), "--systems", "A", "--sample", "1",
                         "--db", str(db)])
    human_eval_cli.main(["serve", "--db", str(db)])
    assert served[-1][1:] == ("127.0.0.1", 8000)
    human_eval_cli.main(["serve", "--db", str(db), "--host", "0.0.0.0", "--port", "9000"])
    assert served[-1][1:] == ("0.0.0.0", 9000)
