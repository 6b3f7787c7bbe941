"""Readers for the dialogue corpora of the paper (§4.1) in the forms they are distributed in.

- Reddit Conversation, JSON: a list of ``{"context": [str, ...], "response": str}``.
- Reddit Conversation, text: one dialogue per line, turns separated by tabs, the last turn is the response.
- Image-Chat (ParlAI ``image_chat/{train,valid,test}.json``): a list of
  ``{"image_hash": ..., "dialog": [[style, text], ...]}``; context = every turn but the last, response = the
  last, all lowercased; styles and images are not used (zero-resource setting).

:func:`load_dialogues` is the entry point; it also takes the training-set fraction of the paper's
low-resource experiments (1, 1/4, 1/8 and 0 = no training), the rule of the released Reddit reader, which
*drops* every dialogue whose context does not have 2 or 3 turns (``context_turns=(2, 3)``), and an optional
truncation to the last N context turns, which the release does not do.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging

from vikdf.data.files import decode_utf8, read_json

logger = logging.get_logger(__name__)

FORMATS = ("reddit_json", "reddit_tsv", "image_chat")
# How a training fraction picks its dialogues: a seeded random subset, or the file's first ones (the release).
SUBSETS = ("random", "first")

_FIX_HINT = "Fix or remove this record, or skip bad records with --skip_bad_records (skip_bad=True in Python)."


@dataclass(frozen=True)
class Dialogue:
    """One example: the context turns, oldest first, and the response to generate."""

    context: tuple[str, ...]
    response: str


class _BadRecord(Exception):
    """What is wrong with one record; turned into a ValueError with the file and position by the caller."""


def _turn(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _BadRecord(f"{what} is {type(value).__name__}, not a string")
    text = value.strip()
    if not text:
        raise _BadRecord(f"{what} is empty")
    return text


def _dialogue(context: list[Any], response: Any, lowercase: bool = False) -> Dialogue:
    if not context:
        raise _BadRecord("the context has no turns")
    turns = tuple(_turn(t, f"context turn {j}") for j, t in enumerate(context))
    reply = _turn(response, "the response")
    if lowercase:
        turns, reply = tuple(t.lower() for t in turns), reply.lower()
    return Dialogue(context=turns, response=reply)


def _reddit_record(record: Any) -> Dialogue:
    if not isinstance(record, dict):
        raise _BadRecord(f"the record is {type(record).__name__}, not an object")
    for field in ("context", "response"):
        if field not in record:
            raise _BadRecord(f'the field "{field}" is missing')
    if not isinstance(record["context"], list):
        raise _BadRecord(f'"context" is {type(record["context"]).__name__}, not a list of strings')
    return _dialogue(record["context"], record["response"])


def _image_chat_record(record: Any) -> Dialogue:
    if not isinstance(record, dict):
        raise _BadRecord(f"the record is {type(record).__name__}, not an object")
    if "dialog" not in record:
        raise _BadRecord('the field "dialog" is missing')
    dialog = record["dialog"]
    if not isinstance(dialog, list):
        raise _BadRecord(f'"dialog" is {type(dialog).__name__}, not a list of [style, text] pairs')
    texts = []
    for j, turn in enumerate(dialog):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise _BadRecord(f"dialog turn {j} is not a [style, text] pair")
        texts.append(turn[1])
    if not texts:
        raise _BadRecord('"dialog" has no turns')
    return _dialogue(texts[:-1], texts[-1], lowercase=True)


def _read_json(path: str) -> list[Any]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of dialogues, found {type(data).__name__}.")
    return data


def _detect_json_format(path: str, records: list[Any]) -> str:
    if not records:
        raise ValueError(f"{path}: the JSON list is empty; the file holds no dialogues.")
    for record in records:
        if isinstance(record, dict):
            if "dialog" in record:
                return "image_chat"
            if "context" in record or "response" in record:
                return "reddit_json"
    raise ValueError(
        f"{path}: cannot tell the dialogue format (no record has a \"dialog\" or \"context\"/\"response\" "
        f"field); pass format= one of {FORMATS}."
    )


def _json_records(path: str, records: list[Any], fmt: str) -> Iterator[tuple[str, Dialogue | _BadRecord]]:
    parse = _image_chat_record if fmt == "image_chat" else _reddit_record
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        try:
            yield where, parse(record)
        except _BadRecord as bad:
            yield where, bad


def _tsv_records(path: str) -> Iterator[tuple[str, Dialogue | _BadRecord]]:
    # Binary, so that only "\n" ends a record: text mode would also break a line at a lone "\r" (universal
    # newlines) and silently make two dialogues of one.
    with open(path, "rb") as f:
        index = 0
        for line_number, raw in enumerate(f, start=1):
            line = decode_utf8(raw.removesuffix(b"\n").removesuffix(b"\r"), path, line_number)
            if not line.strip():
                continue  # blank lines (e.g. at the end of the file) are not records
            where = f"{path}: line {line_number} (record {index})"
            index += 1
            turns, stray = line.split("\t"), line.find("\r")
            try:
                if stray >= 0:
                    raise _BadRecord(
                        f"a carriage return (\\r) at column {stray + 1} inside the line, where a turn cannot break; "
                        "replace it by a space (a file with \\r line endings: convert them to \\n)"
                    )
                if len(turns) < 2:
                    raise _BadRecord("expected at least two tab-separated turns (context and response)")
                yield where, _dialogue(turns[:-1], turns[-1])
            except _BadRecord as bad:
                yield where, bad


def parse_turn_counts(text: str) -> tuple[int, ...]:
    """``"2,3"`` → ``(2, 3)``: the context sizes a ``--context_turns`` flag keeps."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"--context_turns {text!r}: give comma-separated numbers of turns, e.g. 2,3.") from err
    if not counts or min(counts) < 1:
        raise ValueError(f"--context_turns {text!r}: give comma-separated positive numbers of turns, e.g. 2,3.")
    return counts


def _subset(dialogues: list[Dialogue], fraction: float, seed: int, subset: str = "random") -> list[Dialogue]:
    """About ``fraction`` of the dialogues, kept in file order.

    ``"random"``: the indices come from one seeded permutation, so with the same seed the 1/8 subset lies inside the
    1/4 subset. ``"first"``: the first ``floor(fraction × N)`` dialogues, as the release selects them. A positive
    fraction keeps at least one dialogue.
    """
    if fraction >= 1.0:
        return dialogues
    if subset == "first":
        return dialogues[: max(1, math.floor(fraction * len(dialogues)))]
    keep = max(1, round(fraction * len(dialogues))) if dialogues else 0
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    return [dialogues[i] for i in sorted(order[:keep])]


def load_dialogues(
    path: str | os.PathLike,
    format: str = "auto",
    fraction: float = 1.0,
    max_context_turns: int | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    context_turns: Collection[int] | None = None,
    subset: str = "random",
) -> list[Dialogue]:
    """Read a dialogue file into a list of :class:`Dialogue`.

    Args:
        path: a Reddit Conversation ``.json`` or ``.tsv``/``.txt`` file, or an Image-Chat ``.json`` file.
        format: ``"auto"`` (from the extension, and for JSON from the record fields) or one of
            ``"reddit_json"``, ``"reddit_tsv"``, ``"image_chat"``.
        fraction: share of the dialogues to keep, in [0, 1] (paper: 1, 1/4, 1/8; 0 = no training data,
            which returns an empty list); the subset is fixed by ``seed``.
        max_context_turns: keep only the last N context turns of every dialogue; ``None`` keeps all. The
            release truncates nothing (see ``context_turns``).
        context_turns: keep only dialogues whose context has one of these numbers of turns, dropping (and
            counting in the log) the others, before ``fraction`` is drawn; the released Reddit reader keeps
            ``(2, 3)``. ``None`` keeps every dialogue.
        skip_bad: skip malformed records (missing field, non-string turn, empty context or response) and log
            how many were skipped, instead of raising ``ValueError``.
        seed: seed of the subset drawn for ``fraction`` < 1.
        subset: ``"random"`` (a seeded nested subset) or ``"first"`` (the file's first dialogues, as released).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"Dialogue file {path!r} is a folder; give the .json or .tsv file inside it.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Dialogue file not found: {path!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1] (the paper uses 1, 1/4, 1/8, 0), got {fraction}.")
    if max_context_turns is not None and max_context_turns < 1:
        raise ValueError(f"max_context_turns must be a positive number of turns or None, not {max_context_turns}.")
    if context_turns is not None and (not context_turns or min(context_turns) < 1):
        raise ValueError(f"context_turns must be positive numbers of turns, e.g. (2, 3), not {context_turns}.")
    if subset not in SUBSETS:
        raise ValueError(f"Unknown subset rule {subset!r}; use one of {SUBSETS}.")
    if format not in ("auto", *FORMATS):
        raise ValueError(f"Unknown dialogue format {format!r}; use 'auto' or one of {FORMATS}.")
    if fraction == 0.0:
        return []  # zero-resource: no task data at all

    extension = os.path.splitext(path)[1].lower()
    if format == "auto" and extension not in (".json", ".tsv", ".txt"):
        raise ValueError(
            f"{path}: cannot tell the dialogue format from the extension {extension!r}; "
            f"pass format= one of {FORMATS}."
        )
    if format == "reddit_tsv" or (format == "auto" and extension != ".json"):
        records = _tsv_records(path)
    else:
        data = _read_json(path)
        records = _json_records(path, data, _detect_json_format(path, data) if format == "auto" else format)

    dialogues: list[Dialogue] = []
    skipped = dropped = 0
    for where, item in records:
        if isinstance(item, _BadRecord):
            if not skip_bad:
                raise ValueError(f"{where}: {item}. {_FIX_HINT}")
            skipped += 1
            continue
        if context_turns is not None and len(item.context) not in context_turns:
            dropped += 1
            continue
        if max_context_turns is not None:
            item = Dialogue(context=item.context[-max_context_turns:], response=item.response)
        dialogues.append(item)
    if skipped:
        logger.warning(f"Skipped {skipped} bad record(s) in {path}; {len(dialogues)} dialogue(s) kept.")
    if context_turns is not None:
        logger.info(
            f"Dropped {dropped} dialogue(s) of {path} whose context has a number of turns outside "
            f"{sorted(context_turns)} (the released Reddit reader's rule); {len(dialogues)} kept."
        )
    return _subset(dialogues, fraction, seed, subset)
