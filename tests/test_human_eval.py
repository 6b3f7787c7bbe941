"""The human evaluation of paper §5.2 / Table 2: the study database, the annotation endpoints and their refusals,
durability, the report and Fleiss' κ."""

import csv
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from transformers import HfArgumentParser

from vikdf.web.chat import ChatArguments
from vikdf.web.human_eval import __main__ as cli
from vikdf.web.human_eval import build_report, create_annotation_app, create_study, fleiss
from vikdf.web.human_eval.study import CRITERION_KEYS, connect, read_predictions
from web_helpers import (
    assignments,
    CONTEXTS,
    EXPECTED_KAPPA,
    EXPECTED_KAPPA_PER_CRITERION,
    EXPECTED_MEANS,
    RESPONSES,
    SYSTEMS,
    design_scores,
    free_port,
    running_server,
    write_predictions,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"relevance": "4", "informativeness": "3", "fluency": "5"}


@pytest.fixture
def study(tmp_path):
    """A study of both systems on both dialogues for three annotators: (db path, tokens)."""
    db = tmp_path / "study.sqlite"
    tokens = create_study(db, write_predictions(tmp_path), list(SYSTEMS), sample=2, seed=0, annotators=3)
    return db, tokens


def stored(db):
    connection = connect(db)
    rows = connection.execute("SELECT assignment_id, relevance, informativeness, fluency FROM ratings").fetchall()
    connection.close()
    return [tuple(row) for row in rows]


def test_create_gives_every_system_the_same_sampled_dialogues_blinded_and_shuffled(tmp_path, capsys):
    paths = write_predictions(tmp_path)
    # Ten dialogues instead of two, so that sampling and shuffling have room.
    for path in paths:
        lines = Path(path).read_text().splitlines()
        Path(path).write_text("\n".join(lines * 5) + "\n")
    tokens = cli.main(["create", "--predictions", *paths, "--systems", "VIKDF, Llama-2", "--sample", "6", "--seed",
                       "0", "--annotators", "3", "--db", str(tmp_path / "s.sqlite")])
    printed = capsys.readouterr().out
    assert [line.split(": ")[1] for line in printed.splitlines()[1:]] == [f"http://127.0.0.1:8000/a/{t}" for t in tokens]
    assert len(set(tokens)) == 3 and all(len(token) >= 20 for token in tokens)

    connection = connect(tmp_path / "s.sqlite")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    sampled = [row[0] for row in connection.execute("SELECT source_index FROM dialogues ORDER BY id")]
    assert len(sampled) == 6 and len(set(sampled)) == 6
    per_dialogue = connection.execute(
        "SELECT d.source_index, GROUP_CONCAT(y.name) FROM responses s JOIN dialogues d ON d.id = s.dialogue_id "
        "JOIN systems y ON y.id = s.system_id GROUP BY d.id").fetchall()
    assert all(sorted(names.split(",")) == sorted(SYSTEMS) for _, names in per_dialogue)
    orders = [tuple(name for _, _, name in assignments(tmp_path / "s.sqlite", token)) for token in tokens]
    assert all(len(order) == 12 for order in orders)
    assert len(set(orders)) > 1  # the order of systems differs between annotators
    assert len({order[i:i + 2] for order in orders for i in range(0, 12, 2)}) == 2  # and between items
    connection.close()

    again = tmp_path / "again.sqlite"
    create_study(again, paths, list(SYSTEMS), sample=6, seed=0, annotators=1)
    connection = connect(again)
    assert [row[0] for row in connection.execute("SELECT source_index FROM dialogues ORDER BY id")] == sampled
    connection.close()

    # Blinded: the page never names a system; the item id is a random token.
    client = TestClient(create_annotation_app(tmp_path / "s.sqlite"))
    page = client.get(f"/a/{tokens[0]}").text
    assert "VIKDF" not in page and "Llama-2" not in page and "predictions.jsonl" not in page


def test_create_refuses_mismatched_predictions_and_an_existing_study(tmp_path, study):
    paths = write_predictions(tmp_path / "p")
    lines = Path(paths[1]).read_text().splitlines()
    Path(paths[1]).write_text(lines[1] + "\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="line 1: another dialogue"):
        create_study(tmp_path / "x.sqlite", paths, list(SYSTEMS))
    Path(paths[1]).write_text(lines[0] + "\n")
    with pytest.raises(ValueError, match="has 1 predictions"):
        create_study(tmp_path / "x.sqlite", paths, list(SYSTEMS))
    Path(paths[1]).write_text('{"context": ["hi"]}\n')
    with pytest.raises(ValueError, match="line 1: not a prediction record"):
        read_predictions(paths[1])
    with pytest.raises(ValueError, match="--sample 3"):
        create_study(tmp_path / "x.sqlite", paths[:1], ["VIKDF"], sample=3)
    with pytest.raises(ValueError, match="one name each"):
        create_study(tmp_path / "x.sqlite", paths, ["VIKDF"])
    with pytest.raises(FileExistsError, match="never overwritten"):
        create_study(study[0], paths[:1], ["VIKDF"], sample=1)
    assert not (tmp_path / "x.sqlite").exists()


def test_unknown_token_gets_403(study):
    db, _ = study
    client = TestClient(create_annotation_app(db))
    assert client.get("/a/not-a-token").status_code == 403
    assert client.get("/a/not-a-token/1").status_code == 403
    item = assignments(db, study[1][0])[0][0]
    assert client.post("/a/not-a-token/rate", data={"item": item, **GOOD}).status_code == 403
    assert stored(db) == []


@pytest.mark.parametrize(
    "change", [{"relevance": "0"}, {"fluency": "6"}, {"informativeness": "three"}, {"relevance": "2.5"},
               {"fluency": ""}, {"relevance": None}],
)
def test_rating_outside_the_scale_or_missing_gets_400_and_stores_nothing(study, change):
    db, tokens = study
    client = TestClient(create_annotation_app(db))
    form = {"item": assignments(db, tokens[0])[0][0], **GOOD, **change}
    response = client.post(f"/a/{tokens[0]}/rate", data={k: v for k, v in form.items() if v is not None})
    assert response.status_code == 400 and "Rating not saved" in response.text
    assert stored(db) == []


def test_item_of_another_annotator_or_unknown_gets_400_and_stores_nothing(study):
    db, tokens = study
    client = TestClient(create_annotation_app(db))
    others = assignments(db, tokens[1])[0][0]
    assert client.post(f"/a/{tokens[0]}/rate", data={"item": others, **GOOD}).status_code == 400
    assert client.post(f"/a/{tokens[0]}/rate", data={"item": "0123456789abcdef", **GOOD}).status_code == 400
    assert client.post(f"/a/{tokens[0]}/rate", data=GOOD).status_code == 400
    assert stored(db) == []


def test_second_submission_replaces_the_first_and_annotators_stay_apart(study):
    db, tokens = study
    client = TestClient(create_annotation_app(db))
    mine, theirs = assignments(db, tokens[0]), assignments(db, tokens[1])
    same_response = next(item for item, text, _ in theirs if text == mine[0][1])
    assert client.post(f"/a/{tokens[0]}/rate", data={"item": mine[0][0], **GOOD}, follow_redirects=False).status_code == 303
    client.post(f"/a/{tokens[1]}/rate", data={"item": same_response, "relevance": "1", "informativeness": "1", "fluency": "1"})
    client.post(f"/a/{tokens[0]}/rate", data={"item": mine[0][0], "relevance": "2", "informativeness": "2", "fluency": "2"})
    assert sorted(row[1:] for row in stored(db)) == [(1, 1, 1), (2, 2, 2)]
    # The changed rating shows when the annotator looks back at the item.
    page = client.get(f"/a/{tokens[0]}/1").text
    assert page.count(" required checked>") == 3 and page.count('value="2" required checked>') == 3


def test_progress_and_resume_where_the_annotator_left_off(study):
    db, tokens = study
    client = TestClient(create_annotation_app(db))
    items = assignments(db, tokens[0])
    assert "0 / 4 rated · item 1 of 4" in client.get(f"/a/{tokens[0]}").text
    for item, _, _ in items[:3]:
        client.post(f"/a/{tokens[0]}/rate", data={"item": item, **GOOD})
    # A new client (another browser, a restarted server) resumes at item 4.
    page = TestClient(create_annotation_app(db)).get(f"/a/{tokens[0]}").text
    assert "3 / 4 rated · item 4 of 4" in page and f'value="{items[3][0]}"' in page
    done = client.post(f"/a/{tokens[0]}/rate", data={"item": items[3][0], **GOOD})  # follows the redirect
    assert done.status_code == 200 and "4 / 4 rated" in done.text and "every item is rated" in done.text
    assert client.get(f"/a/{tokens[0]}/9").status_code == 404


def test_dialogue_text_is_html_escaped(study):
    db, tokens = study
    client = TestClient(create_annotation_app(db))
    position = 1 + [text for _, text, _ in assignments(db, tokens[0])].index(RESPONSES["Llama-2", 0])
    page = client.get(f"/a/{tokens[0]}/{position}").text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page and "<script>alert" not in page
    assert CONTEXTS[0][0] in page


def test_concurrent_annotators_never_overwrite_each_other(study):
    db, tokens = study
    with running_server(create_annotation_app(db)) as url:
        def annotate(number, token):
            with httpx.Client(base_url=url) as client:
                for item, text, _ in assignments(db, token):
                    scores = design_scores(text, number)
                    response = client.post(f"/a/{token}/rate", data={"item": item, **{k: str(v) for k, v in scores.items()}})
                    assert response.status_code == 303

        threads = [threading.Thread(target=annotate, args=(n, t)) for n, t in enumerate(tokens, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    summary = build_report(db, db.parent / "report")
    assert summary["ratings"] == 12 and summary["complete_responses"] == 4
    for row in summary["systems"]:
        for key in CRITERION_KEYS:
            assert row[key] == pytest.approx(EXPECTED_MEANS[row["system"]][key])


def test_answered_rating_survives_a_killed_server_and_the_server_binds_localhost(study):
    db, tokens = study
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "vikdf.web.human_eval", "serve", "--db", str(db), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        item = assignments(db, tokens[0])[0][0]
        response = httpx.post(f"http://127.0.0.1:{port}/a/{tokens[0]}/rate", data={"item": item, **GOOD})
        assert response.status_code == 303
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        log = server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log
    assert [row[1:] for row in stored(db)] == [(4, 3, 5)]


def test_fleiss_kappa_matches_the_worked_example_of_its_reference_page():
    # Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, 5 categories; κ = 0.210
    # (P̄ = 0.378, P̄e = 0.213). Each row counts the raters per category; turn it into the raters' ratings.
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = np.array([[category for category, n in enumerate(row, 1) for _ in range(n)] for row in counts])
    assert ratings.shape == (10, 14)
    assert fleiss(ratings) == pytest.approx(0.2099, abs=5e-5)
    assert fleiss(np.full((3, 3), 4)) is None  # one category only: chance agreement 1, κ undefined
    assert fleiss(np.empty((0, 3))) is None
    with pytest.raises(ValueError, match="1-5"):
        fleiss(np.array([[0, 1], [2, 3]]))


def test_report_gives_table2_means_kappa_and_the_raw_ratings(study, capsys):
    db, tokens = study
    client = TestClient(create_annotation_app(db))
    for number, token in enumerate(tokens, 1):
        for item, text, _ in assignments(db, token):
            client.post(f"/a/{token}/rate", data={"item": item, **design_scores(text, number)})
    out = db.parent / "report"
    summary = cli.main(["report", "--db", str(db), "--output_dir", str(out)])
    rows = {row["system"]: row for row in summary["systems"]}
    for system in SYSTEMS:
        for key in CRITERION_KEYS:
            assert rows[system][key] == pytest.approx(EXPECTED_MEANS[system][key])
        assert rows[system]["kappa"] == pytest.approx(EXPECTED_KAPPA[system])
    assert summary["kappa_per_criterion"] == pytest.approx(EXPECTED_KAPPA_PER_CRITERION)

    table = (out / "human_eval.md").read_text()
    assert table.startswith("| Methods | Relevance | Informativeness | Fluency | Kappa |\n| --- | --- | --- | --- | --- |\n")
    assert "| VIKDF | 4.33 | 3.33 | 4.83 | 0.48 |" in table and "| Llama-2 | 2.67 | 2.50 | 4.17 | 0.36 |" in table
    assert "| 0.54 | 0.23 | 0.33 |" in table and table in capsys.readouterr().out
    with open(out / "ratings.csv", newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 12 and set(raw[0]) >= {"annotator", "system", "dialogue", *CRITERION_KEYS, "response"}
    assert not any(token in (out / "ratings.csv").read_text() for token in tokens)
    first = next(r for r in raw if r["annotator"] == "2" and r["response"] == RESPONSES["VIKDF", 1])
    assert (first["system"], first["relevance"], first["informativeness"], first["fluency"]) == ("VIKDF", "4", "3", "5")

    # Incomplete subjects stay out of κ but their ratings count in the means.
    connection = connect(db)
    connection.execute("DELETE FROM ratings WHERE assignment_id = (SELECT MAX(assignment_id) FROM ratings)")
    connection.close()
    partial = build_report(db, out)
    assert partial["ratings"] == 11 and partial["complete_responses"] == 3


def test_readme_human_evaluation_commands_parse():
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Human evaluation (paper §5.2", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ").splitlines()]
    found = set()
    for line in commands:
        words = shlex.split(line, comments=True)
        if "vikdf.web.human_eval" in words:
            command, *rest = words[words.index("vikdf.web.human_eval") + 1 :]
            HfArgumentParser(cli.COMMANDS[command]).parse_args_into_dataclasses(args=rest)
            found.add(command)
        elif "vikdf.web.chat" in words:
            HfArgumentParser(ChatArguments).parse_args_into_dataclasses(args=words[words.index("vikdf.web.chat") + 1 :])
            found.add("app")
    assert found == {"create", "serve", "report", "app"}
    for image in ("docs/annotation_page.png", "docs/chat_page.png"):
        assert f"({image})" in section and 10_000 < (ROOT / image).stat().st_size < 150_000
