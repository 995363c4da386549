"""Token sampling: temperature, then nucleus (top-p), then one multinomial draw from a per-call generator.

A generator per call (seeded by the call's ``seed``) makes a call's random draws independent of which other
calls share its forward pass. Its logits are not bit-for-bit independent of them in fp32: a pass over more
calls can reassociate the matmuls (logit differences up to ~4e-5 seen on the embedded model), so a draw that
falls that close to a boundary between two tokens can differ between parallel and solo decoding (exact in fp64,
where the tests check it).
"""

from __future__ import annotations

import math

import torch


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def sample(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw one token id from logits (V,). ``temperature == 0`` is greedy (argmax).

    Every finite temperature > 0 is honoured at its limits: a huge one (above fp32's range included) draws
    uniformly among the tokens not masked with -inf, a tiny one among the tokens of the largest logit. Logits
    holding a NaN, or only -inf, have no distribution: ValueError, whatever the temperature.

    Example: ``sample(torch.tensor([0.0, 2.0]), temperature=0.0, top_p=1.0, generator=make_generator(0))`` -> 1.
    """
    if temperature == 0:
        return _greedy(logits)
    x = logits.detach().float().cpu()  # (V,)
    probs = _tempered(x, temperature)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        keep[0] = True  # the most likely token always: a top_p below fp32's smallest number compares as 0 above
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _greedy(logits: torch.Tensor) -> int:
    # One device->host read per token, as a bare argmax costs: max() returns argmax's index (the first of ties)
    # and propagates NaN, so a NaN or an all -inf row turns the index into -1 on the device.
    top, best = logits.detach().max(dim=-1)
    token = int(torch.where(top > -math.inf, best, -1))
    if token < 0:
        raise _no_distribution(logits, 0.0)
    return token


def _tempered(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(x / temperature) of fp32 logits x (V,) on the CPU, or its limit where x / t leaves fp64's range;
    ValueError for NaN or all -inf logits (checked only off the usual path, where they must surface)."""
    scaled = x / temperature  # fp32, as ever: the draws of earlier runs stay the same
    if torch.isfinite(scaled.max()):  # (max propagates NaN; masked -inf logits stay -inf)
        return torch.softmax(scaled, dim=-1)
    # Off the usual path: NaN or no finite logit, or x / t left fp32's range (a t above fp32's max becomes inf,
    # and -inf / inf is NaN; a tiny t overflows x / t). fp64 holds x / t for any t the Call accepts, bar t -> 0.
    if x.isnan().any() or not x.max() > -math.inf:
        raise _no_distribution(x, temperature)
    scaled = x.double() / temperature
    if torch.isfinite(scaled.max()):
        return torch.softmax(scaled, dim=-1)
    # x / t overflows fp64 too (t below ~1e-300), or a logit is +inf: the limit, the largest-logit tokens alike.
    probs = (x == x.max()).double()
    return probs / probs.sum()


def _no_distribution(logits: torch.Tensor, temperature: float) -> ValueError:
    nans, n = int(logits.isnan().sum()), logits.numel()
    what = (f"the logits hold {nans} NaN among {n} values (an overflow in a low-precision dtype, or broken "
            f"weights?)" if nans else f"all {n} logits are -inf (every token masked)")
    return ValueError(f"cannot sample a token at temperature {temperature}: {what}")
