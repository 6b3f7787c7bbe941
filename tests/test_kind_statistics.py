"""The bootstrap over object kinds that the demo's intervals and verdicts use, on cases whose answer is known."""

import sys
from pathlib import Path

import pytest

import demo
from vikdf.demo.world import knowledge_accuracy, knowledge_outcomes
from vikdf.evaluation.dialogue_metrics import bleu_1, bleu_1_counts, bleu_1_from_counts, rouge_l, rouge_l_scores
from vikdf.evaluation.stats import nested_bootstrap_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the scripts behind the demo figures


def test_one_kind_right_and_the_rest_wrong_gives_a_wide_interval():
    mean, low, high = nested_bootstrap_interval([[1.0] * 6] + [[0.0] * 6] * 11)
    assert mean == pytest.approx(1 / 12)
    assert low == 0.0 and high >= 0.25  # anything from no kind to three kinds right is plausible


def test_many_kinds_at_the_same_rate_give_a_narrow_interval():
    mean, low, high = nested_bootstrap_interval([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 48)
    assert low == pytest.approx(1 / 6) and high == pytest.approx(1 / 6) and mean == pytest.approx(1 / 6)


def test_interval_narrows_as_kinds_grow_at_the_same_spread():
    def width(kinds: int) -> float:
        sample = [[1.0] * 6 if k % 2 else [0.0] * 6 for k in range(kinds)]
        _, low, high = nested_bootstrap_interval(sample)
        return high - low

    assert width(48) < 0.6 * width(12)  # √4 = 2: the width falls with the square root of the number of kinds


def test_pooled_runs_resample_runs_then_kinds():
    # Two runs that disagree completely: resampling the runs must reach both extremes' neighbourhoods.
    runs = [[[1.0] * 6] * 12, [[0.0] * 6] * 12]
    mean, low, high = nested_bootstrap_interval(runs)
    assert mean == pytest.approx(0.5) and low == 0.0 and high == 1.0
    with pytest.raises(ValueError, match="empty"):
        nested_bootstrap_interval([[1.0], []])


def test_corpus_bleu_1_is_bootstrapped_from_per_pair_counts():
    hyps = ["a red ball is here", "yes", "the cat on the mat is blue today", "i like it"]
    refs = ["the red ball", "yes it is", "a cat sat on a mat", "i do not like it at all"]
    counts = [bleu_1_counts(h, r) for h, r in zip(hyps, refs)]
    value, low, high = nested_bootstrap_interval([counts[:2], counts[2:]], statistic=bleu_1_from_counts)
    assert value == pytest.approx(bleu_1(hyps, refs), abs=1e-6)
    assert low < value < high
    # Every kind with the same pairs: the corpus score cannot move.
    value, low, high = nested_bootstrap_interval([counts] * 10, statistic=bleu_1_from_counts)
    assert low == pytest.approx(value) and high == pytest.approx(value)
    assert sum(rouge_l_scores(hyps, refs)) / len(hyps) == pytest.approx(rouge_l(hyps, refs))


def test_knowledge_outcomes_name_the_kind_of_each_scored_response():
    table = {"zorp": "red", "fep": "green"}
    outcomes = knowledge_outcomes(["i saw a zorp.", "hello there", "a fep!"], ["it was red!", "hi", "red"], table)
    assert outcomes == [("zorp", True), None, ("fep", False)]
    assert knowledge_accuracy(["i saw a zorp.", "hello there", "a fep!"], ["it was red!", "hi", "red"], table) == 0.5


def _run(seed: int, right_kinds: dict[str, set[int]], kinds: int = 12, per_kind: int = 4) -> dict:
    """A benchmark run record: each system gets the kinds in `right_kinds[system]` right and the rest wrong."""
    systems = {}
    for name in (demo.VIKDF, demo.NO_PRETRAIN, demo.FROZEN_LLM, demo.LORA, demo.SHUFFLED):
        outcomes = [(f"kind{k}", k in right_kinds.get(name, set())) for k in range(kinds) for _ in range(per_kind)]
        accuracy = sum(right for _, right in outcomes) / len(outcomes)
        systems[name] = {"knowledge_outcomes": outcomes, "knowledge_accuracy": accuracy,
                         "knowledge_accuracy_seen": 0.5, "textualised_accuracy": None, "bleu_1": 30.0}
    return {"seed": seed, "systems": systems}


def test_benchmark_targets_are_judged_on_intervals_over_runs_and_kinds():
    bench = pytest.importorskip("demo_seeds")
    # VIKDF right on 8 of 12 kinds in every run, the ablations on 2 (a different pair each run), shuffled on 2.
    runs = [_run(seed, {demo.VIKDF: set(range(8)), demo.NO_PRETRAIN: {seed, seed + 6}, demo.FROZEN_LLM: {0, 1},
                        demo.LORA: {2, 3}, demo.SHUFFLED: {seed, 11}}) for seed in range(6)]
    checks = {check["target"].split(" by ")[0].split(":")[0]: check for check in bench.targets(runs)}
    assert all(check["met"] for check in checks.values()), checks
    assert checks["VIKDF beats VIKDF without pre-training"]["positive_runs"] == 6
    # One kind right in one run only: a gain the resampling of runs and kinds cannot tell from 0.
    runs = [_run(seed, {demo.VIKDF: {0} if seed == 0 else set()}) for seed in range(6)]
    (gain_check, *_) = bench.targets(runs)
    assert not gain_check["met"] and gain_check["low_points"] == 0.0 and gain_check["positive_runs"] == 1
    line = bench.aggregate_table(runs)[2]
    assert line.startswith(f"| {demo.VIKDF} | 1.4 ± 3.4 |") and "| [0.0, " in line
