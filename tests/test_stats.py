"""choreo.stats against independent oracles (statsmodels, hand formulas) and known values.

statsmodels is a test-only dependency: it never runs inside the library, so agreement here is a real check.
Every random draw is seeded; nothing is rerun until green.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

from choreo import stats

# ---------------------------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------------------------

RATE_GRID = sorted({(k, n) for n in (1, 2, 7, 30, 500) for k in (0, 1, n // 2, n - 1, n) if 0 <= k <= n})


@pytest.mark.parametrize("alpha", [0.05, 0.1], ids=lambda a: f"alpha={a}")
@pytest.mark.parametrize("k,n", RATE_GRID, ids=[f"{k}/{n}" for k, n in RATE_GRID])
@pytest.mark.parametrize("method,sm_method", [("wilson", "wilson"), ("exact", "beta")], ids=["wilson", "exact"])
def test_rate_interval_matches_statsmodels(k, n, alpha, method, sm_method):
    r = stats.rate(k, n, alpha=alpha, method=method)
    low, high = proportion_confint(k, n, alpha=alpha, method=sm_method)
    assert (r.low, r.high) == pytest.approx((low, high), abs=1e-9), f"{k}/{n}: ours {r.ci}, statsmodels {(low, high)}"
    assert 0.0 <= r.low <= r.rate <= r.high <= 1.0
    assert r.rate == k / n and r.successes == k and r.n == n


@pytest.mark.parametrize("p,n,expected", [
    (0.783, 500, 0.036), (0.5, 500, 0.0438), (0.95, 500, 0.0191), (0.0, 500, 0.0), (0.5, 100, 0.098),
], ids=["78.3%-n500", "50%-n500", "95%-n500", "0%-n500", "50%-n100"])
def test_paper_normal_half_width(p, n, expected):
    assert stats.normal_half_width(p, n) == pytest.approx(expected, abs=5e-4)
    assert stats.normal_half_width(p, n) == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=1e-4)


def test_rate_format_paper_style():
    r = stats.rate(391, 500)
    assert r.format() == "78.2% ± 3.6%"
    assert r.format_interval() == "78.2% [74.4%, 81.6%]"
    assert stats.rate(0, 50).format_interval() == "0.0% [0.0%, 7.1%]"   # "± 0.0%" is why the interval exists


@pytest.mark.parametrize("k,n,expected", [
    (21, 32, "65.6% ± 16.5% [48.3, 79.6]"),
    (2, 2, "100.0% ± 0.0% [34.2, 100.0]"),     # the paper's "±" collapses at n/n; Wilson does not
    (1, 2, "50.0% ± 69.3% [9.5, 90.5]"),       # the "±" reaches past [0, 100]; Wilson stays inside
    (0, 24, "0.0% ± 0.0% [0.0, 13.8]"),
], ids=["21/32", "2/2", "1/2", "0/24"])
def test_rate_format_both(k, n, expected):
    assert stats.rate(k, n).format_both() == expected


def test_rate_to_json_keeps_counts_and_interval():
    r = stats.rate(9, 32)
    assert r.to_json() == {"successes": 9, "n": 32, "rate": r.rate, "low": r.low, "high": r.high,
                           "method": "wilson", "half_width": r.half_width}


# ---------------------------------------------------------------------------------------------------------------
# Exact McNemar
# ---------------------------------------------------------------------------------------------------------------

MCNEMAR_TABLES = {  # [[both, a_only], [b_only, neither]]
    "no-discordant": [[10, 0], [0, 10]],
    "all-one-way": [[0, 12], [0, 0]],
    "one-each": [[5, 1], [1, 5]],
    "paper-sized": [[380, 9], [31, 80]],
    "large": [[4000, 310], [260, 430]],
    "single-pair": [[0, 1], [0, 0]],
}


@pytest.mark.parametrize("table", MCNEMAR_TABLES.values(), ids=MCNEMAR_TABLES.keys())
def test_mcnemar_matches_statsmodels(table):
    (both, a_only), (b_only, neither) = table
    n = both + a_only + b_only + neither
    ours = stats.mcnemar_exact_counts(a_only=a_only, b_only=b_only, n_pairs=n)
    ref = sm_mcnemar(np.array(table), exact=True)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300), f"{table}: {ours} vs {ref}"
    assert ours.statistic == ref.statistic
    assert ours.difference == pytest.approx((a_only - b_only) / n)
    # Same answer from per-pair outcomes.
    a = np.repeat([1, 1, 0, 0], [both, a_only, b_only, neither])
    b = np.repeat([1, 0, 1, 0], [both, a_only, b_only, neither])
    assert stats.mcnemar_exact(a, b) == ours


def test_mcnemar_known_values():
    assert stats.mcnemar_exact_counts(a_only=0, b_only=0, n_pairs=5).pvalue == 1.0
    assert stats.mcnemar_exact_counts(a_only=0, b_only=12, n_pairs=12).pvalue == pytest.approx(2 * 0.5 ** 12)
    r = stats.mcnemar_exact([True, True, False, True], [False, True, False, False])
    assert (r.a_only, r.b_only, r.pvalue, r.difference) == (2, 0, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paired_normal():
    rng = np.random.default_rng(20260101)
    x = rng.normal(size=80)
    return x + rng.normal(0.3, 1.0, size=80), x


def test_bootstrap_is_deterministic_for_a_seed(paired_normal):
    a, b = paired_normal
    r1 = stats.paired_bootstrap(a, b, seed=7, n_resamples=2000)
    r2 = stats.paired_bootstrap(a, b, seed=7, n_resamples=2000)
    r3 = stats.paired_bootstrap(a, b, seed=8, n_resamples=2000)
    assert r1 == r2
    assert r1.ci != r3.ci
    assert r1.low <= r1.estimate <= r1.high, f"estimate {r1.estimate} outside {r1.ci}"
    assert r1.estimate == pytest.approx(np.mean(a) - np.mean(b))


def test_bootstrap_vectorised_path_equals_slow_reference(paired_normal):
    a, b = paired_normal
    fast = stats.paired_bootstrap(a, b, seed=1, n_resamples=500)
    slow = stats.paired_bootstrap(a, b, seed=1, n_resamples=500, statistic=lambda x, y: np.mean(x) - np.mean(y))
    assert (slow.low, slow.high, slow.standard_error) == pytest.approx((fast.low, fast.high, fast.standard_error),
                                                                        rel=1e-12)


def test_bootstrap_resamples_pairs_not_arms():
    # a == b + 1 exactly: resampling pairs keeps every difference at 1, so the interval is the single point 1.
    # Resampling the arms independently would give a wide interval.
    b = np.arange(30, dtype=float)
    r = stats.paired_bootstrap(b + 1, b, seed=0, n_resamples=300)
    assert r.ci == pytest.approx((1.0, 1.0))


def test_bootstrap_bca_is_scipys_with_the_same_seeded_generator(paired_normal):
    a, b = paired_normal
    bca = stats.paired_bootstrap(a, b, seed=3, n_resamples=2000, method="BCa")
    assert bca == stats.paired_bootstrap(a, b, seed=3, n_resamples=2000, method="BCa")
    ref = sps.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis), paired=True,
                        vectorized=True, n_resamples=2000, confidence_level=0.95, method="BCa",
                        rng=np.random.default_rng(3))
    assert (bca.low, bca.high, bca.standard_error) == (ref.confidence_interval.low, ref.confidence_interval.high,
                                                       ref.standard_error)
    pct = stats.paired_bootstrap(a, b, seed=3, n_resamples=2000)
    assert bca.low <= bca.estimate <= bca.high
    assert bca.ci != pct.ci and bca.ci == pytest.approx(pct.ci, abs=0.05), f"BCa {bca.ci} vs percentile {pct.ci}"
    with pytest.raises(ValueError, match="BCa interval is undefined"):
        stats.paired_bootstrap(np.ones(10), np.zeros(10), seed=0, n_resamples=200, method="BCa")


def test_bootstrap_coverage_on_a_known_case():
    # 200 datasets of 60 pairs with true mean difference 0.5; a 95% interval should cover it about 95% of
    # the time (percentile bootstrap undercovers slightly at n = 60). Accept if the coverage count is not
    # rejected at alpha = 0.001 against 0.94 (two-sided binomial test); seeded, so the outcome is fixed.
    rng = np.random.default_rng(12345)
    covered = 0
    for i in range(200):
        y = rng.normal(size=60)
        x = y + 0.5 + rng.standard_t(5, size=60)
        r = stats.paired_bootstrap(x, y, seed=i, n_resamples=400)
        covered += r.low <= 0.5 <= r.high
    p = sps.binomtest(covered, 200, 0.94).pvalue
    assert p > 0.001, f"coverage {covered}/200 = {covered / 200:.3f}, binomial p vs 0.94 = {p:.2g}"


# ---------------------------------------------------------------------------------------------------------------
# Continuous paired differences
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.05, 0.01], ids=lambda a: f"alpha={a}")
def test_paired_mean_difference_matches_statsmodels(paired_normal, alpha):
    x, y = paired_normal
    r = stats.paired_mean_difference(x, y, alpha=alpha)
    ref = DescrStatsW(x - y)
    assert r.mean_difference == pytest.approx(ref.mean)
    assert r.ci == pytest.approx(ref.tconfint_mean(alpha=alpha), rel=1e-9)
    assert r.t_pvalue == pytest.approx(ref.ttest_mean(0.0)[1], rel=1e-9)
    assert r.wilcoxon_pvalue == pytest.approx(sps.wilcoxon(x - y).pvalue)
    assert r.wilcoxon_pvalue < 0.05 and r.t_pvalue < 0.05   # true shift 0.3 with n = 80


def test_paired_mean_difference_identical_arms():
    x = np.linspace(0.1, 0.9, 12)
    r = stats.paired_mean_difference(x, x)
    assert (r.mean_difference, r.low, r.high, r.t_pvalue, r.wilcoxon_pvalue) == (0.0, 0.0, 0.0, 1.0, 1.0)


def test_a_constant_nonzero_difference_is_known_exactly():
    """Every pair differs by the same 0.25: no spread, so the t interval is the point 0.25 and the t-test rejects
    0 outright; TOST with margin 0.1 is certain the difference lies beyond it (either sign), and certain of
    equivalence for identical arms. Exact answers, so no warning about the t statistic's precision."""
    import warnings

    x = np.arange(6) * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = stats.paired_mean_difference(x + 0.25, x)
        above, below, same = (stats.tost_paired_means(x + shift, x, margin=0.1) for shift in (0.25, -0.25, 0.0))
    assert (r.n, r.mean_difference, r.ci, r.t_pvalue) == (6, 0.25, (0.25, 0.25), 0.0)
    assert r.wilcoxon_pvalue == pytest.approx(2 / 2 ** 6)  # exact signed-rank: all six signs positive, two-sided
    assert (above.difference, above.ci, above.p_lower, above.p_upper) == (0.25, (0.25, 0.25), 0.0, 1.0)
    assert above.pvalue == 1.0 and not above.equivalent
    assert (below.ci, below.p_lower, below.p_upper, below.pvalue, below.equivalent) == ((-0.25, -0.25), 1.0, 0.0,
                                                                                        1.0, False)
    assert (same.difference, same.ci, same.p_lower, same.p_upper) == (0.0, (0.0, 0.0), 0.0, 0.0)
    assert same.pvalue == 0.0 and same.equivalent


# ---------------------------------------------------------------------------------------------------------------
# Equivalence (TOST)
# ---------------------------------------------------------------------------------------------------------------

TOST_CASES = {  # name: (seed, n, true shift, noise sd, margin)
    "equivalent": (1, 64, -0.013, 0.05, 0.05),
    "shifted": (2, 64, 0.08, 0.05, 0.05),
    "noisy": (3, 20, 0.0, 0.3, 0.05),
    "tiny-n": (4, 3, 0.01, 0.02, 0.1),
}


@pytest.mark.parametrize("case", TOST_CASES.values(), ids=TOST_CASES.keys())
def test_tost_means_matches_statsmodels(case):
    seed, n, shift, sd, margin = case
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.8, 1.0, size=n)
    x = y + rng.normal(shift, sd, size=n)
    r = stats.tost_paired_means(x, y, margin=margin)
    p, (_, p_lo, _), (_, p_up, _) = ttost_paired(x, y, -margin, margin)
    assert (r.pvalue, r.p_lower, r.p_upper) == pytest.approx((p, p_lo, p_up), rel=1e-9)
    inside = -margin < r.low and r.high < margin
    assert r.equivalent == inside == (r.pvalue < 0.05), f"{r}"
    assert r.ci == pytest.approx(DescrStatsW(x - y).tconfint_mean(alpha=0.10), rel=1e-9)


def test_tost_means_verdicts():
    assert stats.tost_paired_means(*_tost_data("equivalent"), margin=0.05).equivalent
    assert not stats.tost_paired_means(*_tost_data("shifted"), margin=0.05).equivalent
    assert not stats.tost_paired_means(*_tost_data("noisy"), margin=0.05).equivalent


def _tost_data(name):
    seed, n, shift, sd, _ = TOST_CASES[name]
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.8, 1.0, size=n)
    return y + rng.normal(shift, sd, size=n), y


def _pairs(both, a_only, b_only, neither):
    return (np.repeat([1, 1, 0, 0], [both, a_only, b_only, neither]).astype(bool),
            np.repeat([1, 0, 1, 0], [both, a_only, b_only, neither]).astype(bool))


def test_tost_proportions_clearly_equivalent():
    r = stats.tost_paired_proportions(*_pairs(900, 10, 10, 80), margin=0.05)
    assert r.equivalent and r.pvalue < 1e-10, f"{r}"
    assert r.difference == 0.0 and -0.05 < r.low < 0 < r.high < 0.05


def test_tost_proportions_clearly_not_equivalent():
    r = stats.tost_paired_proportions(*_pairs(300, 60, 10, 130), margin=0.05)   # difference +0.1
    assert not r.equivalent and r.pvalue > 0.5, f"{r}"
    assert r.difference == pytest.approx(0.1)
    # A large p in a difference test is not equivalence: too few pairs to say either way.
    small = stats.tost_paired_proportions(*_pairs(20, 1, 1, 8), margin=0.05)
    assert not small.equivalent and stats.mcnemar_exact(*_pairs(20, 1, 1, 8)).pvalue == 1.0


def test_tost_proportions_hand_formula():
    # Bonett-Price: n = 50, a_only = 4, b_only = 1 -> p1 = 5/52, p2 = 2/52.
    r = stats.tost_paired_proportions(*_pairs(30, 4, 1, 15), margin=0.1, alpha=0.05)
    p1, p2 = 5 / 52, 2 / 52
    d = p1 - p2
    se = math.sqrt((p1 + p2 - d * d) / 52)
    assert r.p_lower == pytest.approx(1 - sps.norm.cdf((d + 0.1) / se), rel=1e-9)
    assert r.p_upper == pytest.approx(sps.norm.cdf((d - 0.1) / se), rel=1e-9)
    assert r.ci == pytest.approx((d - 1.6448536 * se, d + 1.6448536 * se), rel=1e-6)
    assert r.difference == pytest.approx(3 / 50)


def test_tost_proportions_no_discordant_pairs_is_not_certain():
    r = stats.tost_paired_proportions(*_pairs(10, 0, 0, 0), margin=0.05)
    assert r.high - r.low > 0 and not r.equivalent, f"{r}"   # 10 agreeing pairs prove little


@pytest.mark.parametrize("margin", [0, -0.1, float("nan"), 1.0], ids=["zero", "negative", "nan", "one"])
def test_tost_proportions_bad_margin(margin):
    with pytest.raises(ValueError, match=r"margin must be .*got"):
        stats.tost_paired_proportions([1, 0], [1, 1], margin=margin)


@pytest.mark.parametrize("margin", [0, -0.5], ids=["zero", "negative"])
def test_tost_means_bad_margin(margin):
    with pytest.raises(ValueError, match=rf"margin must be .*got {margin}"):
        stats.tost_paired_means([1.0, 2.0], [1.0, 2.5], margin=margin)


# ---------------------------------------------------------------------------------------------------------------
# Multiple comparisons
# ---------------------------------------------------------------------------------------------------------------

METHODS = ["holm", "bonferroni", "fdr_bh"]


def _check_against_multipletests(p, method, alpha=0.05):
    ours = stats.adjust_pvalues(p, method=method, alpha=alpha)
    reject, corrected, _, _ = multipletests(p, alpha=alpha, method=method)
    np.testing.assert_allclose(ours.adjusted, corrected, rtol=1e-12, atol=1e-15, err_msg=f"{method} on {p}")
    away = np.abs(corrected - alpha) > 1e-12   # reject flags may differ by rounding exactly at the boundary
    np.testing.assert_array_equal(ours.reject[away], reject[away], err_msg=f"{method} on {p}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(5))
def test_adjust_pvalues_random_vectors(method, seed):
    rng = np.random.default_rng(seed)
    m = rng.integers(1, 40)
    p = np.where(rng.random(m) < 0.3, rng.uniform(0, 0.01, m), rng.uniform(0, 1, m))
    _check_against_multipletests(p, method)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=40, deadline=None)
@given(p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=25))
def test_adjust_pvalues_hypothesis(method, p):
    _check_against_multipletests(np.array(p), method)


@pytest.mark.parametrize("method", METHODS)
def test_adjust_pvalues_awkward_vectors(method):
    for p in ([0.05], [0.0, 1.0], [0.02, 0.02, 0.02], [1.0, 1.0, 0.0, 0.01], [0.01, 0.04, 0.03]):
        _check_against_multipletests(np.array(p), method)
    assert stats.adjust_pvalues([], method=method).adjusted.shape == (0,)


def test_adjust_pvalues_worked_example():
    assert stats.adjust_pvalues([0.01, 0.04, 0.03]).adjusted == pytest.approx([0.03, 0.06, 0.06])
    assert stats.adjust_pvalues([0.01, 0.04, 0.03], method="fdr_bh").adjusted == pytest.approx([0.03, 0.04, 0.04])


@settings(max_examples=40, deadline=None)
@given(p=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12))
def test_holm_by_name_keeps_each_name_with_its_own_adjusted_p(p):
    names = [f"row {i}" for i in reversed(range(len(p)))]  # keys not in the p-values' order
    holm = stats.holm_by_name(dict(zip(names, p)))
    assert list(holm) == names
    if p:
        _, corrected, _, _ = multipletests(np.array(p), method="holm")
        assert [holm[n] for n in names] == pytest.approx(corrected.tolist(), abs=1e-12)
        assert all(type(v) is float for v in holm.values())  # JSON-ready
    assert stats.holm_by_name({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


# ---------------------------------------------------------------------------------------------------------------
# Head-to-head judge table
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ab,ba,expected", [
    ("A", "A", "A"), ("B", "B", "B"), ("A", "B", "tie"), ("B", "A", "tie"),
    ("A", "tie", "tie"), ("tie", "tie", "tie"), ("A", None, "tie"), (None, None, "tie"),
])
def test_combine_orders(ab, ba, expected):
    assert stats.combine_orders(ab, ba) == expected


def test_head_to_head_counts_and_intervals():
    h = stats.head_to_head(30, 15, 5, seed=0, n_resamples=4000)
    assert (h.a_wins, h.ties, h.b_wins, h.n) == (30, 15, 5, 50)
    assert (h.a_win.estimate, h.tie.estimate, h.b_win.estimate) == (0.6, 0.3, 0.1)
    assert h.net.estimate == pytest.approx(0.5)
    for part in (h.a_win, h.tie, h.b_win, h.net):
        assert part.low <= part.estimate <= part.high, f"{h.format()}"
    # The percentile interval of a multinomial proportion is close to the Wald interval at n = 50.
    assert h.a_win.ci == pytest.approx((0.6 - 1.96 * math.sqrt(0.24 / 50), 0.6 + 1.96 * math.sqrt(0.24 / 50)),
                                       abs=0.03)
    assert h.pvalue == pytest.approx(sps.binomtest(30, 35).pvalue)
    assert h == stats.head_to_head(30, 15, 5, seed=0, n_resamples=4000)
    # Another seed gives another bootstrap distribution (its discrete quantiles may coincide, its spread not).
    assert h.a_win.standard_error != stats.head_to_head(30, 15, 5, seed=1, n_resamples=4000).a_win.standard_error


def test_head_to_head_from_outcomes():
    verdicts = [stats.combine_orders(x, y) for x, y in [("A", "A"), ("A", "B"), ("B", "B"), ("A", "A"), (None, "A")]]
    h = stats.head_to_head_from_outcomes(verdicts, seed=3, n_resamples=500)
    assert h == stats.head_to_head(2, 2, 1, seed=3, n_resamples=500)
    assert stats.head_to_head(0, 4, 0, seed=0, n_resamples=100).pvalue == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Errors name the bad value and the rule
# ---------------------------------------------------------------------------------------------------------------

ERRORS = {
    "rate-n-zero": (lambda: stats.rate(0, 0), ValueError, r"n must be >= 1, got 0"),
    "rate-k-over-n": (lambda: stats.rate(6, 5), ValueError, r"successes must be <= n, got successes=6 > n=5"),
    "rate-negative": (lambda: stats.rate(-1, 5), ValueError, r"successes must be >= 0, got -1"),
    "rate-float": (lambda: stats.rate(2.5, 5), TypeError, r"successes must be an integer, got 2.5"),
    "rate-method": (lambda: stats.rate(1, 5, method="wald"), ValueError, r"'wilson' or 'exact', got 'wald'"),
    "rate-alpha": (lambda: stats.rate(1, 5, alpha=1.5), ValueError, r"alpha must be .* got 1.5"),
    "mcnemar-lengths": (lambda: stats.mcnemar_exact([1, 0, 1], [1, 0, 1, 1]), ValueError,
                        r"len\(a\)=3 and len\(b\)=4"),
    "mcnemar-values": (lambda: stats.mcnemar_exact([1, 2], [1, 0]), ValueError, r"booleans or 0/1, got .*\[2\]"),
    "mcnemar-counts": (lambda: stats.mcnemar_exact_counts(a_only=6, b_only=5, n_pairs=10), ValueError,
                       r"a_only \+ b_only = 11 > n_pairs = 10"),
    "bootstrap-seed": (lambda: stats.paired_bootstrap([1, 2], [1, 2], seed=None), TypeError,
                       r"seed must be an integer .* got None"),
    "bootstrap-lengths": (lambda: stats.paired_bootstrap([1, 2], [1], seed=0), ValueError,
                          r"len\(a\)=2 and len\(b\)=1"),
    "bootstrap-nan": (lambda: stats.paired_bootstrap([1, np.nan], [1, 2], seed=0), ValueError,
                      r"a must be finite, got non-finite values at indices \[1\]"),
    "bootstrap-method": (lambda: stats.paired_bootstrap([1, 2], [1, 2], seed=0, method="bca"), ValueError,
                         r"'percentile' or 'BCa', got 'bca'"),
    "paired-too-few": (lambda: stats.paired_mean_difference([1.0], [2.0]), ValueError,
                       r"at least 2 pair\(s\), got 1"),
    "adjust-range": (lambda: stats.adjust_pvalues([0.1, 1.2]), ValueError, r"\[0, 1\], got \[1.2\]"),
    "adjust-method": (lambda: stats.adjust_pvalues([0.1], method="BH"), ValueError, r"got 'BH'"),
    "combine-value": (lambda: stats.combine_orders("first", "A"), ValueError, r"pref_ab must be .* got 'first'"),
    "h2h-empty": (lambda: stats.head_to_head(0, 0, 0, seed=0), ValueError, r"a_wins \+ ties \+ b_wins = 0"),
    "h2h-outcome": (lambda: stats.head_to_head_from_outcomes(["A", "draw"], seed=0), ValueError, r"got \['draw'\]"),
}


@pytest.mark.parametrize("call,exc,message", ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_the_bad_value(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_errors_name_the_parameters_of_the_function_called():
    with pytest.raises(ValueError, match=r"x and y must be paired .* len\(x\)=3 and len\(y\)=2"):
        stats.paired_mean_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"x and y must be paired"):
        stats.tost_paired_means([1, 2, 3], [1, 2], margin=0.1)
    with pytest.raises(ValueError, match=r"a and b must be paired"):
        stats.mcnemar_exact([1, 0, 1], [1, 0])


@pytest.mark.parametrize("values", [["1", "2.5"], [1, None], ["a", "b"]])
def test_numbers_given_as_text_are_refused_not_parsed(values):
    with pytest.raises(ValueError, match="x must hold numbers"):
        stats.paired_mean_difference(values, [1, 2])


@pytest.mark.parametrize("p", ["0.5", True, None, 1.5, -0.1])
def test_normal_half_width_names_a_bad_proportion(p):
    with pytest.raises(ValueError, match=f"p must be a proportion in \\[0, 1\\], got {re.escape(repr(p))}"):
        stats.normal_half_width(p, 3)
