"""Token sampling: temperature, then nucleus (top-p), then one multinomial draw from a per-call generator.

A generator per call (seeded by the call's ``seed``) makes a call's samples independent of which other
calls share its forward pass, so parallel and solo decoding draw the same tokens.
"""

from __future__ import annotations

import torch


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def sample(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw one token id from logits (V,). ``temperature == 0`` is greedy (argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
