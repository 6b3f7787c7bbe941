"""Aggregation of repeated runs and significance against a baseline (paper §5.1).

The paper runs VIKDF with five random seeds, reports each metric's mean and marks with * the "significant
improvements (p < 0.05)" of one-sample t-tests of the runs against the best baseline's value (Table 1 and its
caption). :func:`aggregate_runs` does that per metric: mean, sample standard deviation with ddof = 1, and t and
p from ``scipy.stats.ttest_1samp``, one-sided in the direction of improvement (higher is better unless the
metric is listed in ``lower_is_better``), so a significantly *worse* result gets a large p and no mark.
:func:`format_markdown_table` prints the result.

A metric value of ``None`` means "missing" (e.g. embedding metrics without a GloVe file) and is left out of
that metric's statistics; a statistic that cannot be computed (no runs, one run, no reference) is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np


def aggregate_runs(
    runs: Sequence[Mapping[str, float | None]],
    reference: Mapping[str, float | None] | None = None,
    lower_is_better: Collection[str] = (),
) -> dict[str, dict[str, float | int | str | None]]:
    """Per metric: ``n``, ``mean``, ``std`` (ddof = 1), ``reference``, ``alternative``, ``t`` and ``p``.

    Args:
        runs: one dict of metric values per run (seed); metrics may differ between runs or be ``None``.
        reference: the value to test each metric against (the best baseline's); ``None`` or a missing key
            leaves ``t`` and ``p`` as ``None``.
        lower_is_better: metrics (e.g. PPL) whose improvement is a lower value: their test has
            ``alternative="less"``, every other metric's ``"greater"`` (the ``alternative`` of the row).

    Metrics keep the order in which they first appear in ``runs``. With every run equal the t statistic is
    infinite or undefined, so ``t`` and ``p`` stay ``None``.
    """
    names = list(dict.fromkeys(name for run in runs for name in run))
    summary: dict[str, dict[str, float | int | None]] = {}
    for name in names:
        values = np.array([run[name] for run in runs if run.get(name) is not None], dtype=np.float64)
        ref = None if reference is None else reference.get(name)
        alternative = "less" if name in lower_is_better else "greater"
        row: dict[str, float | int | str | None] = {
            "n": len(values),
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "reference": None if ref is None else float(ref),
            "alternative": alternative,
            "t": None,
            "p": None,
        }
        if ref is not None and len(values) > 1 and values.std() > 0:
            from scipy import stats  # scipy.stats takes a second to import: only when a test runs

            result = stats.ttest_1samp(values, ref, alternative=alternative)
            row["t"], row["p"] = float(result.statistic), float(result.pvalue)
        summary[name] = row
    return summary


def significance_mark(row: Mapping[str, float | int | str | None], alpha: float = 0.05) -> str:
    """``"*"`` for a significant improvement over the reference (one-sided p < ``alpha``), else ``""``."""
    return "*" if row["p"] is not None and row["p"] < alpha else ""


def _number(value: float | int | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_markdown_table(
    summary: Mapping[str, Mapping[str, float | int | None]], digits: int = 2, alpha: float = 0.05
) -> str:
    """A markdown table, one row per metric: mean ± std over runs, reference, better (higher/lower), t and p.

    As in the paper's Table 1, ``*`` marks a significant improvement on the reference (one-sided p < ``alpha``);
    missing values print as "–".
    """
    lines = [
        "| metric | mean ± std | n | reference | better | t | p (one-sided) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in summary.items():
        cell = _number(row["mean"], digits)
        if row["std"] is not None:
            cell += f" ± {row['std']:.{digits}f}"
        cell += significance_mark(row, alpha)
        p = "–" if row["p"] is None else f"{row['p']:.3g}"
        better = "lower" if row["alternative"] == "less" else "higher"
        lines.append(
            f"| {name} | {cell} | {row['n']} | {_number(row['reference'], digits)} | {better} | "
            f"{_number(row['t'], 2)} | {p} |"
        )
    lines.append("")
    lines.append(
        f"\\* significant improvement on the reference: one-sample t-test over the runs, one-sided in the better "
        f"direction, p < {alpha:g}."
    )
    return "\n".join(lines) + "\n"


# A nested sample: a list of outcomes (those of one cluster, e.g. one kind's dialogues) or a list of nested samples
# (e.g. the kinds of a run, or the runs of a benchmark). An outcome is a number, or a tuple of numbers of one length
# when the statistic is a function of their sums (corpus BLEU-1 of clipped matches and lengths).
Nested = Sequence[float] | Sequence[Sequence[float]] | Sequence["Nested"]
Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]


def mean_statistic(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return sums / counts


def _resampled_sums(node: Nested, rng: np.random.Generator, resamples: int, tuples: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sums (resamples, ...) and counts (resamples,) of the outcomes under `node`: the clusters of every level are
    drawn with replacement, and a drawn innermost cluster brings all its outcomes as they are.

    The outcomes inside a cluster are not drawn again: resampling at every level counts the within-cluster variance
    twice and overstates the interval, while resampling the clusters alone is consistent for clustered data."""
    if len(node) == 0:
        raise ValueError("a cluster of the bootstrap sample is empty; leave it out instead")
    if _innermost(node, tuples):
        total = np.sum(np.asarray(node, dtype=float), axis=0)
        return np.broadcast_to(total, (resamples, *np.shape(total))), np.full(resamples, float(len(node)))
    children = [_resampled_sums(child, rng, resamples, tuples) for child in node]
    sums = np.stack([s for s, _ in children])                                     # (m, B, ...)
    counts = np.stack([c for _, c in children])                                   # (m, B)
    draws = rng.integers(0, len(node), size=(len(node), resamples))               # (m, B): child drawn in slot j
    columns = np.arange(resamples)
    return sums[draws, columns].sum(axis=0), counts[draws, columns].sum(axis=0)


def _innermost(node: Nested, tuples: bool) -> bool:
    """Whether `node` is a list of outcomes: numbers, or (with tuple outcomes) lists of numbers."""
    item = node[0]
    return not isinstance(item, Sequence) if not tuples else not isinstance(item[0], Sequence)


def nested_bootstrap_interval(
    sample: Nested, confidence: float = 0.95, resamples: int = 4000, seed: int = 0, statistic: Statistic | None = None
) -> tuple[float, float, float]:
    """A statistic of all outcomes in `sample` (by default their mean) and its percentile bootstrap interval,
    resampling the top-level clusters, then the clusters nested in each drawn one, down to the innermost clusters,
    whose outcomes stay together.

    The demo's knowledge accuracy is decided kind by kind (a model knows a kind's colour or it does not), so its
    sampling unit is the object kind, not the dialogue: `sample` is then one list of per-dialogue outcomes (1 right,
    0 wrong; or a paired difference of two systems on the same dialogues, -1/0/1) per kind, and over several runs
    one such list of kinds per run (runs drawn, then kinds within each drawn run). With a `statistic`, each outcome
    is a tuple of numbers and `statistic(sums, counts)` maps their sums (resamples, k) and counts (resamples,) to
    the statistic (resamples,), e.g. corpus BLEU-1 from clipped matches and lengths.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tuples = statistic is not None
    statistic = statistic or mean_statistic
    sums, counts = _resampled_sums(sample, np.random.default_rng(seed), resamples, tuples)
    values = statistic(sums, counts)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    total, count = _observed(sample, tuples)
    return float(statistic(total[None], np.array([count]))[0]), float(low), float(high)


def _observed(node: Nested, tuples: bool) -> tuple[np.ndarray, float]:
    """Sum and count of every outcome under `node`, as drawn once with each cluster once."""
    if _innermost(node, tuples):
        return np.sum(np.asarray(node, dtype=float), axis=0), float(len(node))
    parts = [_observed(child, tuples) for child in node]
    return sum(s for s, _ in parts), sum(c for _, c in parts)
