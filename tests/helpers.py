"""Small builders shared by the engine tests."""

from __future__ import annotations

import torch

import choreo

CONVERSATION = [
    ("system", "You are a careful assistant. Keep answers short."),
    ("user", "Name three primary colours."),
    ("assistant", "Red, yellow and blue."),
    ("user", "And three farm animals?"),
]


def make_executor(kind: str, model, **kw):
    if kind == "choreographed":
        return choreo.Choreographer(model, **kw)
    if kind == "reference":
        return choreo.Choreographer(model, attention="reference", **kw)
    if kind == "baseline":
        return choreo.Baseline(model, **kw)
    if kind == "baseline-reuse":
        return choreo.Baseline(model, prefix_reuse=True, **kw)
    raise ValueError(kind)


def prefill_serial(executor, conversation=CONVERSATION):
    """Each message attends to the whole preceding conversation at linear positions."""
    msgs = []
    for role, text in conversation:
        msgs.append(executor.prefill(text, role=role, parents=list(msgs)))
    return msgs


def serial_prompt_ids(tokenizer, conversation=CONVERSATION) -> list[int]:
    chat = [{"role": r, "content": t} for r, t in conversation]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.spec.device)
    out = model.hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=model.tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=0,
    )[0, len(prompt_ids):].tolist()
    eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return out[: out.index(eos)] if eos in out else out


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.hf_model(torch.tensor([ids], device=model.spec.device)).logits[0].float()
