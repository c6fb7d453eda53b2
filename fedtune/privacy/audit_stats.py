"""The membership audit's statistics, in plain numbers (no model, no torch).

- ROC-AUC is the Mann-Whitney statistic with ties counted half: the chance that a random
  member scores above a random nonmember.
- Its 95% interval is DeLong's (the variance of the AUC from each record's structural
  component). Where that variance is zero (perfect separation, or every score tied) DeLong
  gives a zero-width interval, which no finite sample supports: the interval is then the
  Clopper-Pearson interval of ``round(auc * k)`` successes in ``k = min(members, nonmembers)``
  trials, a conservative stand-in.
- TPR at 1% FPR thresholds the scores at the nonmembers' 99th percentile: a record is called
  a member when its score is strictly above the ``floor(0.01 * n) + 1``-th highest nonmember
  score, so at most 1% of the nonmembers are (falsely) called members. With fewer than 100
  nonmembers that is the highest nonmember score (0 false positives): the point is coarse,
  the smallest false-positive rate ``n`` nonmembers can resolve is ``1 / n``.
- Its 95% interval is the hull of a seeded bootstrap (members and nonmembers resampled, the
  threshold recomputed each time: the threshold's own uncertainty) and the Clopper-Pearson
  interval of the members above the observed threshold (which never has zero width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
FPR = 0.01
BOOTSTRAP = 2000


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and ordered[j + 1] == ordered[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each member, the share of nonmembers it beats
    (ties half); for each nonmember, the share of members that beat it."""
    m, n = len(pos), len(neg)
    both = midranks(np.concatenate([pos, neg]))
    v10 = (both[:m] - midranks(pos)) / n
    v01 = 1.0 - (both[m:] - midranks(neg)) / m
    return v10, v01


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """ROC-AUC of scores where higher means member (Mann-Whitney U / (m n), ties half)."""
    pos, neg = _arrays(members, nonmembers)
    v10, _ = _components(pos, neg)
    return float(v10.mean())


def auc_interval(members: Sequence[float], nonmembers: Sequence[float]) -> tuple[float, float]:
    """The AUC's 95% interval: DeLong's, or Clopper-Pearson where DeLong's variance is zero."""
    pos, neg = _arrays(members, nonmembers)
    v10, v01 = _components(pos, neg)
    value = float(v10.mean())
    m, n = len(pos), len(neg)
    var = (float(v10.var(ddof=1)) / m if m > 1 else 0.0) + (float(v01.var(ddof=1)) / n if n > 1 else 0.0)
    if var <= 1e-15:
        k = min(m, n)
        return clopper_pearson(round(value * k), k)
    half = Z95 * math.sqrt(var)
    return max(0.0, value - half), min(1.0, value + half)


def threshold_at_fpr(nonmembers: Sequence[float] | np.ndarray, fpr: float = FPR) -> float:
    """The score above which at most ``fpr`` of the nonmembers lie (their (1-fpr) quantile)."""
    neg = np.sort(np.asarray(nonmembers, dtype=np.float64))[::-1]
    k = math.floor(fpr * len(neg) + 1e-9)
    return float(neg[k]) if k < len(neg) else -math.inf


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float = FPR) -> float:
    """Share of members scoring strictly above the nonmembers' ``1 - fpr`` quantile."""
    pos, neg = _arrays(members, nonmembers)
    return float((pos > threshold_at_fpr(neg, fpr)).mean())


def tpr_interval(
    members: Sequence[float],
    nonmembers: Sequence[float],
    *,
    fpr: float = FPR,
    seed: int = 0,
    resamples: int = BOOTSTRAP,
) -> tuple[float, float]:
    """95% interval of the TPR at ``fpr``: hull of a seeded percentile bootstrap and the
    Clopper-Pearson interval of the members above the observed threshold."""
    pos, neg = _arrays(members, nonmembers)
    rng = np.random.default_rng(seed)
    boot_pos = pos[rng.integers(0, len(pos), size=(resamples, len(pos)))]
    boot_neg = np.sort(neg[rng.integers(0, len(neg), size=(resamples, len(neg)))], axis=1)[:, ::-1]
    k = math.floor(fpr * len(neg) + 1e-9)
    thresholds = boot_neg[:, k] if k < len(neg) else np.full(resamples, -np.inf)
    rates = (boot_pos > thresholds[:, None]).mean(axis=1)
    boot_low, boot_high = (float(x) for x in np.quantile(rates, [0.025, 0.975]))
    hits = int((pos > threshold_at_fpr(neg, fpr)).sum())
    cp_low, cp_high = clopper_pearson(hits, len(pos))
    return min(boot_low, cp_low), max(boot_high, cp_high)


def clopper_pearson(successes: int, trials: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval (by bisection on the binomial tails; no scipy)."""
    if trials <= 0:
        return 0.0, 1.0
    low = 0.0 if successes <= 0 else _bisect(lambda p: _tail_at_least(successes, trials, p) - alpha / 2)
    high = 1.0 if successes >= trials else _bisect(lambda p: alpha / 2 - _tail_at_most(successes, trials, p))
    return low, high


def _log_pmf(k: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def _tail_at_most(k: int, n: int, p: float) -> float:
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(0, k + 1)))


def _tail_at_least(k: int, n: int, p: float) -> float:
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(k, n + 1)))


def _bisect(increasing: Callable[[float], float]) -> float:
    """The root in (0, 1) of a function increasing in p."""
    lo, hi = 1e-12, 1.0 - 1e-12
    for _ in range(80):
        mid = (lo + hi) / 2
        if increasing(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _arrays(members: Sequence[float], nonmembers: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(members, dtype=np.float64)
    neg = np.asarray(nonmembers, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("a membership audit needs at least one member and one nonmember score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("a membership audit's scores must be finite")
    return pos, neg
