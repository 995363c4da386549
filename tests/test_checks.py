"""The shared argument checks, and the configs that use them: one rule for what an integer argument is."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from choreo.checks import check_int, check_int_fields, is_int, is_real
from choreo.workflows.tot import run_condition as tot_condition
from choreo.finetune import FinetuneConfig
from choreo.perf.config import BENCH_PROFILES, BenchConfig
from choreo.perf.shapes import Lengths, make_shape
from choreo.workflows.bsm import BSMConfig
from choreo.workflows.debate import DebateConfig
from choreo.workflows.multiqa import MultiQAConfig
from choreo.workflows.prisoners import GameConfig
from choreo.workflows.tot import DirectConfig, ToTConfig


@pytest.mark.parametrize("value, expected", [
    (0, True), (-3, True), (np.int64(7), True), (np.uint8(1), True),
    (True, False), (False, False), (np.bool_(True), False), (1.0, False), (float("nan"), False), ("3", False),
    (None, False),
])
def test_is_int(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize("value, expected", [
    (0, True), (2.5, True), (np.float32(0.1), True), (float("inf"), True),
    (True, False), ("0.5", False), (None, False), (1j, False),
])
def test_is_real(value, expected):
    assert is_real(value) is expected


@pytest.mark.parametrize("value, kwargs, message", [
    (0, {}, "n must be an integer >= 1, got 0"),
    (True, {}, "n must be an integer >= 1, got True"),
    (2.0, {}, "n must be an integer >= 1, got 2.0"),
    (-1, {"minimum": 0}, "n must be an integer >= 0, got -1"),
    (17, {"maximum": 16}, "n must be an integer in 1..16, got 17"),
    (1, {"minimum": 2, "maximum": 16}, "n must be an integer in 2..16, got 1"),
    (None, {}, "n must be an integer >= 1, got None"),
    (0, {"optional": True}, "n must be an integer >= 1 or None, got 0"),
])
def test_check_int_names_the_rule_and_the_value(value, kwargs, message):
    with pytest.raises(ValueError) as caught:
        check_int("n", value, **kwargs)
    assert str(caught.value) == message


@pytest.mark.parametrize("value, kwargs", [(1, {}), (16, {"maximum": 16}), (0, {"minimum": 0}),
                                           (np.int32(5), {}), (None, {"optional": True})])
def test_check_int_returns_a_python_int(value, kwargs):
    out = check_int("n", value, **kwargs)
    assert out == value and (out is None or type(out) is int)


def test_check_int_fields_names_the_class_and_stores_python_ints():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        rounds: int = 1

        def __post_init__(self):
            check_int_fields(self, ("rounds",))

    assert type(Config(rounds=np.int64(3)).rounds) is int
    with pytest.raises(ValueError, match=r"^Config.rounds must be an integer >= 1, got 0$"):
        Config(rounds=0)


# Every config that takes a count refuses a bool and a float the same way, and stores a numpy integer as a Python
# int: configs are written into results' JSON provenance, which json.dumps refuses for numpy scalars.
CONFIGS = [
    (BSMConfig, "merge_tokens"), (DebateConfig, "rounds"), (DebateConfig, "agents"), (GameConfig, "plan_tokens"),
    (ToTConfig, "voters"), (DirectConfig, "answer_tokens"), (MultiQAConfig, "max_tokens"),
    (FinetuneConfig, "epochs"), (FinetuneConfig, "max_steps"), (BenchConfig, "rounds"), (BenchConfig, "warmup"),
    (Lengths, "content_tokens"),
]


def _make(cls, **fields):
    if cls is BenchConfig:  # no defaults for its lengths and shapes
        return dataclasses.replace(BENCH_PROFILES["smoke"], **fields)
    return cls(**fields)


@pytest.mark.parametrize("cls, field", CONFIGS, ids=[f"{c.__name__}.{f}" for c, f in CONFIGS])
@pytest.mark.parametrize("bad", [True, 3.0])
def test_configs_refuse_non_integer_counts(cls, field, bad):
    with pytest.raises(ValueError, match=rf"{field} must be an integer .*got {bad!r}$"):
        _make(cls, **{field: bad})


@pytest.mark.parametrize("cls, field", CONFIGS, ids=[f"{c.__name__}.{f}" for c, f in CONFIGS])
def test_configs_store_numpy_counts_as_python_ints(cls, field):
    config = _make(cls, **{field: np.int64(2)})
    assert type(getattr(config, field)) is int
    json.dumps({field: getattr(config, field)})


def test_shape_sizes_refuse_a_bool():
    with pytest.raises(ValueError, match=r"size B=True must be an integer in 1\.\.16"):
        make_shape("tree_of_thoughts", B=True, V=2)


SAMPLED = [BSMConfig, DebateConfig, GameConfig, ToTConfig, DirectConfig]
TEMPERATURE, TOP_P = "must be a finite number >= 0", r"must be a number in \(0, 1\]"
BAD_SAMPLING = [(cls, field, bad, rule) for cls in SAMPLED
                for field, bad, rule in [("temperature", -1.0, TEMPERATURE), ("temperature", float("inf"), TEMPERATURE),
                                         ("temperature", float("nan"), TEMPERATURE), ("temperature", True, TEMPERATURE),
                                         ("top_p", 0.0, TOP_P), ("top_p", 1.5, TOP_P)]
                if field in {f.name for f in dataclasses.fields(cls)}]


@pytest.mark.parametrize("cls, field, bad, rule", BAD_SAMPLING,
                         ids=[f"{c.__name__}.{f}={b!r}" for c, f, b, _ in BAD_SAMPLING])
def test_sampling_configs_refuse_what_no_call_could_run(cls, field, bad, rule):
    with pytest.raises(ValueError, match=rf"{cls.__name__}.{field} {rule}, got {bad!r}"):
        cls(**{field: bad})


@pytest.mark.parametrize("condition, config, wanted", [
    ("direct", ToTConfig(), "DirectConfig"), ("baseline", DirectConfig(), "ToTConfig"),
])
def test_tot_refuses_the_other_conditions_config(condition, config, wanted):
    with pytest.raises(ValueError, match=rf"condition '{condition}' takes a {wanted}, got {type(config).__name__}"):
        tot_condition(None, ["1 + 1?"], condition=condition, config=config)
