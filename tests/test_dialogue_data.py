"""Dialogue readers on small files written in the real formats."""

import json
import logging

import pytest

from vikdf.data.dialogue import Dialogue, load_dialogues

REDDIT = [
    {"context": ["hi there", "how was the hike?", "Long, but the view was worth it."], "response": "Nice!"},
    {"context": ["got a new puppy"], "response": "what breed?"},
]
IMAGE_CHAT = [
    {
        "image_hash": "2923e28b6f588aff2d469ab2cccfac57",
        "dialog": [["Adventurous", "I Want To Climb That"], ["Cheerful", "Go for it!"], ["Adventurous", "I WILL."]],
    },
    {"image_hash": "9b9a4bd5b3f1f1ebf3f9b0a2f8e8c3d1", "dialog": [["Calm", "A quiet lake."], ["Sad", "So Empty."]]},
]


def _write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_reddit_json(tmp_path):
    dialogues = load_dialogues(_write_json(tmp_path / "train.json", REDDIT))
    assert dialogues == [
        Dialogue(("hi there", "how was the hike?", "Long, but the view was worth it."), "Nice!"),
        Dialogue(("got a new puppy",), "what breed?"),
    ]
    with pytest.raises(AttributeError):
        dialogues[0].response = "changed"  # frozen


def test_reddit_tsv_and_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hi there\thow was the hike?\tgreat\r\n\ngot a new puppy\twhat breed?\n", encoding="utf-8")
    assert load_dialogues(path) == [
        Dialogue(("hi there", "how was the hike?"), "great"),
        Dialogue(("got a new puppy",), "what breed?"),
    ]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("a\tb\n", encoding="utf-8")
    assert load_dialogues(tsv) == [Dialogue(("a",), "b")]


def test_image_chat_lowercased_last_turn_is_response(tmp_path):
    dialogues = load_dialogues(_write_json(tmp_path / "test.json", IMAGE_CHAT))
    assert dialogues == [
        Dialogue(("i want to climb that", "go for it!"), "i will."),
        Dialogue(("a quiet lake.",), "so empty."),
    ]


def test_explicit_format_overrides_detection(tmp_path):
    path = tmp_path / "dialogues.data"
    path.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="dialogues.data.*format="):
        load_dialogues(path)
    assert load_dialogues(path, format="reddit_tsv") == [Dialogue(("a",), "b")]
    unknown = _write_json(tmp_path / "other.json", [{"text": "x"}])
    with pytest.raises(ValueError, match="other.json.*format="):
        load_dialogues(unknown)


def test_max_context_turns_keeps_the_latest(tmp_path):
    dialogues = load_dialogues(_write_json(tmp_path / "train.json", REDDIT), max_context_turns=2)
    assert dialogues[0].context == ("how was the hike?", "Long, but the view was worth it.")
    assert dialogues[1].context == ("got a new puppy",)
    with pytest.raises(ValueError, match="max_context_turns"):
        load_dialogues(tmp_path / "train.json", max_context_turns=0)


def test_context_turns_drops_other_dialogues_as_the_released_reddit_reader(tmp_path, caplog):
    records = [{"context": [f"t{j}" for j in range(turns)], "response": f"r{turns}"} for turns in (1, 2, 3, 4, 2)]
    path = _write_json(tmp_path / "reddit.json", records)
    with caplog.at_level(logging.INFO, logger="vikdf.data.dialogue"):
        kept = load_dialogues(path, context_turns=(2, 3))
    # Dropped, not truncated: the 4-turn context is gone rather than cut to its last 3 turns.
    assert [len(d.context) for d in kept] == [2, 3, 2] and [d.response for d in kept] == ["r2", "r3", "r2"]
    assert "Dropped 2 dialogue(s)" in caplog.text and "reddit.json" in caplog.text and "[2, 3]" in caplog.text
    # The rule applies before the fraction is drawn, as the release selects from the filtered set.
    assert len(load_dialogues(path, context_turns=(2, 3), fraction=1 / 3)) == 1
    assert len(load_dialogues(path)) == 5
    with pytest.raises(ValueError, match="context_turns"):
        load_dialogues(path, context_turns=(0, 2))


def test_fraction_is_a_seeded_nested_subset(tmp_path):
    records = [{"context": [f"turn {i}"], "response": f"reply {i}"} for i in range(64)]
    path = _write_json(tmp_path / "train.json", records)
    full = load_dialogues(path)
    quarter = load_dialogues(path, fraction=1 / 4, seed=3)
    eighth = load_dialogues(path, fraction=1 / 8, seed=3)
    assert len(full) == 64 and len(quarter) == 16 and len(eighth) == 8
    assert set(eighth) <= set(quarter) <= set(full)
    assert quarter == sorted(quarter, key=full.index)  # file order kept
    assert load_dialogues(path, fraction=1 / 4, seed=3) == quarter
    assert load_dialogues(path, fraction=1 / 4, seed=4) != quarter
    assert load_dialogues(path, fraction=0) == []
    assert len(load_dialogues(path, fraction=0.001)) == 1  # a positive fraction keeps something
    with pytest.raises(ValueError, match="fraction"):
        load_dialogues(path, fraction=1.5)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.json"):
        load_dialogues(tmp_path / "no_such_file.json")


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"response": "hi"}, '"context" is missing'),
        ({"context": ["hi"]}, '"response" is missing'),
        ({"context": "hi", "response": "yo"}, "not a list"),
        ({"context": ["hi", 3], "response": "yo"}, "context turn 1 is int"),
        ({"context": [], "response": "yo"}, "no turns"),
        ({"context": ["hi"], "response": "  "}, "response is empty"),
        ({"context": ["hi"], "response": None}, "response is NoneType"),
    ],
)
def test_bad_reddit_json_record(tmp_path, bad, problem):
    path = _write_json(tmp_path / "reddit_bad.json", [REDDIT[0], REDDIT[1], bad])
    with pytest.raises(ValueError) as err:
        load_dialogues(path)
    message = str(err.value)
    assert "reddit_bad.json: record 2:" in message and problem in message and "skip_bad=True" in message


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"image_hash": "x"}, '"dialog" is missing'),
        ({"dialog": [["Calm", "only one turn"]]}, "no turns"),
        ({"dialog": [["Calm", "hi"], ["Sad", 7]]}, "response is int"),
        ({"dialog": [["Calm", "hi"], "no style"]}, "dialog turn 1 is not a [style, text] pair"),
        ({"dialog": [["Calm", ""], ["Sad", "hi"]]}, "context turn 0 is empty"),
    ],
)
def test_bad_image_chat_record(tmp_path, bad, problem):
    path = _write_json(tmp_path / "image_chat_bad.json", [bad] + IMAGE_CHAT)
    with pytest.raises(ValueError) as err:
        load_dialogues(path, format="image_chat")
    message = str(err.value)
    assert "image_chat_bad.json: record 0:" in message and problem in message


def test_bad_tsv_lines_name_line_and_record(tmp_path):
    path = tmp_path / "reddit_bad.tsv"
    path.write_text("a\tb\n\njust one turn\nc\td\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"reddit_bad.tsv: line 3 \(record 1\): expected at least two"):
        load_dialogues(path)
    path.write_text("a\tb\n\t\tresponse\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 \(record 1\): context turn 0 is empty"):
        load_dialogues(path)


def test_skip_bad_counts_and_logs(tmp_path, caplog):
    records = [REDDIT[0], {"context": []}, {"context": ["x"], "response": 1}, REDDIT[1]]
    path = _write_json(tmp_path / "mixed.json", records)
    with caplog.at_level(logging.WARNING, logger="vikdf.data.dialogue"):
        dialogues = load_dialogues(path, skip_bad=True)
    assert [d.response for d in dialogues] == ["Nice!", "what breed?"]
    assert "Skipped 2 bad record(s) in" in caplog.text and "mixed.json" in caplog.text


def test_fraction_can_take_the_files_first_dialogues_as_the_release(tmp_path):
    records = [{"context": [f"turn {i}"], "response": f"reply {i}"} for i in range(30)]
    path = _write_json(tmp_path / "train.json", records)
    full = load_dialogues(path)
    assert load_dialogues(path, fraction=1 / 4, subset="first") == full[:7]  # floor(30 / 4), as the release's len // 4
    assert load_dialogues(path, fraction=1 / 8, subset="first") == full[:3]
    assert load_dialogues(path, fraction=1 / 4, subset="random", seed=0) != full[:7]
    with pytest.raises(ValueError, match="subset rule 'last'"):
        load_dialogues(path, fraction=1 / 4, subset="last")
