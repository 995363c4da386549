"""The key invariant: with full serial parents, choreographed == baseline == Hugging Face generate."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import CONVERSATION, hf_greedy, hf_logits, make_executor, prefill_serial, serial_prompt_ids

EXECUTORS = ["choreographed", "reference", "baseline", "baseline-reuse"]


@pytest.mark.parametrize("kind", EXECUTORS)
def test_tiny_models_match_hf_generate(kind, tiny):
    ex = make_executor(kind, tiny)
    msgs = prefill_serial(ex)
    out = ex.decode(role="assistant", parents=msgs, max_tokens=12)
    expected = hf_greedy(tiny, serial_prompt_ids(tiny.tokenizer), 12)
    assert out.tokens == expected


@pytest.mark.parametrize("kind", EXECUTORS)
def test_tiny_models_logits_match_hf(kind, tiny):
    ex = make_executor(kind, tiny)
    msgs = prefill_serial(ex)
    teacher = tiny.tokenizer.encode("Cow, pig and hen.", add_special_tokens=False)
    out = ex.decode(role="assistant", parents=msgs, teacher_tokens=teacher, keep_logits=True)
    prompt = serial_prompt_ids(tiny.tokenizer)
    ref = hf_logits(tiny, prompt + teacher)[len(prompt) - 1:-1]  # rows predicting each teacher token
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)  # fp64 math, fp32 logits


@pytest.mark.model
@pytest.mark.parametrize("kind", ["choreographed", "baseline"])
def test_embedded_model_matches_hf_generate(kind, model):
    ex = make_executor(kind, model)
    out = ex.decode(role="assistant", parents=prefill_serial(ex), max_tokens=16)
    assert out.tokens == hf_greedy(model, serial_prompt_ids(model.tokenizer), 16)
    assert out.text and out.start == sum(m.length for m in ex.messages if m is not out)


@pytest.mark.model
def test_embedded_model_logits_within_fp32_tolerance(model):
    ch, bl = make_executor("choreographed", model), make_executor("baseline", model)
    teacher = model.tokenizer.encode("Cows, pigs and hens.", add_special_tokens=False)
    outs = [ex.decode(role="assistant", parents=prefill_serial(ex), teacher_tokens=teacher, keep_logits=True)
            for ex in (ch, bl)]
    prompt = serial_prompt_ids(model.tokenizer)
    ref = hf_logits(model, prompt + teacher)[len(prompt) - 1:-1]
    for out in outs:
        torch.testing.assert_close(out.logits, ref, atol=2e-3, rtol=1e-4)


def test_serial_rendering_equals_chat_template(tokenizer):
    from choreo.chat import ChatFormat

    fmt = ChatFormat(tokenizer)
    chat = [{"role": r, "content": t} for r, t in CONVERSATION]
    whole = tokenizer.encode(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
    assert sum((fmt.encode(t, r) for r, t in CONVERSATION), []) == whole
