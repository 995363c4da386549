"""Sampling: temperature, then nucleus (top-p), then one draw from the call's own generator (docs/protocols.md)."""

from __future__ import annotations

import re

import pytest
import torch

from choreo.sampling import make_generator, sample


def _draws(logits, n, **kw):
    gen = make_generator(7)
    return [sample(logits, generator=gen, **kw) for _ in range(n)]


def test_greedy_and_a_tiny_nucleus_take_the_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert _draws(logits, 5, temperature=0.0, top_p=1.0) == [1] * 5
    assert _draws(logits, 50, temperature=1.0, top_p=1e-6) == [1] * 50


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (0.7, 0.9), (2.0, 0.3)])
def test_draws_stay_in_the_nucleus_of_the_tempered_distribution(temperature, top_p):
    """Every draw lies in the set Hugging Face's temperature then top-p warpers keep, and every token of that
    set with at least 1% of its mass is drawn (3,000 draws: each is missed with probability below 1e-13)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].clone()))[0]
    nucleus = set(torch.nonzero(warped > float("-inf"))[:, 0].tolist())
    likely = set(torch.nonzero(warped.softmax(-1) >= 0.01)[:, 0].tolist())
    drawn = set(_draws(logits, 3000, temperature=temperature, top_p=top_p))
    assert likely <= drawn <= nucleus, (sorted(likely), sorted(drawn), sorted(nucleus))


def test_a_seed_replays_its_stream_and_seeds_differ():
    logits = torch.zeros(50)
    assert _draws(logits, 20, temperature=1.0, top_p=1.0) == _draws(logits, 20, temperature=1.0, top_p=1.0)
    other = make_generator(8)
    assert [sample(logits, temperature=1.0, top_p=1.0, generator=other) for _ in range(20)] != \
        _draws(logits, 20, temperature=1.0, top_p=1.0)


@pytest.mark.parametrize("top_p", [1e-45, 1e-46, 1e-300, 5e-324])
def test_a_nucleus_below_fp32s_smallest_number_keeps_the_most_likely_token(top_p):
    """The mass before the top token (0) is compared with top_p in fp32, where a top_p below ~7e-46 is 0: the
    top token is kept all the same (Hugging Face's min_tokens_to_keep = 1), not an empty distribution."""
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert _draws(logits, 20, temperature=1.0, top_p=top_p) == [1] * 20


def test_the_top_token_kept_changes_no_draw_of_an_ordinary_nucleus():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    gen = make_generator(11)
    draws = [sample(logits, temperature=0.8, top_p=0.9, generator=gen) for _ in range(200)]
    probs = (logits / 0.8).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < 0.9  # the rule before the top token was forced in: it holds it here
    nucleus = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = make_generator(11)
    assert draws == [int(torch.multinomial(nucleus, 1, generator=gen)) for _ in range(200)]


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_draws_among_the_max_logit_tokens(temperature):
    """Logits / t overflow to inf below ~1e-38 in fp32: the draw is then the limit t -> 0, among the tokens of the
    largest logit (ties shared), not a NaN distribution."""
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0, 2.0, float("-inf")])
    drawn = set(_draws(logits, 200, temperature=temperature, top_p=1.0))
    assert drawn == {1, 4} if temperature < 1e-38 else drawn <= {1, 4}


MASKED = torch.tensor([0.0, 1.0, float("-inf"), 0.5, float("-inf")])


@pytest.mark.parametrize("temperature", [1e30, 3.5e38, 1e39, 1e300, 1.7e308])
@pytest.mark.parametrize("logits", [MASKED, MASKED[[0, 1, 3]]], ids=["masked", "unmasked"])
def test_a_huge_temperature_draws_uniformly_among_the_unmasked_tokens(temperature, logits):
    """Above fp32's max (~3.4e38) t became inf and -inf / inf NaN, which fell back to the argmax: the limit
    t -> inf is the uniform distribution over the tokens not masked with -inf. 600 seeded draws: each unmasked
    token is drawn 200 +- 3 sigma (35) times (alpha ~3e-3 per token)."""
    drawn = _draws(logits, 600, temperature=temperature, top_p=1.0)
    counts = torch.bincount(torch.tensor(drawn), minlength=len(logits))
    unmasked = torch.isfinite(logits)
    assert (counts[~unmasked] == 0).all(), counts.tolist()
    assert ((counts[unmasked] - 200).abs() <= 35).all(), counts.tolist()


def test_one_unmasked_token_is_the_draw_at_any_temperature():
    logits = torch.tensor([float("-inf"), 3.0, float("-inf")])
    for temperature in (0.0, 1e-300, 1.0, 1e39, 1.7e308):
        assert set(_draws(logits, 20, temperature=temperature, top_p=0.5)) == {1}, temperature


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1.0, 1e39], ids=["greedy", "tiny", "one", "huge"])
@pytest.mark.parametrize("logits,message", [
    ([0.0, float("nan"), 1.0], "1 NaN among 3"),
    ([float("nan")] * 4, "4 NaN among 4"),
    ([float("nan"), float("inf"), float("-inf")], "1 NaN among 3"),  # +inf would win the argmax
    ([float("-inf")] * 3, "all 3 logits are -inf"),
], ids=["one-nan", "all-nan", "nan-beside-inf", "all-masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_with_no_distribution_are_refused(logits, message, temperature, dtype):
    """NaN logits were drawn as the argmax at t = 0 and raised torch's generic multinomial error at t > 0."""
    with pytest.raises(ValueError, match=rf"temperature {re.escape(str(temperature))}: .*{message}"):
        sample(torch.tensor(logits, dtype=dtype), temperature=temperature, top_p=1.0, generator=make_generator(0))


def test_greedy_takes_the_first_of_tied_maxima_and_a_plus_inf_logit():
    assert _draws(torch.tensor([1.0, 3.0, 3.0, -float("inf")]), 3, temperature=0.0, top_p=1.0) == [1] * 3
    assert _draws(torch.tensor([0.0, float("inf"), 1.0, float("inf")]), 3, temperature=0.0, top_p=1.0) == [1] * 3
    assert set(_draws(torch.tensor([0.0, float("inf"), 1.0, float("inf")]), 50, temperature=1.0,
                      top_p=1.0)) == {1, 3}
