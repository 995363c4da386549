"""Token sampling: temperature, then nucleus (top-p), then one multinomial draw from a per-call generator.

A generator per call (seeded by the call's ``seed``) makes a call's random draws independent of which other
calls share its forward pass. Its logits are not bit-for-bit independent of them in fp32: a pass over more
calls can reassociate the matmuls (logit differences up to ~4e-5 seen on the embedded model), so a draw that
falls that close to a boundary between two tokens can differ between parallel and solo decoding (exact in fp64,
where the tests check it).
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
    x = logits.detach().float().cpu()
    scaled = x / temperature
    if torch.isfinite(scaled.max()):  # (masked -inf logits stay -inf)
        probs = torch.softmax(scaled, dim=-1)
    else:  # a temperature so small that x / t overflows in fp32: its limit t -> 0, the max-logit tokens alike
        probs = (x == x.max()).float()
        probs /= probs.sum()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
