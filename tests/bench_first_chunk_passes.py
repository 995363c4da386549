"""One engine step of first chunks of very different lengths: one padded pass against ``first_chunk_passes``.

Eight workflow calls start (9-token headers over a cached system prompt) in the step where a 305-token prompt is
prefilled: in one pass every header is padded to the prompt's length (9 x 305 rows for 377 tokens); split, the
prompt takes a pass and the headers another. The embedded model's architecture with random weights (the work of
a pass does not depend on them), fp32 on the CPU, ``Engine.pass_rows`` set to split (the CPU default) or not.

Run: ``pytest tests/bench_first_chunk_passes.py``.
"""

from __future__ import annotations

import pytest
import torch

import choreo

pytestmark = pytest.mark.bench

HEADERS, PROMPT_WORDS = 8, 300


@pytest.fixture(scope="module")
def executor():
    from choreo.model import random_model

    return choreo.Choreographer(random_model(dtype=torch.float32))


@pytest.mark.parametrize("passes", ["one", "split"])
def test_first_chunks_of_different_lengths(benchmark, executor, passes):
    ch = executor
    ch.engine.pass_rows = 1 << 20 if passes == "one" else 64
    system = ch.prefill("Be brief.", role="system")
    calls = [choreo.Call(parents=[system], teacher_tokens=[]) for _ in range(HEADERS)]
    text = " ".join(["word"] * PROMPT_WORDS)
    counted = {}

    def setup():
        jobs = ch.start_decode(calls) + [ch.start_prefill(text, role="user", parents=[system])]
        counted["passes"] = ch.engine.forward_passes
        return (jobs,), {}

    def one_step(jobs):
        ch.engine.step(jobs)
        counted["passes"] = ch.engine.forward_passes - counted["passes"]
        ch.free(*ch.finish(jobs))

    benchmark.pedantic(one_step, setup=setup, rounds=5, warmup_rounds=1)
    assert counted["passes"] == (1 if passes == "one" else 2)
    benchmark.extra_info.update(passes=counted["passes"], headers=HEADERS, prompt_words=PROMPT_WORDS,
                                pass_rows=ch.engine.pass_rows, threads=torch.get_num_threads())
