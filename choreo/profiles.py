"""The three sizes every reproduction suite runs at (see DESIGN.md "Profiles").

Each suite maps a profile name to its own sizes, e.g. ``SIZES = {"smoke": 4, "small": 128, "paper": 500}``.
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
