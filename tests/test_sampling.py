"""Sampling: temperature, then nucleus (top-p), then one draw from the call's own generator (docs/protocols.md)."""

from __future__ import annotations

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


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_draws_among_the_max_logit_tokens(temperature):
    """Logits / t overflow to inf below ~1e-38 in fp32: the draw is then the limit t -> 0, among the tokens of the
    largest logit (ties shared), not a NaN distribution."""
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0, 2.0, float("-inf")])
    drawn = set(_draws(logits, 200, temperature=temperature, top_p=1.0))
    assert drawn == {1, 4} if temperature < 1e-38 else drawn <= {1, 4}
