"""The statistics of the compare report, computed with :mod:`scipy.stats` (imported when first used).

* :func:`mean_ci`: a mean over jobs and its 95% Student's t interval ``mean ± t(0.975, n-1) · sd / sqrt(n)``.
* :func:`paired_difference`: the per-pair differences of one policy from a baseline (pairs: the same model,
  prompt and seed, so the same noise), their mean, its 95% t interval and a paired t-test
  (:func:`scipy.stats.ttest_rel`); a difference is *resolved* when its interval excludes 0 (equivalently,
  ``p < 0.05``).

Values that are None or NaN are left out (a pair is left out when either side is).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

#: the confidence level of every interval in the report
LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (NaN for ``df < 1``)."""
    if df < 1:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, df))


def _clean(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def mean_ci(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "ci_low", "ci_high", "n"}`` of ``values`` (None and NaN left out; the interval of a single
    value is that value, of none NaN)."""
    clean = [v for v in map(_clean, values) if v is not None]
    n = len(clean)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = math.fsum(clean) / n
    if n == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": 1}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in clean) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired_difference(values: Sequence[float | None], baseline: Sequence[float | None]) -> dict[str, Any]:
    """``values[i] - baseline[i]`` over the pairs where both are numbers: ``{"mean", "sd", "ci_low",
    "ci_high", "n", "t", "p", "resolved"}``.

    ``t`` and ``p`` are those of the two-sided paired t-test; ``resolved`` says whether the 95% interval
    excludes 0. Fewer than two pairs give no interval and no test (None); differences that are all equal
    give an interval of width 0, resolved unless they are 0 (``t`` is then None: infinite, ``p`` 0).
    """
    if len(values) != len(baseline):
        raise ValueError(f"paired samples differ in length: {len(values)} values, {len(baseline)} baseline values")
    pairs = [(a, b) for a, b in zip(map(_clean, values), map(_clean, baseline)) if a is not None and b is not None]
    n = len(pairs)
    result: dict[str, Any] = {"mean": None, "sd": None, "ci_low": None, "ci_high": None, "n": n, "t": None,
                              "p": None, "resolved": False}
    if n == 0:
        return result
    diffs = [a - b for a, b in pairs]
    mean = math.fsum(diffs) / n
    result["mean"] = mean
    if n == 1:
        return result
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    result.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
    if sd == 0.0:  # no spread: the difference is known exactly
        result.update(p=0.0 if mean != 0.0 else None, resolved=mean != 0.0)
        return result
    from scipy import stats

    with warnings.catch_warnings():  # nearly equal differences: scipy warns of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
    t, p = float(test.statistic), float(test.pvalue)
    result.update(t=t if math.isfinite(t) else None, p=p if math.isfinite(p) else None,
                  resolved=mean - half > 0.0 or mean + half < 0.0)
    return result
