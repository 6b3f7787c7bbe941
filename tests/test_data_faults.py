"""Faults in the user's data files (issue 22, items 7 and 10): a shard cut short is counted, a stray carriage return
never splits a dialogue, and a brace typo, a COCO record without `image_id`, non-UTF-8 bytes or broken JSON are
errors naming the flag, file and line or record, raised before any model is loaded."""

import json
import logging
import tarfile

import pytest

from test_pairs_data import _image_bytes, _write_tar
from vikdf.checks import load_checkpoint_config
from vikdf.data.dialogue import Dialogue, load_dialogues
from vikdf.data.pairs import build_pair_dataset
from vikdf.evaluation.dialogues import load_metrics_json
from vikdf.web.human_eval.study import read_predictions


def test_shard_cut_at_a_block_boundary_is_counted_as_skipped_with_its_name(tmp_path, caplog):
    shard = tmp_path / "00000.tar"
    members = []
    for key in ("a", "b", "c"):
        members += [(f"{key}.jpg", _image_bytes("JPEG", 60)), (f"{key}.txt", f"picture {key}".encode())]
    _write_tar(shard, members)
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[4].offset  # where sample "c" starts: a 512-byte block boundary, as a cut copy ends
    shard.write_bytes(shard.read_bytes()[:cut])
    dataset = build_pair_dataset(f"wds:{shard}", infinite=False, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        keys = [example["key"] for example in dataset]
    assert keys == ["a"]  # "b" was the sample being read when the shard ended: it may lack members, so it goes too
    assert dataset.skips.counts["unreadable_shard"] == 1
    assert any("00000.tar" in r.getMessage() and "end-of-archive" in r.getMessage() for r in caplog.records)


def test_lone_carriage_return_in_a_tsv_line_is_an_error_naming_the_line_not_a_record_break(tmp_path):
    path = tmp_path / "reddit.tsv"
    path.write_bytes(b"hi\tthere\r\na\tb\rc\td\n")  # a CRLF ending is fine; the lone \r of line 2 is not
    with pytest.raises(ValueError, match=r"reddit.tsv: line 2 \(record 1\): a carriage return") as error:
        load_dialogues(path)
    assert "tab" not in str(error.value)
    assert load_dialogues(path, skip_bad=True) == [Dialogue(("hi",), "there")]


def test_non_utf8_tsv_names_file_line_and_column(tmp_path):
    path = tmp_path / "reddit.tsv"
    path.write_bytes(b"a\tb\nc\t\xe9t\xe9\n")
    with pytest.raises(ValueError, match=r"reddit.tsv: line 2, column 3: byte 0xe9 is not UTF-8"):
        load_dialogues(path)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'[{"context": ["caf\xe9"], "response": "x"}]', r"line 1, column 19: byte 0xe9 is not UTF-8"),
        (b'[{"context": ["a"],\n "response": "b"}, {"cont', r"line 2, column 21: .*\(Unterminated string\).*cut short"),
    ],
    ids=["latin1", "truncated"],
)
def test_undecodable_or_truncated_dialogue_json_names_file_and_line(tmp_path, content, problem):
    path = tmp_path / "train.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"train.json: .*{problem}"):
        load_dialogues(path)


def test_dialogue_json_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"context": ["a"], "response": "b"}]).encode())
    assert load_dialogues(path) == [Dialogue(("a",), "b")]


def test_brace_typo_in_train_sources_names_the_flag_and_pattern(tmp_path):
    with pytest.raises(ValueError, match=r"--train_sources: Shard pattern '.*/\{00000\.\.00003\.tar' has unbalanced"):
        build_pair_dataset(f"wds:{tmp_path}/{{00000..00003.tar")


def _coco(tmp_path, annotations: bytes):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.json").write_bytes(annotations)
    return f"coco:{tmp_path}/captions.json:{tmp_path}/images"


def test_coco_record_without_image_id_names_file_and_record(tmp_path):
    captions = {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"id": 7, "image_id": 1}, {"id": 8}]}
    spec = _coco(tmp_path, json.dumps(captions).encode())
    with pytest.raises(ValueError, match=r"--train_sources: .*captions.json'?: annotations record 1 .* lacks image_id"):
        build_pair_dataset(spec)


@pytest.mark.parametrize(
    "content, problem",
    [(b'{"annotations": [{"caption": "caf\xe9"}]}', "byte 0xe9 is not UTF-8"), (b'{"images": [', "cut short")],
    ids=["latin1", "truncated"],
)
def test_undecodable_or_truncated_coco_json_names_the_file(tmp_path, content, problem):
    with pytest.raises(ValueError, match=rf"captions.json: line 1, column \d+: .*{problem}"):
        build_pair_dataset(_coco(tmp_path, content))


@pytest.mark.parametrize(
    "content, problem",
    [(b'{"model_type": "vikdf", "name": "caf\xe9"}', "byte 0xe9 is not UTF-8"), (b'{"model_type": "vi', "cut short")],
    ids=["latin1", "truncated"],
)
def test_broken_checkpoint_config_json_names_the_file_and_line(tmp_path, content, problem):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"--model_name_or_path .*config.json: line 1, column \d+: .*{problem}"):
        load_checkpoint_config(str(tmp_path))


def test_non_utf8_predictions_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    record = {"context": ["hi"], "reference": "yo", "hypothesis": "hey"}
    path.write_bytes(json.dumps(record).encode() + b'\n{"context": ["caf\xe9"]}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl: line 2, column 18: byte 0xe9 is not UTF-8"):
        read_predictions(path)


@pytest.mark.parametrize(
    "content, problem",
    [(b'{"bleu1": 0.1, "n": "\xff"}', "byte 0xff is not UTF-8"), (b'{"bleu1": 0.1, ', "cut short")],
    ids=["binary", "truncated"],
)
def test_undecodable_or_truncated_metrics_json_names_the_file(tmp_path, content, problem):
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"metrics.json: line 1, column \d+: .*{problem}"):
        load_metrics_json(path)
