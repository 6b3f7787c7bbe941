"""A human-evaluation study in SQLite (paper §4.4 / §5.2, Table 2): its dialogues, blinded responses, annotators,
their per-annotator item order and their ratings.

The paper samples 100 Image-Chat test dialogues and three evaluators rate every system's response to each from 1
to 5 for Relevance, Informativeness and Fluency. Here every system gets the same sampled dialogues; an annotator
sees one response per screen, never the system's name, and the systems' order within each dialogue is drawn
afresh for every (dialogue, annotator). The item id a page posts back is a random token of that annotator's
assignment, so it names neither the system nor another annotator's item.

The database is in WAL mode with synchronous=FULL and each rating is committed before the reply, so a rating the
server has answered survives the server being killed; one row per (annotator, item) makes a second submission
replace the first and keeps two annotators' ratings apart.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from vikdf.data.files import decode_utf8

# (column, title, question): the paper's criteria and questions (§4.4), each rated 1-5.
CRITERIA: tuple[tuple[str, str, str], ...] = (
    ("relevance", "Relevance", "How relevant and related is the generated response to the given context and image?"),
    ("informativeness", "Informativeness",
     "How much new and useful information does the generated response provide in the context of the dialogue?"),
    ("fluency", "Fluency", "How natural, readable, and grammatically correct is the generated response?"),
)
CRITERION_KEYS = tuple(key for key, _, _ in CRITERIA)
SCALE = (1, 2, 3, 4, 5)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE systems (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, predictions TEXT NOT NULL);
CREATE TABLE dialogues (
    id INTEGER PRIMARY KEY, source_index INTEGER NOT NULL UNIQUE, context TEXT NOT NULL, reference TEXT NOT NULL
);
CREATE TABLE responses (
    id INTEGER PRIMARY KEY,
    dialogue_id INTEGER NOT NULL REFERENCES dialogues(id),
    system_id INTEGER NOT NULL REFERENCES systems(id),
    text TEXT NOT NULL,
    UNIQUE (dialogue_id, system_id)
);
CREATE TABLE annotators (id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE);
CREATE TABLE assignments (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL UNIQUE,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    response_id INTEGER NOT NULL REFERENCES responses(id),
    position INTEGER NOT NULL,
    UNIQUE (annotator_id, position),
    UNIQUE (annotator_id, response_id)
);
CREATE TABLE ratings (
    assignment_id INTEGER PRIMARY KEY REFERENCES assignments(id),
    relevance INTEGER NOT NULL CHECK (relevance BETWEEN 1 AND 5),
    informativeness INTEGER NOT NULL CHECK (informativeness BETWEEN 1 AND 5),
    fluency INTEGER NOT NULL CHECK (fluency BETWEEN 1 AND 5),
    rated_at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Prediction:
    context: list[str]
    reference: str
    hypothesis: str


def connect(db_path: str | os.PathLike) -> sqlite3.Connection:
    """A connection in WAL mode with durable commits; rows read as `sqlite3.Row`."""
    connection = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def open_study(db_path: str | os.PathLike) -> sqlite3.Connection:
    """A connection to an existing study (never creates an empty database by mistake)."""
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"{db_path}: no such study database; make one with `python -m vikdf.web.human_eval create`.")
    return connect(db_path)


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
    """`predictions.jsonl` of `eval_dialogue.py`: one {"context", "reference", "hypothesis"} per line."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                context = record["context"]
                records.append(Prediction(
                    [context] if isinstance(context, str) else [str(turn) for turn in context],
                    str(record["reference"]), str(record["hypothesis"]),
                ))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}, line {number}: not a prediction record with context, reference and hypothesis ({error}); "
                    "use the predictions.jsonl that eval_dialogue.py writes."
                ) from None
    if not records:
        raise ValueError(f"{path}: no predictions.")
    return records


def _check_same_dialogues(paths: Sequence[str], runs: Sequence[list[Prediction]]) -> None:
    first = runs[0]
    for path, run in zip(paths[1:], runs[1:]):
        if len(run) != len(first):
            raise ValueError(f"{path} has {len(run)} predictions but {paths[0]} has {len(first)}; evaluate every "
                             "system on the same test file.")
        for index, (a, b) in enumerate(zip(first, run)):
            if (a.context, a.reference) != (b.context, b.reference):
                raise ValueError(f"{path}, line {index + 1}: another dialogue than line {index + 1} of {paths[0]}; "
                                 "every system must be evaluated on the same test dialogues in the same order.")


def login_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/a/{token}"


def create_study(
    db_path: str | os.PathLike,
    predictions: Sequence[str],
    systems: Sequence[str],
    sample: int = 100,
    seed: int = 0,
    annotators: int = 3,
) -> list[str]:
    """Write a new study database and return one random login token per annotator.

    `sample` dialogues are drawn with `seed` from the dialogues all prediction files share; each annotator rates
    every system's response to each of them.
    """
    if len(predictions) != len(systems):
        raise ValueError(f"{len(predictions)} prediction files but {len(systems)} system names; give one name each.")
    if len(set(systems)) != len(systems) or not all(name.strip() for name in systems):
        raise ValueError(f"System names must be distinct and non-empty, got {list(systems)}.")
    if annotators < 1:
        raise ValueError(f"--annotators must be at least 1, got {annotators}.")
    if Path(db_path).exists():
        raise FileExistsError(f"{db_path} exists; a study is never overwritten. Choose another --db or remove it.")
    if not Path(db_path).parent.is_dir():
        raise FileNotFoundError(f"--db {db_path}: the folder {Path(db_path).parent} does not exist; create it first "
                                "or choose another --db.")
    runs = [read_predictions(path) for path in predictions]
    _check_same_dialogues(predictions, runs)
    if not 1 <= sample <= len(runs[0]):
        raise ValueError(f"--sample {sample}: choose between 1 and the {len(runs[0])} dialogues in {predictions[0]}.")

    rng = random.Random(seed)
    chosen = rng.sample(range(len(runs[0])), sample)
    tokens = [secrets.token_urlsafe(16) for _ in range(annotators)]
    connection = connect(db_path)
    try:
        with connection:
            # One transaction: a study is written whole or not at all.
            connection.execute("BEGIN")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            meta = {"sample": sample, "seed": seed, "annotators": annotators, "created": created}
            connection.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            system_ids = [
                connection.execute("INSERT INTO systems (name, predictions) VALUES (?, ?)", (name, str(path))).lastrowid
                for name, path in zip(systems, predictions)
            ]
            responses: list[list[int]] = []
            for index in chosen:
                record = runs[0][index]
                dialogue_id = connection.execute(
                    "INSERT INTO dialogues (source_index, context, reference) VALUES (?, ?, ?)",
                    (index, json.dumps(record.context, ensure_ascii=False), record.reference),
                ).lastrowid
                responses.append([
                    connection.execute(
                        "INSERT INTO responses (dialogue_id, system_id, text) VALUES (?, ?, ?)",
                        (dialogue_id, system_id, run[index].hypothesis),
                    ).lastrowid
                    for system_id, run in zip(system_ids, runs)
                ])
            for token in tokens:
                annotator_id = connection.execute("INSERT INTO annotators (token) VALUES (?)", (token,)).lastrowid
                position = 0
                for dialogue_responses in responses:
                    for response_id in rng.sample(dialogue_responses, len(dialogue_responses)):
                        position += 1
                        connection.execute(
                            "INSERT INTO assignments (item, annotator_id, response_id, position) VALUES (?, ?, ?, ?)",
                            (secrets.token_hex(8), annotator_id, response_id, position),
                        )
    finally:
        connection.close()
    return tokens


# ----------------------------------------------------------------------------------------------------------------
# What the server reads and writes
# ----------------------------------------------------------------------------------------------------------------
def annotator_id(connection: sqlite3.Connection, token: str) -> int | None:
    row = connection.execute("SELECT id FROM annotators WHERE token = ?", (token,)).fetchone()
    return None if row is None else row["id"]


def progress(connection: sqlite3.Connection, annotator: int) -> tuple[int, int]:
    """(items rated, items assigned) of one annotator."""
    row = connection.execute(
        "SELECT COUNT(*) AS total, COUNT(r.assignment_id) AS rated FROM assignments a "
        "LEFT JOIN ratings r ON r.assignment_id = a.id WHERE a.annotator_id = ?",
        (annotator,),
    ).fetchone()
    return row["rated"], row["total"]


def next_position(connection: sqlite3.Connection, annotator: int) -> int | None:
    """The first position the annotator has not rated yet (where they left off), or None when all are rated."""
    row = connection.execute(
        "SELECT MIN(a.position) AS position FROM assignments a LEFT JOIN ratings r ON r.assignment_id = a.id "
        "WHERE a.annotator_id = ? AND r.assignment_id IS NULL",
        (annotator,),
    ).fetchone()
    return row["position"]


def item_at(connection: sqlite3.Connection, annotator: int, position: int) -> sqlite3.Row | None:
    """The item shown at `position`: its id, the dialogue and the response, and the annotator's rating if any."""
    return connection.execute(
        "SELECT a.item, a.position, d.context, s.text AS response, r.relevance, r.informativeness, r.fluency "
        "FROM assignments a JOIN responses s ON s.id = a.response_id JOIN dialogues d ON d.id = s.dialogue_id "
        "LEFT JOIN ratings r ON r.assignment_id = a.id WHERE a.annotator_id = ? AND a.position = ?",
        (annotator, position),
    ).fetchone()


def assignment_of(connection: sqlite3.Connection, annotator: int, item: str) -> int | None:
    """The assignment behind `item` if it belongs to this annotator, else None."""
    row = connection.execute(
        "SELECT id FROM assignments WHERE item = ? AND annotator_id = ?", (item, annotator)
    ).fetchone()
    return None if row is None else row["id"]


def save_rating(connection: sqlite3.Connection, assignment: int, scores: dict[str, int]) -> None:
    """Store (or replace) one rating and commit it before returning."""
    with connection:
        connection.execute(
            "INSERT INTO ratings (assignment_id, relevance, informativeness, fluency, rated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (assignment_id) DO UPDATE SET relevance = excluded.relevance, "
            "informativeness = excluded.informativeness, fluency = excluded.fluency, rated_at = excluded.rated_at",
            (assignment, *(scores[key] for key in CRITERION_KEYS),
             datetime.now(timezone.utc).isoformat(timespec="milliseconds")),
        )


__all__ = [
    "CRITERIA",
    "CRITERION_KEYS",
    "SCALE",
    "Prediction",
    "connect",
    "open_study",
    "read_predictions",
    "login_link",
    "create_study",
    "annotator_id",
    "progress",
    "next_position",
    "item_at",
    "assignment_of",
    "save_rating",
]
