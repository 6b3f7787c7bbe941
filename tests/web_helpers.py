"""Helpers for the web-page tests: a study whose ratings are known in advance, and servers on free local ports."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from vikdf.web.human_eval.study import connect

SYSTEMS = ("VIKDF", "Llama-2")
CONTEXTS = (
    ["the sky is so vast tonight, i wonder what is out there."],
    ["i went to the beach today and the water was freezing!"],
)
RESPONSES = {
    ("VIKDF", 0): "the stars look endless, maybe one day we will travel to them and see.",
    ("VIKDF", 1): "brr! at least the waves and the sand must have been lovely.",
    ("Llama-2", 0): "i am not sure <script>alert('x')</script> what is out there.",
    ("Llama-2", 1): "i went to the beach too.",
}
# (relevance, informativeness, fluency) of annotators 1, 2, 3 for each (system, dialogue).
DESIGN = {
    ("VIKDF", 0): [(5, 4, 5), (5, 4, 4), (4, 4, 5)],
    ("VIKDF", 1): [(4, 3, 5), (4, 3, 5), (4, 2, 5)],
    ("Llama-2", 0): [(2, 2, 4), (3, 2, 4), (2, 3, 4)],
    ("Llama-2", 1): [(3, 3, 5), (3, 2, 4), (3, 3, 4)],
}
# Means over the six ratings of each system, e.g. VIKDF relevance (5+5+4+4+4+4)/6.
EXPECTED_MEANS = {
    "VIKDF": {"relevance": 26 / 6, "informativeness": 20 / 6, "fluency": 29 / 6},
    "Llama-2": {"relevance": 16 / 6, "informativeness": 15 / 6, "fluency": 25 / 6},
}
# Fleiss' κ = (P̄ - P̄e) / (1 - P̄e), worked by hand from DESIGN (3 raters, categories 1-5):
# VIKDF, 6 subjects (2 dialogues × 3 criteria): P̄ = 2/3, P̄e = 59/162 → κ = 49/103.
# Llama-2: P̄ = 5/9, P̄e = 25/81 → κ = 5/14.
# Per criterion, 4 subjects (the responses): relevance P̄ = 2/3, P̄e = 5/18 → 7/13; informativeness P̄ = 1/2,
# P̄e = 25/72 → 11/47; fluency P̄ = 2/3, P̄e = 1/2 → 1/3.
EXPECTED_KAPPA = {"VIKDF": 49 / 103, "Llama-2": 5 / 14}
EXPECTED_KAPPA_PER_CRITERION = {"relevance": 7 / 13, "informativeness": 11 / 47, "fluency": 1 / 3}


def write_predictions(directory: Path) -> list[str]:
    """One predictions.jsonl per system, as eval_dialogue.py writes them."""
    paths = []
    for system in SYSTEMS:
        path = directory / system / "predictions.jsonl"
        path.parent.mkdir(parents=True)
        with open(path, "w", encoding="utf-8") as f:
            for index, context in enumerate(CONTEXTS):
                record = {"context": context, "reference": f"reference {index}", "hypothesis": RESPONSES[system, index]}
                f.write(json.dumps(record) + "\n")
        paths.append(str(path))
    return paths


def design_scores(response: str, annotator: int) -> dict[str, int]:
    """The DESIGN ratings of annotator `annotator` (1-based) for the item showing `response`."""
    (key,) = [key for key, text in RESPONSES.items() if text == response]
    relevance, informativeness, fluency = DESIGN[key][annotator - 1]
    return {"relevance": relevance, "informativeness": informativeness, "fluency": fluency}


def assignments(db: Path, token: str) -> list[tuple[str, str, str]]:
    """(item id, response text, system) of an annotator's items, in the order they are shown."""
    connection = connect(db)
    rows = connection.execute(
        "SELECT a.item, s.text, y.name FROM assignments a JOIN annotators n ON n.id = a.annotator_id "
        "JOIN responses s ON s.id = a.response_id JOIN systems y ON y.id = s.system_id "
        "WHERE n.token = ? ORDER BY a.position", (token,)
    ).fetchall()
    connection.close()
    return [tuple(row) for row in rows]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(app) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free 127.0.0.1 port; yields its base URL and stops it after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server stopped while starting")
            threading.Event().wait(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
