"""Aggregation of repeated runs and significance against a baseline (paper §5.1).

The paper runs VIKDF with five random seeds, reports each metric's mean and marks with * the metrics where a
one-sample t-test of the runs against the best baseline's value gives p < 0.05. :func:`aggregate_runs` does
that per metric (mean, sample standard deviation with ddof = 1, t and two-sided p from
``scipy.stats.ttest_1samp``) and :func:`format_markdown_table` prints the result.

A metric value of ``None`` means "missing" (e.g. embedding metrics without a GloVe file) and is left out of
that metric's statistics; a statistic that cannot be computed (no runs, one run, no reference) is ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def aggregate_runs(
    runs: Sequence[Mapping[str, float | None]],
    reference: Mapping[str, float | None] | None = None,
    alternative: str = "two-sided",
) -> dict[str, dict[str, float | int | None]]:
    """Per metric: ``n``, ``mean``, ``std`` (ddof = 1), ``reference``, ``t`` and ``p``.

    Args:
        runs: one dict of metric values per run (seed); metrics may differ between runs or be ``None``.
        reference: the value to test each metric against (the best baseline's); ``None`` or a missing key
            leaves ``t`` and ``p`` as ``None``.
        alternative: passed to ``scipy.stats.ttest_1samp``; two-sided by default because some metrics
            (PPL) are better when lower.

    Metrics keep the order in which they first appear in ``runs``. With every run equal the t statistic is
    infinite or undefined, so ``t`` and ``p`` stay ``None``.
    """
    names = list(dict.fromkeys(name for run in runs for name in run))
    summary: dict[str, dict[str, float | int | None]] = {}
    for name in names:
        values = np.array([run[name] for run in runs if run.get(name) is not None], dtype=np.float64)
        ref = None if reference is None else reference.get(name)
        row: dict[str, float | int | None] = {
            "n": len(values),
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "reference": None if ref is None else float(ref),
            "t": None,
            "p": None,
        }
        if ref is not None and len(values) > 1 and values.std() > 0:
            result = stats.ttest_1samp(values, ref, alternative=alternative)
            row["t"], row["p"] = float(result.statistic), float(result.pvalue)
        summary[name] = row
    return summary


def _number(value: float | int | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_markdown_table(
    summary: Mapping[str, Mapping[str, float | int | None]], digits: int = 2, alpha: float = 0.05
) -> str:
    """A markdown table, one row per metric: mean ± std over runs, reference, t and p.

    As in the paper's Table 1, ``*`` marks a mean that differs significantly (p < ``alpha``) from the
    reference; missing values print as "–".
    """
    lines = ["| metric | mean ± std | n | reference | t | p |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        cell = _number(row["mean"], digits)
        if row["std"] is not None:
            cell += f" ± {row['std']:.{digits}f}"
        if row["p"] is not None and row["p"] < alpha:
            cell += "*"
        p = "–" if row["p"] is None else f"{row['p']:.3g}"
        lines.append(
            f"| {name} | {cell} | {row['n']} | {_number(row['reference'], digits)} | {_number(row['t'], 2)} | {p} |"
        )
    return "\n".join(lines) + "\n"
