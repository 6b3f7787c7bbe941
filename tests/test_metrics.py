"""Dialogue metrics (README, conventions) and run statistics (paper §5.1) against hand-computed values."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vikdf.evaluation import dialogue_metrics as dm
from vikdf.evaluation.dialogue_metrics import compute_dialogue_metrics
from vikdf.evaluation.stats import aggregate_runs, format_markdown_table

METRIC_FILE = Path(dm.__file__).resolve()

# Tokenised (lowercase, Treebank):
#   hyp 1 "the cat sat on the mat ."   (7)   ref 1 "the cat is on the mat ."    (7)
#   hyp 2 "hello !"                    (2)   ref 2 "hello there , friend"      (4)
PREDICTIONS = ["The cat sat on the mat.", "Hello!"]
REFERENCES = ["the cat is on the mat .", "hello there, friend"]


def test_bleu_1_with_brevity_penalty():
    # Clipped unigram matches: pair 1 the×2, cat, on, mat, "." = 6 of 7; pair 2 hello = 1 of 2 -> 7 / 9.
    # Hypothesis length 9, "closest" reference lengths 7 + 4 = 11 > 9 -> BP = exp(1 - 11/9) = exp(-2/9).
    expected = 100 * (7 / 9) * math.exp(1 - 11 / 9)  # = 62.28...
    assert compute_dialogue_metrics(PREDICTIONS, REFERENCES)["bleu_1"] == pytest.approx(expected, rel=1e-6)


def test_rouge_l_beta_1_2():
    # Pair 1: LCS "the cat on the mat ." = 6, P = R = 6/7, so F = 6/7 whatever beta.
    # Pair 2: LCS "hello" = 1, P = 1/2, R = 1/4, F = (1 + 1.2²) P R / (R + 1.2² P) = 0.305 / 0.97.
    pair_2 = (1 + 1.44) * 0.5 * 0.25 / (0.25 + 1.44 * 0.5)
    expected = 100 * (6 / 7 + pair_2) / 2  # = 58.58...
    assert compute_dialogue_metrics(PREDICTIONS, REFERENCES)["rouge_l"] == pytest.approx(expected, rel=1e-9)


def test_distinct_after_normalisation():
    # Lowercase, ASCII punctuation -> space, drop a/an/the (the release's normalize_answer):
    #   "The dog, the DOG!" -> dog dog      "a dog runs" -> dog runs
    #   "An apple's pie"    -> apple s pie  "dog runs."  -> dog runs
    # Unigrams: 9 in all, unique {dog, runs, apple, s, pie} = 5.
    # Bigrams: (dog dog) (dog runs) (apple s) (s pie) (dog runs) = 5, unique 4 -> 80.
    predictions = ["The dog, the DOG!", "a dog runs", "An apple's pie", "dog runs."]
    result = compute_dialogue_metrics(predictions, ["x"] * 4)
    assert result["distinct_1"] == pytest.approx(100 * 5 / 9)
    assert result["distinct_2"] == pytest.approx(80.0)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Don't!", ["don", "t"]),  # punctuation becomes a space, not nothing
        ("the-dog", ["dog"]),  # ... so an article joined by a hyphen is still an article
        ("a_b", ["b"]),  # "_" is ASCII punctuation too
        ("an... apple", ["apple"]),
        ("it\u2019s \u00bfqu\u00e9?", ["it\u2019s", "\u00bfqu\u00e9"]),  # non-ASCII punctuation stays, as released
        ("theatre and anthem", ["theatre", "and", "anthem"]),  # \b: only whole articles go
        ("THE Cat #1", ["cat", "1"]),
    ],
)
def test_distinct_normalisation_is_the_released_one(text, words):
    assert dm.normalize_for_distinct(text) == words


def test_distinct_counts_split_contractions():
    # "don't stop" -> don t stop (3 unigrams, all distinct); "do not stop" -> do not stop.
    # Unigrams {don, t, stop, do, not} = 5 of 6; bigrams (don t) (t stop) (do not) (not stop) = 4 of 4.
    result = compute_dialogue_metrics(["don't stop", "do not stop"], ["x", "x"])
    assert result["distinct_1"] == pytest.approx(100 * 5 / 6)
    assert result["distinct_2"] == pytest.approx(100.0)


# word_tokenize outputs documented by NLTK (nltk/test/tokenize.doctest and the nltk.tokenize docstring), on the
# lowercased strings the metrics tokenise; in lowercased text Punkt's decisions on them are those of the
# capitalised originals (no capital letter is needed for any of these breaks or non-breaks).
DOCUMENTED_WORD_TOKENIZE = [
    (
        "good muffins cost $3.88\nin new york.  please buy me\ntwo of them.\n\nthanks.",
        ["good", "muffins", "cost", "$", "3.88", "in", "new", "york", ".", "please", "buy", "me", "two", "of",
         "them", ".", "thanks", "."],
    ),
    (
        "i called dr. jones. i called dr. jones.",
        ["i", "called", "dr.", "jones", ".", "i", "called", "dr.", "jones", "."],
    ),
    (
        "ich muss unbedingt daran denken, mehl, usw. fur einen kuchen einzukaufen. ich muss.",
        ["ich", "muss", "unbedingt", "daran", "denken", ",", "mehl", ",", "usw", ".", "fur", "einen", "kuchen",
         "einzukaufen", ".", "ich", "muss", "."],
    ),
    # The example: Punkt ends the sentence at "it." although "the" is lowercase.
    ("i love it. the sky is blue", ["i", "love", "it", ".", "the", "sky", "is", "blue"]),
]


@pytest.mark.parametrize(("text", "tokens"), DOCUMENTED_WORD_TOKENIZE)
def test_fallback_matches_documented_word_tokenize(text, tokens):
    assert dm.fallback_word_tokenize(text) == tokens
    # Treebank alone keeps a sentence-final period inside a string on its word ("it." misses GloVe).
    assert dm.NLTKWordTokenizer().tokenize(text) != tokens


def test_fallback_sentences_match_the_punkt_docstring():
    # nltk/tokenize/punkt.py module docstring (PunktTokenizer on English), lowercased: abbreviations and
    # initials do not end sentences; closing brackets and quotes stay with the sentence they close.
    text = (
        "punkt knows that the periods in mr. smith and johann s. bach\ndo not mark sentence boundaries.  and "
        "sometimes sentences\ncan start with non-capitalized words.  i is a good variable\nname."
    )
    assert dm._FALLBACK_SENTENCES.tokenize(text) == [
        "punkt knows that the periods in mr. smith and johann s. bach\ndo not mark sentence boundaries.",
        "and sometimes sentences\ncan start with non-capitalized words.",
        "i is a good variable\nname.",
    ]
    text = (
        '(how does it deal with this parenthesis?)  "it should be part of the\nprevious sentence." '
        '"(and the same with this one.)" (\'and this one!\')\n"(\'(and (this)) \'?)" [(and this. )]'
    )
    assert dm._FALLBACK_SENTENCES.tokenize(text) == [
        "(how does it deal with this parenthesis?)",
        '"it should be part of the\nprevious sentence."',
        '"(and the same with this one.)"',
        "('and this one!')",
        '"(\'(and (this)) \'?)"',
        "[(and this. )]",
    ]


@pytest.fixture
def fresh_warnings():
    dm.logger.warning_once.cache_clear()
    yield
    dm.logger.warning_once.cache_clear()


def test_metrics_use_the_fallback_and_warn_once_without_punkt(monkeypatch, fresh_warnings):
    monkeypatch.setattr(dm, "punkt_available", lambda: False)
    warnings = []
    monkeypatch.setattr(dm.logger, "warning", lambda message, *args, **kwargs: warnings.append(message))
    assert dm.tokenize("I love it. The sky is blue") == "i love it . the sky is blue"
    result = compute_dialogue_metrics(["I love it. The sky is blue"], ["i love it . the sky is blue"])
    assert result["tokenizer"] == dm.FALLBACK_TOKENIZER
    assert result["bleu_1"] == pytest.approx(100.0)
    assert len(warnings) == 1 and 'nltk.download("punkt_tab")' in warnings[0]


def test_word_tokenize_is_used_when_punkt_is_installed(monkeypatch, fresh_warnings):
    calls = []

    def fake_word_tokenize(text):
        calls.append(text)
        return text.split()

    monkeypatch.setattr(dm, "punkt_available", lambda: True)
    monkeypatch.setattr(dm, "word_tokenize", fake_word_tokenize)
    monkeypatch.setattr(dm.logger, "warning", lambda *args, **kwargs: pytest.fail("warned although punkt_tab is there"))
    result = compute_dialogue_metrics(["  I love it. The sky"], ["i love it ."])
    assert result["tokenizer"] == dm.PUNKT_TOKENIZER == "nltk.word_tokenize (punkt_tab)"
    assert calls == ["i love it. the sky", "i love it ."]  # lowercased and stripped, as the release


def test_punkt_availability_is_what_nltk_finds(monkeypatch):
    def find(name):
        assert name == "tokenizers/punkt_tab/english/"
        raise LookupError(name)

    monkeypatch.setattr(dm.nltk.data, "find", find)
    assert dm.punkt_available() is False
    monkeypatch.setattr(dm.nltk.data, "find", lambda name: "/somewhere/" + name)
    assert dm.punkt_available() is True


@pytest.fixture
def toy_glove(tmp_path):
    # Mean of the file = ((1 + 0 + 2 - 3) / 4, (0 + 1 + 2 + 1) / 4) = (0, 1): the vector of OOV words.
    path = tmp_path / "toy.2d.txt"
    path.write_text("cat 1 0\ndog 0 1\nbig 2 2\nred -3 1\n", encoding="utf-8")
    return path


def test_embedding_metrics_by_hand(toy_glove):
    predictions = ["Cat DOG", "red zzz", ""]  # zzz is OOV -> (0, 1); the empty hypothesis scores 0
    references = ["big", "cat", "dog"]
    result = compute_dialogue_metrics(predictions, references, glove_path=toy_glove)
    # Average: pair 1 cos((1,1), (2,2)) = 1; pair 2 cos((-3,1) + (0,1), (1,0)) = -3/sqrt(13); pair 3 = 0.
    assert result["embedding_average"] == pytest.approx(100 * (1 - 3 / math.sqrt(13)) / 3, rel=1e-5)
    # Extrema: pair 1 (max|.| per dim of (1,0),(0,1)) = (1,1) vs (2,2) -> 1;
    #          pair 2 dim 0: max 0, min -3 -> -3; dim 1: max = min = 1 -> 1; cos((-3,1), (1,0)) = -3/sqrt(10).
    assert result["vector_extrema"] == pytest.approx(100 * (1 - 3 / math.sqrt(10)) / 3, rel=1e-5)
    # Greedy: pair 1 every cosine is 1/sqrt(2), both directions -> 1/sqrt(2);
    #         pair 2 hyp -> ref: mean(-3/sqrt(10), 0); ref -> hyp: max(-3/sqrt(10), 0) = 0.
    pair_2 = (-3 / math.sqrt(10) / 2 + 0) / 2
    assert result["greedy_matching"] == pytest.approx(100 * (1 / math.sqrt(2) + pair_2) / 3, rel=1e-5)


def _naive_greedy(h, r):
    def unit(m):
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    sims = unit(h) @ unit(r).T
    return (sims.max(axis=1).mean() + sims.max(axis=0).mean()) / 2


def test_vectorised_embeddings_match_a_plain_loop(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    table = rng.normal(size=(50, 8))
    path = tmp_path / "rand.8d.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in zip(words, table)), encoding="utf-8")
    hyps = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(40)]
    refs = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(40)]
    # A tiny chunk budget forces many reduceat chunks and greedy batches of mixed lengths.
    monkeypatch.setattr(dm, "_CHUNK_ELEMENTS", 2000)
    got = dm.embedding_metrics(hyps, refs, path)

    def vecs(s):
        return table[[words.index(w) for w in s.split()]]

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    def extrema(m):
        return np.where(np.abs(m.min(0)) < m.max(0), m.max(0), m.min(0))

    pairs = [(vecs(h), vecs(r)) for h, r in zip(hyps, refs)]
    average = np.mean([cos(h.sum(0), r.sum(0)) for h, r in pairs])
    extreme = np.mean([cos(extrema(h), extrema(r)) for h, r in pairs])
    greedy = np.mean([_naive_greedy(h, r) for h, r in pairs])
    assert got["embedding_average"] == pytest.approx(100 * average, rel=1e-4)
    assert got["vector_extrema"] == pytest.approx(100 * extreme, rel=1e-4)
    assert got["greedy_matching"] == pytest.approx(100 * greedy, rel=1e-4)


def test_empty_hypotheses_give_finite_numbers(toy_glove):
    result = compute_dialogue_metrics(["", "  "], ["cat dog", "big"], glove_path=toy_glove)
    assert {name: result[name] for name in dm.METRIC_NAMES} == {name: 0.0 for name in dm.METRIC_NAMES}


def test_without_glove_embedding_metrics_are_missing():
    result = compute_dialogue_metrics(PREDICTIONS, REFERENCES)
    assert set(result) == {*dm.METRIC_NAMES, "tokenizer"}
    assert result["embedding_average"] is None
    assert result["vector_extrema"] is None
    assert result["greedy_matching"] is None


def test_glove_is_cached_and_reread_when_changed(toy_glove):
    first = dm.load_glove(toy_glove)
    assert dm.load_glove(str(toy_glove)) is first
    toy_glove.write_text("cat 1 0 0\n", encoding="utf-8")
    assert dm.load_glove(toy_glove).dim == 3


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_dialogue_metrics(["a", "b"], ["a"])
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        compute_dialogue_metrics(["a"], ["a"], glove_path=tmp_path / "nowhere.txt")
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("cat 1 0\ndog 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="ragged.txt"):
        dm.load_glove(ragged)


_LOAD_SCRIPT = """
import json, socket, sys

def no_network(*args, **kwargs):
    raise RuntimeError("network access attempted")

socket.socket.connect = no_network
socket.create_connection = no_network

import evaluate

metric = evaluate.load(sys.argv[1])
result = metric.compute(predictions=json.loads(sys.argv[2]), references=json.loads(sys.argv[3]),
                        glove_path=sys.argv[4])
print(json.dumps(result))
"""


def test_loads_offline_through_evaluate_from_another_cwd(tmp_path, toy_glove):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    predictions, references = PREDICTIONS + ["Cat DOG"], REFERENCES + ["big"]
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(METRIC_FILE), json.dumps(predictions),
         json.dumps(references), str(toy_glove)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = compute_dialogue_metrics(predictions, references, glove_path=toy_glove)
    assert got == pytest.approx(expected)


def test_aggregate_runs_against_hand_values():
    runs = [{"bleu_1": 1.0, "average": None}, {"bleu_1": 2.0, "average": 3.0}, {"bleu_1": 3.0}]
    summary = aggregate_runs(runs, reference={"bleu_1": 1.0})
    bleu = summary["bleu_1"]
    # mean 2, sample std sqrt(((1-2)² + 0 + (3-2)²) / 2) = 1, t = (2 - 1) / (1 / sqrt(3)) = sqrt(3).
    # With 2 degrees of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t²)), so the one-sided p (higher is
    # better) = 1 - CDF(t) = (1 - t / sqrt(5)) / 2.
    assert bleu["n"] == 3 and bleu["mean"] == pytest.approx(2.0) and bleu["std"] == pytest.approx(1.0)
    assert bleu["t"] == pytest.approx(3**0.5) and bleu["alternative"] == "greater"
    assert bleu["p"] == pytest.approx((1 - 3**0.5 / 5**0.5) / 2)
    # One present value: a mean but no std and no test; no reference for it either.
    assert summary["average"] == {
        "n": 1, "mean": 3.0, "std": None, "reference": None, "alternative": "greater", "t": None, "p": None
    }
    # Lower is better: the same runs against 3.0 are an improvement with the same p.
    ppl = aggregate_runs(runs, reference={"bleu_1": 3.0}, lower_is_better=["bleu_1"])["bleu_1"]
    assert ppl["alternative"] == "less" and ppl["t"] == pytest.approx(-(3**0.5))
    assert ppl["p"] == pytest.approx((1 - 3**0.5 / 5**0.5) / 2)


def test_aggregate_runs_edge_cases():
    summary = aggregate_runs([{"ppl": 15.0, "missing": None}, {"ppl": 15.0, "missing": None}], {"ppl": 36.21})
    assert summary["ppl"]["std"] == 0.0 and summary["ppl"]["t"] is None  # identical runs: no t statistic
    assert summary["missing"]["n"] == 0 and summary["missing"]["mean"] is None


def test_markdown_table_marks_significance():
    runs = [{"bleu_1": v, "rouge_l": None} for v in (16.3, 16.4, 16.5, 16.4, 16.45)]
    table = format_markdown_table(aggregate_runs(runs, reference={"bleu_1": 14.0}))
    lines = table.splitlines()
    assert lines[0] == "| metric | mean ± std | n | reference | better | t | p (one-sided) |"
    assert lines[2].startswith("| bleu_1 | 16.41 ± 0.07* | 5 | 14.00 | higher |")
    assert lines[3] == "| rouge_l | – | 0 | – | higher | – | – |"


def test_only_significant_improvements_are_marked():
    # Every metric is far from its reference; only PPL (lower is better) and dis_1 are improvements.
    runs = [{"ppl": 15.0 + d, "bleu_1": 12.0 + d, "dis_1": 9.0 + d} for d in (0.0, 0.1, 0.2, 0.1, 0.15)]
    worse_ppl = [{"ppl": 40.0 + d} for d in (0.0, 0.1, 0.2, 0.1, 0.15)]
    reference = {"ppl": 36.21, "bleu_1": 16.06, "dis_1": 5.0}
    summary = aggregate_runs(runs, reference, lower_is_better=["ppl"])
    assert summary["ppl"]["p"] < 1e-6 and summary["dis_1"]["p"] < 1e-6
    assert summary["bleu_1"]["p"] > 0.999  # significantly worse: a large one-sided p
    worse = aggregate_runs(worse_ppl, reference, lower_is_better=["ppl"])
    assert worse["ppl"]["p"] > 0.999
    table = format_markdown_table({**summary, "worse_ppl": worse["ppl"]})
    marked = {row.split("|")[1].strip() for row in table.splitlines()[2:6] if "*" in row.split("|")[2]}
    assert marked == {"ppl", "dis_1"}
