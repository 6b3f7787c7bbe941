"""The human-evaluation report (paper §5.2, Table 2): per system the mean of each criterion over all ratings, and
Fleiss' κ of the annotators' agreement, computed by `statsmodels.stats.inter_rater`.

Fleiss' κ needs every subject rated by the same number of raters, so it is computed over the responses that
every annotator of the study has rated (the report says how many). Two κ are given:

- per system (Table 2's "Kappa" column): the subjects are that system's (response, criterion) pairs;
- per criterion: the subjects are every system's responses, rated on that criterion.

Categories are the five points of the scale. κ is undefined ("–") when there are no complete subjects or when
every rating falls in one category (chance agreement 1).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from vikdf.web.human_eval.study import CRITERIA, CRITERION_KEYS, SCALE, open_study

CSV_COLUMNS = ("annotator", "system", "dialogue", "position", *CRITERION_KEYS, "rated_at", "context", "response")
# Spreadsheet programs take a cell that begins with one of these as a formula, and run it when ratings.csv is
# opened; the texts come from models, datasets and the command line, so such a cell gets a leading apostrophe,
# which those programs read as "text" and do not show.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def fleiss(ratings: np.ndarray) -> float | None:
    """Fleiss' κ of a (subjects × raters) array of ratings on the 1-5 scale; None when undefined."""
    ratings = np.asarray(ratings, dtype=int)
    if ratings.ndim != 2 or ratings.shape[0] == 0 or ratings.shape[1] < 2:
        return None
    if ratings.min() < SCALE[0] or ratings.max() > SCALE[-1]:
        raise ValueError(f"Ratings must lie in {SCALE[0]}-{SCALE[-1]}, got {ratings.min()}-{ratings.max()}.")
    counts, _ = aggregate_raters(ratings - SCALE[0], n_cat=len(SCALE))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = fleiss_kappa(counts, method="fleiss")
    return float(kappa) if math.isfinite(kappa) else None


def load_ratings(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every stored rating with its annotator number, system, dialogue (index in the predictions) and texts."""
    rows = connection.execute(
        "SELECT a.annotator_id AS annotator, y.name AS system, d.source_index AS dialogue, a.position, "
        "r.relevance, r.informativeness, r.fluency, r.rated_at, d.context, s.text AS response, s.id AS response_id "
        "FROM ratings r JOIN assignments a ON a.id = r.assignment_id JOIN responses s ON s.id = a.response_id "
        "JOIN systems y ON y.id = s.system_id JOIN dialogues d ON d.id = s.dialogue_id "
        "ORDER BY a.annotator_id, a.position"
    ).fetchall()
    return [{**dict(row), "context": json.loads(row["context"])} for row in rows]


def summarise(ratings: Sequence[Mapping[str, Any]], systems: Sequence[str], annotators: Sequence[int]) -> dict[str, Any]:
    """Means per system and criterion, and Fleiss' κ per system and per criterion (see the module docstring)."""
    by_response: dict[int, dict[int, Mapping[str, Any]]] = {}
    for row in ratings:
        by_response.setdefault(row["response_id"], {})[row["annotator"]] = row
    complete = {rid: raters for rid, raters in by_response.items() if all(a in raters for a in annotators)}

    def matrix(response_ids: Sequence[int], keys: Sequence[str]) -> np.ndarray:
        return np.array([[complete[rid][a][key] for a in annotators] for rid in response_ids for key in keys]).reshape(
            -1, len(annotators)
        )

    rows = []
    for system in systems:
        mine = [row for row in ratings if row["system"] == system]
        complete_ids = sorted(rid for rid, raters in complete.items() if next(iter(raters.values()))["system"] == system)
        rows.append({
            "system": system,
            "ratings": len(mine),
            **{key: (float(np.mean([row[key] for row in mine])) if mine else None) for key in CRITERION_KEYS},
            "kappa": fleiss(matrix(complete_ids, CRITERION_KEYS)),
            "kappa_responses": len(complete_ids),
        })
    all_ids = sorted(complete)
    return {
        "systems": rows,
        "kappa_per_criterion": {key: fleiss(matrix(all_ids, (key,))) for key in CRITERION_KEYS},
        "complete_responses": len(all_ids),
        "annotators": len(annotators),
        "ratings": len(ratings),
    }


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _markdown_text(text: str) -> str:
    """`text` inside one table cell: an unescaped `|` would end the cell and a line break the row."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())


def _spreadsheet_text(value: Any) -> Any:
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def report_markdown(summary: Mapping[str, Any]) -> str:
    """Table 2 (means and κ per system), then κ per criterion."""
    titles = [title for _, title, _ in CRITERIA]
    lines = ["| Methods | " + " | ".join(titles) + " | Kappa |", "|" + " --- |" * (len(titles) + 2)]
    for row in summary["systems"]:
        cells = [_cell(row[key], 2) for key in CRITERION_KEYS]
        lines.append(f"| {_markdown_text(row['system'])} | " + " | ".join(cells) + f" | {_cell(row['kappa'], 2)} |")
    lines += [
        "",
        f"Fleiss' κ per criterion, over the {summary['complete_responses']} responses rated by all "
        f"{summary['annotators']} annotators ({summary['ratings']} ratings in all):",
        "",
        "| " + " | ".join(titles) + " |",
        "|" + " --- |" * len(titles),
        "| " + " | ".join(_cell(summary["kappa_per_criterion"][key], 2) for key in CRITERION_KEYS) + " |",
    ]
    return "\n".join(lines) + "\n"


def write_ratings_csv(path: str | os.PathLike, ratings: Sequence[Mapping[str, Any]]) -> None:
    """The raw ratings, one row each (annotators by number: their tokens are login secrets); a text that a
    spreadsheet would run as a formula starts with an apostrophe."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in ratings:
            cells = {**row, "context": "\n".join(row["context"])}
            writer.writerow({key: _spreadsheet_text(value) for key, value in cells.items()})


def build_report(db_path: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Write human_eval.md, human_eval.json and ratings.csv into `output_dir`; return the summary."""
    connection = open_study(db_path)
    try:
        systems = [row["name"] for row in connection.execute("SELECT name FROM systems ORDER BY id")]
        annotators = [row["id"] for row in connection.execute("SELECT id FROM annotators ORDER BY id")]
        ratings = load_ratings(connection)
    finally:
        connection.close()
    summary = summarise(ratings, systems, annotators)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "human_eval.md").write_text(report_markdown(summary), encoding="utf-8")
    (out / "human_eval.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_ratings_csv(out / "ratings.csv", ratings)
    return summary


__all__ = ["CSV_COLUMNS", "fleiss", "load_ratings", "summarise", "report_markdown", "write_ratings_csv", "build_report"]
