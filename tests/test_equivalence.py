"""The key invariant: with full serial parents, choreographed == baseline == Hugging Face generate."""

from __future__ import annotations

import pytest
import torch

import choreo
from tests.conftest import tiny_hf
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


# Configs choreo loads beyond the TINY models: RoPE types with frequencies fixed by the config (yarn and llama3 with
# an original context of 32 positions, which the conversation passes) and sliding windows that are off.
ACCEPTED = {
    "mistral-window-none": dict(model_type="mistral", sliding_window=None),
    "qwen2-window-on-no-layer": dict(model_type="qwen2", use_sliding_window=True, sliding_window=16,
                                     max_window_layers=2),
    "qwen3": dict(model_type="qwen3"),
    "rope-linear": dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
    "rope-yarn": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0)),
    "rope-llama3": dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=32,
                                             rope_theta=10000.0)),
}


@pytest.mark.parametrize("variant", list(ACCEPTED), ids=list(ACCEPTED))
def test_accepted_config_variants_match_hf_logits(variant, tokenizer):
    options = dict(ACCEPTED[variant])
    model = choreo.load_model(tiny_hf(tokenizer, options.pop("model_type", "llama"), **options),
                              tokenizer=tokenizer, dtype=torch.float64)
    ex = make_executor("choreographed", model)
    teacher = tokenizer.encode("Cow, pig and hen.", add_special_tokens=False)
    out = ex.decode(role="assistant", parents=prefill_serial(ex), teacher_tokens=teacher, keep_logits=True)
    prompt = serial_prompt_ids(tokenizer)
    assert len(prompt) > 32  # past the yarn and llama3 variants' original context
    ref = hf_logits(model, prompt + teacher)[len(prompt) - 1:-1]
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_rope_frequencies_stay_fp32_however_a_bf16_model_loads(tokenizer, tmp_path, monkeypatch):
    """From a checkpoint directory or in memory, a bf16 model keeps HF's fp32 rotary frequencies, so both give
    the same RoPE (bf16 frequencies turned position 3000 by up to 0.5 radian here) and the same logits."""
    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "cache"))
    tiny_hf(tokenizer).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    from_path = choreo.load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    in_memory = choreo.load_model(tiny_hf(tokenizer), tokenizer=tokenizer, dtype=torch.bfloat16)
    exact = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    for model in (from_path, in_memory):
        rotary = model.hf_model.model.rotary_emb
        assert model.spec.dtype == torch.bfloat16
        assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
        torch.testing.assert_close(model.inv_freq, exact, atol=0, rtol=0)
    logits = []
    for model in (from_path, in_memory):
        ex = choreo.Choreographer(model)
        msg = ex.prefill("Far into the context.", role="user", new_offset=3000)
        teacher = tokenizer.encode("Yes.", add_special_tokens=False)
        logits.append(ex.decode(role="assistant", parents=[msg], teacher_tokens=teacher, keep_logits=True).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_the_models_rope_frequencies_are_its_own_copy(tokenizer):
    """HF may update its buffer in place (longrope does, on a long input): choreo's copy does not follow."""
    model = choreo.load_model(tiny_hf(tokenizer), tokenizer=tokenizer, dtype=torch.float32)
    rotary, before = model.hf_model.model.rotary_emb, model.inv_freq.clone()
    assert model.inv_freq.data_ptr() != rotary.inv_freq.data_ptr()
    rotary.inv_freq.mul_(3.0)
    torch.testing.assert_close(model.inv_freq, before, atol=0, rtol=0)
