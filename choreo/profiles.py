"""The three sizes every reproduction suite runs at, chosen by one option (``--profile``):

- ``smoke``: the embedded model, a handful of instances per cell: minutes in CI, the mechanics and the strongest
  effects only;
- ``small``: the embedded model, enough instances for the claims a 135M model shows, tens of minutes on a CPU;
- ``paper``: the paper's sample sizes and fine-tuning settings, for a GPU and any local checkpoint (``--model``).

A claim a model does not reproduce is reported as such, with its table, never silently skipped. Each suite maps a
profile name to its own sizes, e.g. ``SIZES = {"smoke": 4, "small": 128, "paper": 500}``.
"""

from __future__ import annotations

PROFILES = ("smoke", "small", "paper")
DEFAULT_PROFILE = "smoke"


def check_profile(name: str) -> str:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return name


def pick(sizes: dict, profile: str):
    """The entry of ``sizes`` for ``profile`` (with a clear error when a suite lacks it)."""
    check_profile(profile)
    if profile not in sizes:
        raise KeyError(f"no sizes defined for profile {profile!r} (have {sorted(sizes)})")
    return sizes[profile]
