"""The tox matrix checks itself: each ``torch<version>`` env runs the torch its name promises.

tox sets ``TOX_ENV_NAME``; the matrix envs also set ``CHOREO_EXPECT_TORCH`` (e.g. ``2.14.1``). Outside tox,
or in an env that promises no version, the checks skip with the reason.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

ENV = os.environ.get("TOX_ENV_NAME", "")
EXPECT = os.environ.get("CHOREO_EXPECT_TORCH")


def env_name_for(version: str) -> str:
    """The tox env name that promises a torch release: '2.14.1' -> 'torch2141', '2.13.0' -> 'torch213'."""
    parts = version.split(".")
    while len(parts) > 2 and parts[-1] == "0":
        parts.pop()
    return "torch" + "".join(parts)


def test_env_name_rule():
    assert env_name_for("2.13.0") == "torch213"
    assert env_name_for("2.14.1") == "torch2141"
    assert env_name_for("2.10.0") == "torch210"


@pytest.mark.skipif(not re.fullmatch(r"torch\d+", ENV), reason=f"not a torch matrix env (TOX_ENV_NAME={ENV!r})")
def test_matrix_env_promises_a_version():
    assert EXPECT, f"tox env {ENV!r} must set CHOREO_EXPECT_TORCH to the torch release it installs"
    assert env_name_for(EXPECT) == ENV, f"tox env {ENV!r} sets CHOREO_EXPECT_TORCH={EXPECT!r}"


@pytest.mark.skipif(not EXPECT, reason="CHOREO_EXPECT_TORCH is not set (the tox matrix envs set it)")
def test_torch_is_the_promised_one():
    installed = torch.__version__.split("+")[0]
    assert installed == EXPECT, f"env {ENV!r} promises torch {EXPECT} but runs torch {torch.__version__}"
