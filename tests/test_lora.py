"""LoRA adapters on a loaded model: mode, trainability, arguments and damaged folders (tiny fp64 random Llama)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import choreo
from choreo.lora import add_adapter, is_adapted, load_adapter, save_adapter, unload_adapter
from tests.conftest import build_tiny


@pytest.fixture
def model(tokenizer):
    m = build_tiny(tokenizer)
    yield m
    unload_adapter(m)


def _lora(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.hf_model.named_parameters() if "lora_" in n}


def _perturb(model) -> None:
    """Non-zero B matrices, so the adapter (and its dropout) changes the forward pass."""
    with torch.no_grad():
        for name, p in _lora(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def _forced_logits(model) -> torch.Tensor:
    ch = choreo.Choreographer(model)
    q = ch.prefill("Name a colour.", role="user")
    with torch.no_grad():
        out = ch.decode(role="assistant", parents=[q], teacher_tokens=[42, 43, 44], keep_logits=True)
    return out.logits


@pytest.fixture
def saved(model, tmp_path):
    add_adapter(model, rank=4, alpha=8, dropout=0.0, seed=1)
    _perturb(model)
    path = save_adapter(model, tmp_path / "adapter")
    unload_adapter(model)
    return path


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_adding_or_loading_an_adapter_keeps_the_models_mode(model, saved, training):
    model.hf_model.train(training)
    add_adapter(model, rank=4, alpha=8, dropout=0.5)
    assert model.hf_model.training is training
    unload_adapter(model)
    model.hf_model.train(training)
    for trainable in (False, True):
        load_adapter(model, saved, trainable=trainable)
        assert model.hf_model.training is training
        unload_adapter(model)
        model.hf_model.train(training)


def test_a_loaded_model_with_a_dropout_adapter_decodes_deterministically(model):
    """A fresh model is in eval mode; adding an adapter with dropout 0.5 used to switch it to train mode, so two
    identical calls differed."""
    add_adapter(model, rank=4, alpha=8, dropout=0.5)
    _perturb(model)
    first, second = _forced_logits(model), _forced_logits(model)
    assert torch.equal(first, second)
    model.hf_model.train()  # and dropout does act in train mode: the check above can fail
    assert not torch.equal(_forced_logits(model), first)


@pytest.mark.parametrize("before, after", [(True, False), (False, True), (False, False), (True, True)])
def test_reloading_over_an_adapter_honours_trainable(model, saved, before, after):
    load_adapter(model, saved, trainable=before)
    assert all(p.requires_grad is before for p in _lora(model).values())
    load_adapter(model, saved, trainable=after)
    assert _lora(model) and all(p.requires_grad is after for p in _lora(model).values())
    base = [p for n, p in model.hf_model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)  # the base model is never trained


def test_reloading_replaces_the_weights(model, saved):
    load_adapter(model, saved)
    expected = {n: p.detach().clone() for n, p in _lora(model).items()}
    with torch.no_grad():
        for p in _lora(model).values():
            p.add_(1.0)
    load_adapter(model, saved)
    assert all(torch.equal(p, expected[n]) for n, p in _lora(model).items())


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_folder_without_weights_is_refused_naming_them(model, saved, relative, monkeypatch):
    (saved / "adapter_model.safetensors").unlink()
    if relative:  # a relative path that is not a saved adapter must not be taken for a Hub repository id
        monkeypatch.chdir(saved.parent)
    path = saved.name if relative else saved
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json but no weights \(adapter_model.safetensors"):
        load_adapter(model, path)
    assert not is_adapted(model)


def test_cut_off_weights_are_refused_naming_the_file(model, saved):
    weights = saved / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=rf"adapter weights '{weights}' cannot be read \(cut off mid-write\?\)"):
        load_adapter(model, saved)
    assert not is_adapted(model)


@pytest.mark.parametrize("text, message", [
    ('{"r": 4, "lora_alph', "is not valid JSON"),
    ("[4]", "holds list, not a JSON object"),
])
def test_a_damaged_config_is_refused_naming_it(model, saved, text, message):
    (saved / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, saved)
    assert not is_adapted(model)


def test_a_folder_without_a_config_is_refused(model, saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_adapter(model, saved)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": True}, "rank must be an integer >= 1, got True"),
    ({"rank": 4.0}, "rank must be an integer >= 1, got 4.0"),
    ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number > 0"),
    ({"dropout": -0.5}, r"dropout must be a number in \[0, 1\), got -0.5"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"targets": "q_proj"}, "targets must be a non-empty sequence of module names"),
    ({"targets": ()}, "targets must be a non-empty sequence of module names"),
    ({"targets": ("q_proj", "")}, "targets must be a non-empty sequence of module names"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_add_adapter_refuses_bad_arguments_before_touching_the_model(model, kwargs, message):
    args = {"rank": 4, "alpha": 8.0, "dropout": 0.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        add_adapter(model, **args)
    assert not is_adapted(model)


def test_saved_config_is_json_that_load_reads(model, saved):
    """The config the checks read is the file peft wrote (a guard on the format the damaged-file tests assume)."""
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    load_adapter(model, saved)
    assert is_adapted(model)
