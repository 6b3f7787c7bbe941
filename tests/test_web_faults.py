"""The web apps' faults (issue 22): the chat app serving clients that have left, its bounds and refusals, the flags
both servers refuse before loading anything, and the annotation server's and report's handling of odd input."""

import csv
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from modeling_vikdf import paper_generation_config
from test_human_eval import GOOD, study  # noqa: F401  (the study fixture)
from vikdf.web import chat
from vikdf.web.human_eval import __main__ as cli
from vikdf.web.human_eval import build_report, create_annotation_app, create_study
from vikdf.web.human_eval.report import CSV_COLUMNS, write_ratings_csv
from web_helpers import SYSTEMS, assignments, running_server, write_predictions


class RecordingResponder(chat.BatchedResponder):
    """A responder without a model: its batches record their contexts and wait for `release`."""

    def __init__(self, **kwargs):
        self.answered, self.release = [], threading.Event()
        # A stand-in for a VIKDF checkpoint: its config's dialogue method and the generation config it carries.
        model = SimpleNamespace(config=SimpleNamespace(dialogue_with_knowledge=True), generation_config=paper_generation_config())
        super().__init__(model, None, batch_wait_s=0, **kwargs)

    def answer(self, contexts):
        self.answered.extend(contexts)
        assert self.release.wait(timeout=10)
        return [chat.Reply(f"re: {context[-1]}", "knowledge", "llm") for context in contexts]


@pytest.fixture
def recording():
    made = []

    def make(**kwargs):
        made.append(RecordingResponder(**kwargs))
        return made[-1]

    yield make
    for responder in made:
        responder.release.set()
        responder.close()


def until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------
# Item 8: the chat app works only for clients that are still there, within bounds
# ---------------------------------------------------------------------------------------------------------------
def test_chat_requests_whose_clients_left_are_withdrawn_before_generation(recording):
    responder = recording(max_batch_size=1)
    with running_server(chat.create_chat_app(responder, "stub")) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/api/reply", json={"context": ["first"]}, timeout=30)
        until(lambda: responder.answered == [["first"]])
        for number in range(4):  # visitors who give up while "first" is being generated
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/api/reply", json={"context": [f"gone {number}"]}, timeout=0.3)
        until(lambda: responder.waiting == 0)
        responder.release.set()
        assert first.result(timeout=30).json()["response"] == "re: first"
        assert httpx.post(f"{url}/api/reply", json={"context": ["next"]}, timeout=30).json()["response"] == "re: next"
    assert responder.answered == [["first"], ["next"]]


def test_chat_queue_full_answers_503_with_retry_after(recording):
    responder = recording(max_batch_size=1, max_waiting=1)
    responder.submit(["running"])
    until(lambda: responder.answered == [["running"]])
    queued = responder.submit(["queued"])
    client = TestClient(chat.create_chat_app(responder, "stub"))
    api = client.post("/api/reply", json={"context": ["one more"]})
    assert api.status_code == 503 and int(api.headers["Retry-After"]) >= 1 and "try again" in api.json()["error"]
    page = client.post("/", data={"message": "one more"})
    assert page.status_code == 503 and int(page.headers["Retry-After"]) >= 1 and "one more" not in page.text
    responder.release.set()
    assert queued.result(timeout=10).response == "re: queued"
    assert responder.answered == [["running"], ["queued"]]


def test_chat_body_over_the_cap_gets_413_declared_or_chunked(recording):
    responder = recording()
    client = TestClient(chat.create_chat_app(responder, "stub"))
    assert client.post("/api/reply", content=b" " * (chat.MAX_BODY_BYTES + 1)).status_code == 413
    chunks = (b" " * 65536 for _ in range(chat.MAX_BODY_BYTES // 65536 + 1))  # no Content-Length
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/", content=chunks, headers=form).status_code == 413
    assert responder.answered == []


def test_chat_conversation_over_the_turn_cap_gets_400(recording):
    responder = recording()
    client = TestClient(chat.create_chat_app(responder, "stub"))
    api = client.post("/api/reply", json={"context": ["hi"] * (chat.MAX_TURNS + 1)})
    assert api.status_code == 400 and f"{chat.MAX_TURNS} turns" in api.json()["error"]
    page = client.post("/", data={"turn": ["hi"] * chat.MAX_TURNS, "message": "one too many"})
    assert page.status_code == 400 and f"{chat.MAX_TURNS} turns" in page.text
    assert responder.answered == []


@pytest.mark.parametrize(
    ("context", "named"),
    [([1], "context[0]"), (["hi", None], "context[1]"), (["hi", {"a": 1}], "context[1]"),
     ([{"role": "wizard", "content": "hi"}], "'wizard'"), ("hi", "list")],
)
def test_chat_api_refuses_non_string_turns_and_unknown_roles(recording, context, named):
    responder = recording()
    response = TestClient(chat.create_chat_app(responder, "stub")).post("/api/reply", json={"context": context})
    assert response.status_code == 400 and named in response.json()["error"]
    assert responder.answered == []


def test_chat_api_takes_user_and_assistant_messages_as_turns(recording):
    responder = recording()
    responder.release.set()
    turns = (("user", "hi"), ("assistant", "hello"), ("user", "sky?"))
    messages = [{"role": role, "content": text} for role, text in turns]
    response = TestClient(chat.create_chat_app(responder, "stub")).post("/api/reply", json={"context": messages})
    assert response.status_code == 200 and responder.answered == [["hi", "hello", "sky?"]]


# ---------------------------------------------------------------------------------------------------------------
# Item 9: flags that make no sense, refused before anything loads or serves
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--port", "99999"), ("--port", "0"), ("--max_batch_size", "0"), ("--max_context_turns", "0"),
     ("--max_waiting", "0"), ("--batch_wait_ms", "-1")],
)
def test_chat_flag_out_of_range_is_refused_before_the_model_loads(tmp_path, monkeypatch, flag, value):
    (tmp_path / "config.json").write_text("{}")

    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(chat, "load_checkpoint", load)
    with pytest.raises(ValueError, match=flag):
        chat.main(["--model", str(tmp_path), flag, value])


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_annotation_server_port_out_of_range_is_refused_before_serving(study, monkeypatch, port):  # noqa: F811
    monkeypatch.setattr(cli, "serve", lambda *args: pytest.fail("served"))
    with pytest.raises(ValueError, match="--port"):
        cli.main(["serve", "--db", str(study[0]), "--port", port])


# ---------------------------------------------------------------------------------------------------------------
# Item 10: raw errors
# ---------------------------------------------------------------------------------------------------------------
def test_study_database_in_a_missing_folder_names_the_folder(tmp_path):
    db = tmp_path / "no-such-folder" / "study.sqlite"
    with pytest.raises(FileNotFoundError, match="no-such-folder.*does not exist"):
        create_study(db, write_predictions(tmp_path), list(SYSTEMS), sample=1)
    assert not db.parent.exists()


@pytest.mark.parametrize("position", ["99999999999999999999", "0", "-3"])
def test_item_position_out_of_range_gets_404(study, position):  # noqa: F811
    db, tokens = study
    response = TestClient(create_annotation_app(db)).get(f"/a/{tokens[0]}/{position}")
    assert response.status_code == 404 and "There is no item" in response.text


# ---------------------------------------------------------------------------------------------------------------
# Item 11: silent wrong figures
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rating", [" 3 ", "03", "٣", "0_3", "+3", "3.0"])
def test_rating_other_than_exactly_1_to_5_gets_400_and_stores_nothing(study, rating):  # noqa: F811
    db, tokens = study
    form = {"item": assignments(db, tokens[0])[0][0], **GOOD, "relevance": rating}
    response = TestClient(create_annotation_app(db)).post(f"/a/{tokens[0]}/rate", data=form)
    assert response.status_code == 400 and "Rating not saved" in response.text
    assert TestClient(create_annotation_app(db)).get(f"/a/{tokens[0]}").text.count(" checked>") == 0


def test_pipe_in_a_system_name_stays_inside_its_table2_cell(tmp_path):
    db = tmp_path / "study.sqlite"
    create_study(db, write_predictions(tmp_path), ["VIKDF | ours", "Llama\\|2"], sample=1, annotators=1)
    table = build_report(db, tmp_path / "report") and (tmp_path / "report" / "human_eval.md").read_text()
    rows = table.split("\n\n")[0].splitlines()
    assert rows[2].startswith("| VIKDF \\| ours |") and rows[3].startswith("| Llama\\\\\\|2 |")
    assert all(len(re.findall(r"(?<!\\)(?:\\\\)*\|", row)) == 6 for row in rows)  # 5 cells: 6 unescaped pipes


def test_ratings_csv_cells_that_spreadsheets_would_run_as_formulas_are_neutralised(tmp_path):
    row = {"annotator": 1, "system": "=HYPERLINK(\"http://x\")", "dialogue": 0, "position": 1, "relevance": 4,
           "informativeness": 3, "fluency": 5, "rated_at": "2024-01-01T00:00:00", "context": ["@SUM(A1)", "fine"],
           "response": "-2+3"}
    plain = {**row, "system": "VIKDF", "context": ["a - b"], "response": "+1 from me"}
    write_ratings_csv(tmp_path / "ratings.csv", [row, plain])
    with open(tmp_path / "ratings.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(CSV_COLUMNS)
    assert (written[0]["system"], written[0]["context"], written[0]["response"]) == (
        "'=HYPERLINK(\"http://x\")", "'@SUM(A1)\nfine", "'-2+3")
    assert (written[1]["system"], written[1]["context"], written[1]["response"]) == ("VIKDF", "a - b", "'+1 from me")
    assert (written[0]["relevance"], written[0]["rated_at"]) == ("4", "2024-01-01T00:00:00")


# ---------------------------------------------------------------------------------------------------------------
# Item 12: --help
# ---------------------------------------------------------------------------------------------------------------
def test_human_eval_help_lists_the_subcommands_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and all(command in printed for command in ("create", "serve", "report"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["create", "--help"])
    assert exit_.value.code == 0 and "--predictions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["crate"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
