"""Statistics for the paper tables: rates, paired tests, bootstrap, equivalence, corrections.

What the original used, and what this module adds (docs/protocols.md, "Statistics used by the original"):

- ``rate`` -- a success rate with the paper's "±" (normal 95% half-width ``1.96*sqrt(p(1-p)/n)``) *and* a
  Wilson or exact (Clopper-Pearson) interval, which stays inside [0, 1] near 0% and 100%.
- ``mcnemar_exact`` -- the paper's paired test: a two-sided exact binomial test on the discordant pairs.
- ``paired_bootstrap`` -- a seeded bootstrap that resamples *pairs* (percentile or BCa interval).
- ``paired_mean_difference`` -- continuous paired data (log-probabilities, P(COOPERATE)): t interval and
  Wilcoxon signed-rank p-value.
- ``tost_paired_proportions`` / ``tost_paired_means`` -- equivalence tests for "no difference" claims, with a
  stated margin, instead of reading a large p-value as equivalence.
- ``adjust_pvalues`` -- Holm, Bonferroni or Benjamini-Hochberg across the rows of a table; ``holm_by_name`` --
  Holm over a family keyed by row name.
- ``combine_orders`` / ``head_to_head`` -- the story-coherence judge table: a side wins only if the judge prefers
  it in both presentation orders, else the comparison is a tie.

Every result is a frozen, keyword-only dataclass. Every random number comes from
``numpy.random.default_rng(seed)`` with a caller-supplied integer seed, so a table is reproducible bit for bit.
scipy does the distribution work; statsmodels is used only by the tests, as an independent oracle.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
from scipy import stats as sps

from .checks import is_int

__all__ = [
    "Rate", "rate", "normal_half_width",
    "McNemarResult", "mcnemar_exact", "mcnemar_exact_counts",
    "BootstrapResult", "paired_bootstrap",
    "PairedDifference", "paired_mean_difference",
    "EquivalenceResult", "tost_paired_proportions", "tost_paired_means",
    "AdjustedPValues", "adjust_pvalues", "holm_by_name",
    "HeadToHead", "combine_orders", "head_to_head", "head_to_head_from_outcomes",
]


# ---------------------------------------------------------------------------------------------------------------
# Input checks (shared; every message names the bad value and the rule it broke)
# ---------------------------------------------------------------------------------------------------------------

def _check_int(name: str, value, *, minimum: int = 0) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not (isinstance(alpha, Real) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def _check_seed(seed) -> int:
    if not is_int(seed):
        raise TypeError(f"seed must be an integer (every bootstrap is seeded), got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy.random.default_rng rule), got {seed}")
    return int(seed)


def _as_binary(name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one outcome per pair), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    bad = arr[~np.isin(arr, (0, 1))] if arr.dtype.kind in "iuf" else arr
    if arr.dtype.kind not in "iuf" or bad.size:
        raise ValueError(f"{name} must hold booleans or 0/1, got values such as {bad[:3].tolist()!r}")
    return arr.astype(bool)


def _as_real(name: str, x) -> np.ndarray:
    raw = np.asarray(x)
    if raw.dtype.kind not in "biuf":  # strings or objects: refused, not parsed
        raise ValueError(f"{name} must hold numbers, got values such as {raw.ravel()[:3].tolist()!r}")
    arr = raw.astype(float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per pair), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got non-finite values at indices "
                         f"{np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
    return arr


def _check_paired(a: np.ndarray, b: np.ndarray, *, minimum: int = 1, names: tuple[str, str] = ("a", "b")) -> int:
    if len(a) != len(b):
        x, y = names
        raise ValueError(f"{x} and {y} must be paired (same length), got len({x})={len(a)} and len({y})={len(b)}")
    if len(a) < minimum:
        raise ValueError(f"need at least {minimum} pair(s), got {len(a)}")
    return len(a)


def _check_margin(margin: float, *, upper: float = math.inf) -> float:
    if isinstance(margin, bool) or not (isinstance(margin, Real) and math.isfinite(margin) and 0.0 < margin < upper):
        rule = "> 0" if upper == math.inf else f"> 0 and < {upper:g}"
        raise ValueError(f"margin must be a finite number {rule} (the equivalence bound is ±margin), "
                         f"got {margin!r}")
    return float(margin)


def _pct(x: float, digits: int) -> str:
    return f"{100.0 * x:.{digits}f}%"


# ---------------------------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------------------------

def normal_half_width(p: float, n: int, *, alpha: float = 0.05) -> float:
    """The paper's "±": normal (Wald) half-width ``z * sqrt(p(1-p)/n)``, z = 1.96 at alpha = 0.05.

    Example: ``normal_half_width(0.783, 500)`` is 0.0361, printed as "± 3.6%".
    """
    _check_int("n", n, minimum=1)
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a proportion in [0, 1], got {p!r}")
    z = sps.norm.ppf(1.0 - _check_alpha(alpha) / 2.0)
    return float(z * math.sqrt(p * (1.0 - p) / n))


@dataclass(frozen=True, kw_only=True)
class Rate:
    """A success rate with both the paper's "±" and a proper interval (``method``: "wilson" or "exact")."""

    successes: int
    n: int
    rate: float
    low: float          # Wilson or Clopper-Pearson bound, inside [0, 1]
    high: float
    half_width: float   # the paper's normal half-width; 0 at 0% and 100%, which is why low/high exist
    method: str
    alpha: float

    @property
    def ci(self) -> tuple[float, float]:
        return (self.low, self.high)

    def format(self, *, digits: int = 1) -> str:
        """The paper's style: ``"78.2% ± 3.6%"``."""
        return f"{_pct(self.rate, digits)} ± {_pct(self.half_width, digits)}"

    def format_interval(self, *, digits: int = 1) -> str:
        """With the Wilson/exact interval: ``"78.2% [74.4%, 81.6%]"``."""
        return f"{_pct(self.rate, digits)} [{_pct(self.low, digits)}, {_pct(self.high, digits)}]"

    def format_both(self, *, digits: int = 1) -> str:
        """The paper's "±" and the Wilson/exact interval in percent, compactly: ``"65.6% ± 16.5% [48.3, 79.6]"``.

        The "±" may reach past 0% or 100% (``rate(1, 2)``: "50.0% ± 69.3% [9.5, 90.5]") or collapse to
        "± 0.0%" at 0/n and n/n; the bracketed interval always lies inside [0, 100].
        """
        return (f"{_pct(self.rate, digits)} ± {_pct(self.half_width, digits)} "
                f"[{100.0 * self.low:.{digits}f}, {100.0 * self.high:.{digits}f}]")

    def to_json(self) -> dict:
        """Counts, the point rate, the interval (``method``) and the paper's half-width, for a results JSON."""
        return {"successes": self.successes, "n": self.n, "rate": self.rate, "low": self.low, "high": self.high,
                "method": self.method, "half_width": self.half_width}


def rate(successes: int, n: int, *, alpha: float = 0.05, method: str = "wilson") -> Rate:
    """Rate of ``successes`` out of ``n`` with a Wilson (default) or exact Clopper-Pearson interval.

    Example: ``rate(391, 500).format()`` is "78.2% ± 3.6%"; ``.format_interval()`` is "78.2% [74.4%, 81.6%]";
    ``.format_both()`` is "78.2% ± 3.6% [74.4, 81.6]".
    """
    n = _check_int("n", n, minimum=1)
    successes = _check_int("successes", successes, minimum=0)
    if successes > n:
        raise ValueError(f"successes must be <= n, got successes={successes} > n={n}")
    alpha = _check_alpha(alpha)
    if method not in ("wilson", "exact"):
        raise ValueError(f"method must be 'wilson' or 'exact', got {method!r}")
    ci = sps.binomtest(successes, n).proportion_ci(confidence_level=1.0 - alpha, method=method)
    p = successes / n
    return Rate(successes=successes, n=n, rate=p, low=float(ci.low), high=float(ci.high),
                half_width=normal_half_width(p, n, alpha=alpha), method=method, alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------
# Exact McNemar (paired binary outcomes)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class McNemarResult:
    """Exact McNemar test. ``difference`` = rate(a) - rate(b) = (a_only - b_only) / n_pairs."""

    a_only: int        # pairs where a succeeded and b failed
    b_only: int        # pairs where b succeeded and a failed
    n_pairs: int
    statistic: int     # min(a_only, b_only), as statsmodels reports it
    pvalue: float      # two-sided exact binomial(a_only + b_only, 1/2) test; 1.0 with no discordant pairs
    difference: float


def mcnemar_exact_counts(*, a_only: int, b_only: int, n_pairs: int) -> McNemarResult:
    """Exact McNemar test from the discordant counts (keyword-only, so the two cannot be swapped silently).

    Example: ``mcnemar_exact_counts(a_only=1, b_only=9, n_pairs=100)`` gives p = 0.0215, difference = -0.08.
    """
    a_only = _check_int("a_only", a_only)
    b_only = _check_int("b_only", b_only)
    n_pairs = _check_int("n_pairs", n_pairs, minimum=1)
    if a_only + b_only > n_pairs:
        raise ValueError(f"discordant pairs cannot exceed n_pairs: a_only + b_only = {a_only + b_only} "
                         f"> n_pairs = {n_pairs}")
    discordant = a_only + b_only
    # binomtest rejects n = 0; with no discordant pairs there is no evidence either way.
    p = 1.0 if discordant == 0 else float(sps.binomtest(a_only, discordant, 0.5).pvalue)
    return McNemarResult(a_only=a_only, b_only=b_only, n_pairs=n_pairs, statistic=min(a_only, b_only),
                         pvalue=min(p, 1.0), difference=(a_only - b_only) / n_pairs)


def mcnemar_exact(a, b) -> McNemarResult:
    """Exact McNemar test on paired boolean outcomes (``a[i]`` and ``b[i]`` share a seed or problem).

    Example: ``mcnemar_exact([1, 1, 0, 1], [0, 1, 0, 0])`` has a_only=2, b_only=0, p = 0.5, difference = 0.5.
    """
    a, b = _as_binary("a", a), _as_binary("b", b)
    n = _check_paired(a, b)
    return mcnemar_exact_counts(a_only=int(np.sum(a & ~b)), b_only=int(np.sum(~a & b)), n_pairs=n)


# ---------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class BootstrapResult:
    """A bootstrap estimate with its (1 - alpha) interval; rerunning with the same seed gives the same numbers."""

    estimate: float         # the statistic on the original data
    low: float
    high: float
    standard_error: float   # standard deviation of the bootstrap distribution
    n_resamples: int
    seed: int
    alpha: float
    method: str             # "percentile" or "BCa"

    @property
    def ci(self) -> tuple[float, float]:
        return (self.low, self.high)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _bootstrap_distribution(a, b, statistic, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Resample pair indices with replacement; index i always takes a[i] and b[i] together."""
    n = len(a)
    if statistic is None:
        # Vectorised in batches of about 2M indices so memory stays flat whatever n_resamples is.
        batch = max(1, 2_000_000 // n)
        parts = []
        for start in range(0, n_resamples, batch):
            idx = rng.integers(0, n, size=(min(batch, n_resamples - start), n))  # (R, n)
            parts.append(_mean_difference(a[idx], b[idx]))
        return np.concatenate(parts)
    out = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        out[r] = statistic(a[idx], b[idx])
    return out


def paired_bootstrap(a, b, *, seed: int, statistic: Callable[[np.ndarray, np.ndarray], float] | None = None,
                     n_resamples: int = 10_000, alpha: float = 0.05,
                     method: str = "percentile") -> BootstrapResult:
    """Bootstrap CI of a paired statistic (default: ``mean(a) - mean(b)``) by resampling pairs.

    ``statistic(a_sample, b_sample) -> float`` may be any function of the two aligned samples. ``method`` is
    "percentile" (numpy, below) or "BCa" (``scipy.stats.bootstrap(paired=True)``, same seeded Generator).

    Example: ``paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 0], seed=0, n_resamples=1000)`` has estimate 0.5 and a
    percentile interval of about [0.0, 1.0].
    """
    a, b = _as_real("a", a), _as_real("b", b)
    _check_paired(a, b, minimum=2)
    seed = _check_seed(seed)
    n_resamples = _check_int("n_resamples", n_resamples, minimum=1)
    alpha = _check_alpha(alpha)
    if statistic is not None and not callable(statistic):
        raise TypeError(f"statistic must be callable (a_sample, b_sample) -> float, got {statistic!r}")
    rng = np.random.default_rng(seed)
    estimate = float(_mean_difference(a, b) if statistic is None else statistic(a, b))

    if method == "percentile":
        dist = _bootstrap_distribution(a, b, statistic, n_resamples, rng)
        low, high = np.quantile(dist, [alpha / 2.0, 1.0 - alpha / 2.0])
        se = float(np.std(dist, ddof=1)) if n_resamples > 1 else 0.0
    elif method == "BCa":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = sps.bootstrap((a, b), _mean_difference if statistic is None else statistic, paired=True,
                                vectorized=statistic is None, n_resamples=n_resamples,
                                confidence_level=1.0 - alpha, method="BCa", rng=rng)
        low, high, se = res.confidence_interval.low, res.confidence_interval.high, float(res.standard_error)
        if not (np.isfinite(low) and np.isfinite(high)):
            # scipy's own warnings say the same thing less directly; this error replaces them.
            raise ValueError("BCa interval is undefined here (degenerate bootstrap distribution, e.g. all pairs "
                             "identical); use method='percentile'")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    else:
        raise ValueError(f"method must be 'percentile' or 'BCa', got {method!r}")
    return BootstrapResult(estimate=estimate, low=float(low), high=float(high), standard_error=se,
                           n_resamples=n_resamples, seed=seed, alpha=alpha, method=method)


# ---------------------------------------------------------------------------------------------------------------
# Continuous paired data
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """Mean of x - y over pairs, its t interval, the paired t-test p and the Wilcoxon signed-rank p."""

    n: int
    mean_difference: float
    low: float
    high: float
    t_pvalue: float
    wilcoxon_pvalue: float
    alpha: float

    @property
    def ci(self) -> tuple[float, float]:
        return (self.low, self.high)


def paired_mean_difference(x, y, *, alpha: float = 0.05) -> PairedDifference:
    """Paired comparison of continuous values (``x[i]``, ``y[i]`` from the same game or problem).

    When every difference is identical the t interval collapses to that value (p = 1 if it is 0, else 0);
    the Wilcoxon p is 1 when every difference is 0 (scipy drops zero differences and has nothing left).

    Example: ``paired_mean_difference([0.9, 0.8, 0.7, 0.95], [0.85, 0.8, 0.6, 0.9])`` has mean difference
    0.05, 95% t interval [-0.015, 0.115], t p = 0.092, Wilcoxon p = 0.25.
    """
    x, y = _as_real("x", x), _as_real("y", y)
    n = _check_paired(x, y, minimum=2, names=("x", "y"))
    alpha = _check_alpha(alpha)
    d = x - y
    mean = float(np.mean(d))
    if np.all(d == d[0]):
        low = high = mean
        t_p = 1.0 if mean == 0.0 else 0.0
    else:
        t = sps.ttest_rel(x, y)
        ci = t.confidence_interval(confidence_level=1.0 - alpha)
        low, high, t_p = float(ci.low), float(ci.high), float(t.pvalue)
    w_p = 1.0 if np.all(d == 0) else float(sps.wilcoxon(d).pvalue)
    return PairedDifference(n=n, mean_difference=mean, low=low, high=high, t_pvalue=t_p, wilcoxon_pvalue=w_p,
                            alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------
# Equivalence (TOST)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EquivalenceResult:
    """Two one-sided tests of |difference| < margin. ``equivalent`` iff ``pvalue < alpha``, which is the same
    as the (1 - 2*alpha) interval [low, high] lying inside (-margin, margin)."""

    difference: float   # a - b (rate or mean)
    low: float          # (1 - 2*alpha) interval
    high: float
    p_lower: float      # H0: difference <= -margin
    p_upper: float      # H0: difference >= +margin
    pvalue: float       # max(p_lower, p_upper)
    equivalent: bool
    margin: float
    alpha: float
    n: int
    method: str

    @property
    def ci(self) -> tuple[float, float]:
        return (self.low, self.high)


def tost_paired_proportions(a, b, *, margin: float, alpha: float = 0.05) -> EquivalenceResult:
    """TOST for paired binary outcomes: is |rate(a) - rate(b)| < margin?

    Formula (Bonett & Price 2012 adjusted Wald for paired proportions): with n pairs, a_only = #(a and not b),
    b_only = #(b and not a), let p1 = (a_only + 1)/(n + 2), p2 = (b_only + 1)/(n + 2), d* = p1 - p2 and
    se = sqrt((p1 + p2 - d*^2) / (n + 2)). Then p_lower = 1 - Phi((d* + margin)/se),
    p_upper = Phi((d* - margin)/se), and the interval is d* ± z_{1-alpha} se. The +1 adjustment keeps se > 0
    when there are no discordant pairs, where the plain Wald se would be 0 and claim certainty.
    ``difference`` reports the raw (a_only - b_only)/n; the interval is centred on d*.

    Example: 1000 pairs with 10 discordant each way, margin 0.05: difference 0.0, 90% interval
    [-0.0077, 0.0077], p = 6e-27, equivalent.
    """
    a, b = _as_binary("a", a), _as_binary("b", b)
    n = _check_paired(a, b)
    margin = _check_margin(margin, upper=1.0)
    alpha = _check_alpha(alpha)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p1, p2 = (a_only + 1) / (n + 2), (b_only + 1) / (n + 2)
    d_adj = p1 - p2
    se = math.sqrt((p1 + p2 - d_adj ** 2) / (n + 2))
    p_lower = float(sps.norm.sf((d_adj + margin) / se))
    p_upper = float(sps.norm.cdf((d_adj - margin) / se))
    z = sps.norm.ppf(1.0 - alpha)
    p = max(p_lower, p_upper)
    return EquivalenceResult(difference=(a_only - b_only) / n, low=float(d_adj - z * se), high=float(d_adj + z * se),
                             p_lower=p_lower, p_upper=p_upper, pvalue=p, equivalent=bool(p < alpha),
                             margin=margin, alpha=alpha, n=n, method="bonett-price z")


def tost_paired_means(x, y, *, margin: float, alpha: float = 0.05) -> EquivalenceResult:
    """TOST for continuous paired data: is |mean(x - y)| < margin? Paired t-tests with the null shifted to
    -margin and +margin (as ``statsmodels.stats.weightstats.ttost_paired(x, y, -margin, margin)``).

    Example: ``tost_paired_means(x, y, margin=0.05)`` on 64 decision probabilities whose differences have mean
    -0.013 and standard deviation 0.05 gives a 90% interval [-0.023, -0.003] and p = 7e-8: equivalent within
    ±5 points.
    """
    x, y = _as_real("x", x), _as_real("y", y)
    n = _check_paired(x, y, minimum=2, names=("x", "y"))
    margin = _check_margin(margin)
    alpha = _check_alpha(alpha)
    d = x - y
    mean = float(np.mean(d))
    if np.all(d == d[0]):
        # No spread: the difference is known exactly, and the t statistics are +-inf.
        p_lower = 0.0 if mean > -margin else 1.0
        p_upper = 0.0 if mean < margin else 1.0
        low = high = mean
    else:
        p_lower = float(sps.ttest_1samp(d, -margin, alternative="greater").pvalue)
        p_upper = float(sps.ttest_1samp(d, margin, alternative="less").pvalue)
        half = sps.t.ppf(1.0 - alpha, n - 1) * np.std(d, ddof=1) / math.sqrt(n)
        low, high = mean - half, mean + half
    p = max(p_lower, p_upper)
    return EquivalenceResult(difference=mean, low=float(low), high=float(high), p_lower=p_lower, p_upper=p_upper,
                             pvalue=p, equivalent=bool(p < alpha), margin=margin, alpha=alpha, n=n,
                             method="paired t")


# ---------------------------------------------------------------------------------------------------------------
# Multiple comparisons
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AdjustedPValues:
    """Adjusted p-values in the input order; ``reject[i]`` iff ``adjusted[i] <= alpha``."""

    adjusted: np.ndarray
    reject: np.ndarray
    method: str
    alpha: float


def adjust_pvalues(pvalues: Sequence[float], *, method: str = "holm", alpha: float = 0.05) -> AdjustedPValues:
    """Family-wise (Holm, Bonferroni) or false-discovery-rate (Benjamini-Hochberg, "fdr_bh") adjustment.

    Agrees with ``statsmodels.stats.multitest.multipletests``.

    Example: ``adjust_pvalues([0.01, 0.04, 0.03], method="holm").adjusted`` is [0.03, 0.06, 0.06];
    with "fdr_bh" it is [0.03, 0.04, 0.04].
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D, got shape {p.shape}")
    if np.any(~np.isfinite(p) | (p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[~np.isfinite(p) | (p < 0) | (p > 1)][:5].tolist()}")
    alpha = _check_alpha(alpha)
    m = len(p)
    order = np.argsort(p, kind="stable")
    ps = p[order]
    rank = np.arange(1, m + 1)
    if method == "bonferroni":
        adj_sorted = ps * m
    elif method == "holm":
        # Step-down: the i-th smallest is multiplied by (m - i + 1); adjusted values may not decrease.
        adj_sorted = np.maximum.accumulate(ps * (m - rank + 1))
    elif method == "fdr_bh":
        # Step-up: p_(i) * m / i, then the running minimum taken from the largest p downwards.
        adj_sorted = np.minimum.accumulate((ps * m / rank)[::-1])[::-1]
    else:
        raise ValueError(f"method must be 'holm', 'bonferroni' or 'fdr_bh', got {method!r}")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(adj_sorted, 1.0)
    return AdjustedPValues(adjusted=adjusted, reject=adjusted <= alpha, method=method, alpha=alpha)


def holm_by_name(pvalues: Mapping, *, alpha: float = 0.05) -> dict:
    """Holm-adjusted p-values of one family, keyed as ``pvalues`` is (a table's row names, say).

    Example: ``holm_by_name({"a": 0.01, "b": 0.04, "c": 0.03})`` is ``{"a": 0.03, "b": 0.06, "c": 0.06}``; an
    empty family gives ``{}``.
    """
    if not pvalues:
        return {}
    adjusted = adjust_pvalues(list(pvalues.values()), method="holm", alpha=alpha).adjusted
    return {name: float(p) for name, p in zip(pvalues, adjusted)}


# ---------------------------------------------------------------------------------------------------------------
# Head-to-head judge comparisons
# ---------------------------------------------------------------------------------------------------------------

_PREFERENCES = ("A", "B", "tie", None)


def combine_orders(pref_ab: str | None, pref_ba: str | None) -> str:
    """Combine a judge's verdicts from both presentation orders: "A" or "B" only if preferred in both, else "tie".

    Each argument names the preferred *story* ("A" or "B", already mapped back from position), or "tie"/None
    when the judge declined or its answer could not be parsed (which then cannot count as a win).

    Example: ``combine_orders("A", "A")`` is "A"; ``combine_orders("A", "B")`` is "tie" (position bias).
    """
    for name, value in (("pref_ab", pref_ab), ("pref_ba", pref_ba)):
        if value not in _PREFERENCES:
            raise ValueError(f"{name} must be one of 'A', 'B', 'tie' or None, got {value!r}")
    return pref_ab if pref_ab == pref_ba and pref_ab in ("A", "B") else "tie"


@dataclass(frozen=True, kw_only=True)
class HeadToHead:
    """Win/tie/loss counts with seeded bootstrap intervals on the win rates and on their difference.

    ``pvalue`` is a two-sided exact sign test of a_wins against b_wins (ties dropped); 1.0 if every
    comparison is a tie."""

    a_wins: int
    ties: int
    b_wins: int
    n: int
    a_win: BootstrapResult
    tie: BootstrapResult
    b_win: BootstrapResult
    net: BootstrapResult   # a win rate minus b win rate
    pvalue: float

    def format(self, *, digits: int = 1) -> str:
        def cell(r: BootstrapResult) -> str:
            return f"{_pct(r.estimate, digits)} [{_pct(r.low, digits)}, {_pct(r.high, digits)}]"
        return f"A {cell(self.a_win)} / tie {cell(self.tie)} / B {cell(self.b_win)} (n={self.n})"


def head_to_head(a_wins: int, ties: int, b_wins: int, *, seed: int, n_resamples: int = 10_000,
                 alpha: float = 0.05) -> HeadToHead:
    """Summarise a head-to-head table from its counts (in the table's order: A wins, ties, B wins).

    Resampling the n comparisons with replacement is a multinomial draw of the three counts, done here with
    ``numpy.random.default_rng(seed)``; intervals are percentiles of that distribution.

    Example: ``head_to_head(30, 15, 5, seed=0).format()`` is about
    "A 60.0% [46.0%, 74.0%] / tie 30.0% [18.0%, 44.0%] / B 10.0% [2.0%, 18.0%] (n=50)", sign test p = 2.2e-5.
    """
    counts = [_check_int(k, v) for k, v in (("a_wins", a_wins), ("ties", ties), ("b_wins", b_wins))]
    n = sum(counts)
    if n == 0:
        raise ValueError("head_to_head needs at least one comparison, got a_wins + ties + b_wins = 0")
    seed = _check_seed(seed)
    n_resamples = _check_int("n_resamples", n_resamples, minimum=1)
    alpha = _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.array(counts) / n, size=n_resamples) / n   # (R, 3)
    q = [alpha / 2.0, 1.0 - alpha / 2.0]

    def summary(dist: np.ndarray, estimate: float) -> BootstrapResult:
        low, high = np.quantile(dist, q)
        se = float(np.std(dist, ddof=1)) if n_resamples > 1 else 0.0
        return BootstrapResult(estimate=estimate, low=float(low), high=float(high), standard_error=se,
                               n_resamples=n_resamples, seed=seed, alpha=alpha, method="percentile")

    rates = [c / n for c in counts]
    decisive = counts[0] + counts[2]
    p = 1.0 if decisive == 0 else float(sps.binomtest(counts[0], decisive, 0.5).pvalue)
    return HeadToHead(a_wins=counts[0], ties=counts[1], b_wins=counts[2], n=n,
                      a_win=summary(draws[:, 0], rates[0]), tie=summary(draws[:, 1], rates[1]),
                      b_win=summary(draws[:, 2], rates[2]),
                      net=summary(draws[:, 0] - draws[:, 2], rates[0] - rates[2]), pvalue=min(p, 1.0))


def head_to_head_from_outcomes(outcomes: Iterable[str], *, seed: int, n_resamples: int = 10_000,
                               alpha: float = 0.05) -> HeadToHead:
    """``head_to_head`` from per-comparison outcomes ("A", "B" or "tie", e.g. from ``combine_orders``).

    Example: ``head_to_head_from_outcomes(["A", "tie", "A", "B"], seed=0)`` counts 2 / 1 / 1.
    """
    outcomes = list(outcomes)
    bad = [o for o in outcomes if o not in ("A", "B", "tie")]
    if bad:
        raise ValueError(f"outcomes must be 'A', 'B' or 'tie', got {bad[:3]!r}")
    return head_to_head(outcomes.count("A"), outcomes.count("tie"), outcomes.count("B"), seed=seed,
                        n_resamples=n_resamples, alpha=alpha)
