"""Metric conventions of the released evaluation that are easy to get silently wrong (issue 22): the embedding
metrics' second tokenisation, the English Punkt model without NLTK's data, and GloVe files that cannot give a
number (non-finite values, no test word known)."""

import json
import math
import re

import pytest

import eval_dialogue
import vikdf.checks
import vikdf.evaluation.dialogues
from vikdf.evaluation import dialogue_metrics as dm
from vikdf.evaluation.dialogues import metrics_markdown, score_responses, write_evaluation
from vikdf.testing import tiny_vikdf_config


def _glove(tmp_path, text, name="glove.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_embedding_metrics_tokenise_again_like_nlg_eval_so_a_closing_quote_becomes_an_opening_one(tmp_path):
    # BLEU sees the released text, where word_tokenize turned '"no"' into `` no ''. nlg-eval's eval_emb_metrics
    # runs word_tokenize again on that string, and Treebank reads the '' after a space as an opening quote.
    assert dm.tokenize('"no"') == "`` no ''"
    glove = _glove(tmp_path, "`` 1 0\n'' 0 1\nno 0 0\n")
    result = dm.compute_dialogue_metrics(['"no"', "``"], ["``", '"no"'], glove_path=glove)
    # `` no `` against ``: sums (2, 0) and (1, 0), extrema (1, 0) and (1, 0) -> cosine 1 for both;
    # greedy: `` and `` match (1), "no" is a zero vector (0): (2/3 + 1) / 2. Splitting on spaces gives 70.71,
    # 70.71 and 66.67 instead.
    assert result["embedding_average"] == pytest.approx(100.0)
    assert result["vector_extrema"] == pytest.approx(100.0)
    assert result["greedy_matching"] == pytest.approx(100 * 5 / 6)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("we met in the u.s. last year", ["we", "met", "in", "the", "u.s.", "last", "year"]),
        ("at 5 p.m. we ate", ["at", "5", "p.m.", "we", "ate"]),
        ("at 9 a.m. sharp", ["at", "9", "a.m.", "sharp"]),
        ("back to the u.k. soon", ["back", "to", "the", "u.k.", "soon"]),
        ("she has a ph.d. in math", ["she", "has", "a", "ph.d.", "in", "math"]),
        # Learnt by Punkt from its training corpus rather than written down anywhere:
        ("ok. see you", ["ok.", "see", "you"]),
        ("he is ill. with a cold", ["he", "is", "ill.", "with", "a", "cold"]),
        ("see you wed. then", ["see", "you", "wed.", "then"]),
    ],
)
def test_fallback_tokeniser_keeps_the_abbreviations_of_the_english_punkt_model(text, tokens):
    assert dm.fallback_word_tokenize(text) == tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("e.g. cake", ["e.g", ".", "cake"]), ("i.e. a pie", ["i.e", ".", "a", "pie"])],
)
def test_fallback_tokeniser_splits_e_g_and_i_e_as_the_english_punkt_model_does(text, tokens):
    assert dm.fallback_word_tokenize(text) == tokens


@pytest.mark.parametrize(("value", "shown"), [("nan", "nan"), ("-NaN", "nan"), ("1e39", "1e+39"), ("inf", "inf")])
def test_glove_file_with_nan_or_overflowing_value_is_refused_naming_the_line(tmp_path, value, shown):
    # Line 2 is blank: the message counts lines of the file, not entries.
    glove = _glove(tmp_path, f"cat 1 0\n\ndog 0 {value}\nbig 2 2\n", name="bad.txt")
    with pytest.raises(ValueError, match=rf"bad\.txt, line 3 \('dog'\): {re.escape(shown)} is not a finite float32"):
        dm.load_glove(glove)


def test_glove_values_near_the_float32_limit_give_finite_metrics(tmp_path):
    # Squares of 1e30 overflow float32, which turned cosines into NaN; every finite float32 must be usable.
    glove = _glove(tmp_path, "cat 1e30 0\ndog 3e38 3e38\nbig -2e37 1\n")
    result = dm.compute_dialogue_metrics(["cat dog dog"], ["big dog"], glove_path=glove)
    for name in ("embedding_average", "vector_extrema", "greedy_matching"):
        assert math.isfinite(result[name]) and result[name] != 0.0, name


def test_eval_dialogue_refuses_a_nan_glove_file_before_loading_the_model(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the GloVe file was checked")

    monkeypatch.setattr(vikdf.checks, "load_checkpoint_config", lambda path: tiny_vikdf_config())
    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", refuse)
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps([{"context": ["hi"], "response": "yo"}]))
    glove = _glove(tmp_path, "the 0.1 0.2\ndog nan 0.5\n", name="nan.txt")
    argv = ["--model_name_or_path", str(tmp_path / "ckpt"), "--test_file", str(test_file),
            "--output_dir", str(tmp_path / "eval"), "--glove_path", str(glove)]
    with pytest.raises(ValueError, match=r"--glove_path: .*nan\.txt, line 2 \('dog'\): nan"):
        eval_dialogue.main(argv)


def test_no_test_word_in_the_glove_vocabulary_reports_missing_not_a_number(tmp_path):
    # Every word would take the file's mean vector, so every pair would look identical: no evidence at all.
    glove = _glove(tmp_path, "cat 1 0\ndog 0 1\n")
    result = score_responses([["hi"], ["yo"]], ["hello there", "general kenobi"], ["hi !", "yes"], {}, glove)
    for name in ("embedding_average", "vector_extrema", "greedy_matching"):
        assert result["metrics"][name] is None, name
    out = write_evaluation(tmp_path / "eval", result)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedding_average"] is None and metrics["greedy_matching"] is None
    row = metrics_markdown(result["metrics"]).splitlines()[-1].split(" | ")
    assert row[3:6] == ["–", "–", "–"]  # Average, Extrema, Greedy after PPL, BLEU-1, ROUGE-L
