"""LoRA adapters on a loaded model: add, save, load, unload, and switch them off for a scope.

peft injects its LoRA layers into the Hugging Face ``q_proj``/``k_proj``/``v_proj``/``o_proj`` modules, and
``Model.forward`` calls those modules directly, so an adapter applies to every executor without further work.
``Model.hf_model`` is replaced in place by the ``PeftModel`` that wraps it (and restored by ``unload_adapter``).

The engine calls ``adapter_scope`` around every forward pass: the baseline executor runs with the adapter
off (ordinary prompting of the base model), the choreographed executor with whatever state the model is in.
peft is imported only when a model actually carries an adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .checks import check_int, is_real

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_adapted(model) -> bool:
    """Whether ``model.hf_model`` is wrapped by peft."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model.hf_model, PeftModel)


def lora_layers(model) -> list:
    """The peft tuner layers injected into the model's modules (empty without an adapter)."""
    if not is_adapted(model):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.hf_model.modules() if isinstance(m, BaseTunerLayer)]


def check_no_adapter(model) -> None:
    """Refuse (ValueError) a model that already carries an adapter: what adds its own would mix or remove it."""
    if is_adapted(model):
        raise ValueError("the model already carries an adapter; unload_adapter(model) first")


def add_adapter(model, *, rank: int, alpha: float, dropout: float, targets: Sequence[str] = DEFAULT_TARGETS,
                seed: int = 0):
    """Wrap ``model.hf_model`` with a fresh, trainable LoRA adapter (B = 0: the model is unchanged at first).

    The model keeps its train/eval mode (a loaded model is in eval mode: LoRA dropout is off until training turns
    it on). Example: ``add_adapter(model, rank=64, alpha=32, dropout=0.05)``; then ``trainable_parameters(model)``.
    """
    from peft import LoraConfig, get_peft_model

    check_int("rank", rank)
    if not is_real(alpha) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0 (the LoRA scale is alpha / rank), got {alpha!r}")
    if not is_real(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty sequence of module names (e.g. ('q_proj', 'v_proj')), "
                         f"got {targets!r}")
    check_int("seed", seed, minimum=0)
    check_no_adapter(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    training = model.hf_model.training
    with torch.random.fork_rng(devices=[]), _peft_quietly():
        torch.manual_seed(seed)
        model.hf_model = get_peft_model(model.hf_model, config)
    model.hf_model.train(training)  # peft switches the model to train mode
    return model.hf_model


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft 0.21 asks transformers 5 for ``is_gradient_checkpointing`` at every adapter it wraps, and transformers
    warns that the name is deprecated: a warning about peft's call, not the user's, so it is dropped here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.hf_model.parameters() if p.requires_grad]


def save_adapter(model, path: str | Path) -> Path:
    """Write the adapter weights and config (peft format) to ``path``."""
    if not is_adapted(model):
        raise ValueError("the model carries no adapter to save")
    path = Path(path)
    model.hf_model.save_pretrained(path)
    return path


def load_adapter(model, path: str | Path, *, trainable: bool = False):
    """Wrap ``model.hf_model`` in place with the adapter saved at ``path`` (replacing weights of one already there).

    ``trainable``: whether the adapter's weights take gradients, also when they replace those of an adapter the
    model carries. The model keeps its train/eval mode. A folder without the config or the weights, or with a file
    that cannot be read (cut off mid-write), is refused naming the file.

    Example::

        load_adapter(model, "runs/blockage/best")
        Choreographer(model).decode(...)        # with the adapter
        with adapter_disabled(model): ...       # without it
    """
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = Path(path).absolute()  # a relative path that is not a saved adapter would be looked up on the Hub
    saved, weights_file = _adapter_files(path)
    try:
        weights = load_peft_weights(str(path), device=str(model.spec.device))
    except Exception as error:  # safetensors' and torch's errors name neither the file nor the cause
        raise ValueError(f"adapter weights {str(weights_file)!r} cannot be read (cut off mid-write?): "
                         f"{type(error).__name__}: {error}") from error
    training = model.hf_model.training
    if is_adapted(model):  # same shape of adapter, new weights: anything else would mix two adapters silently
        mine, theirs = _layout(model.hf_model.peft_config["default"].to_dict()), _layout(saved)
        if mine != theirs:
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
            raise ValueError(f"adapter {str(path)!r} differs from the adapter the model carries in "
                             f"{', '.join(f'{k} ({a!r} against {b!r})' for k, (a, b) in diff.items())}: "
                             f"unload_adapter(model) first")
        _check_same_weights(model, weights, path)
        set_peft_model_state_dict(model.hf_model, weights)
        for p in _lora_parameters(model).values():
            p.requires_grad_(trainable)
    else:
        base = model.hf_model
        try:
            with _peft_quietly(), warnings.catch_warnings():  # missing keys: the check below refuses them
                warnings.filterwarnings("ignore", message="Found missing adapter keys")
                model.hf_model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
            # peft loads the tensors that match and leaves the rest at their initial values (B = 0: unadapted)
            _check_same_weights(model, weights, path, hint="is it an adapter of this model?")
        except BaseException:  # e.g. an adapter of another architecture: peft injected its layers, then failed
            _strip_lora(base)
            model.hf_model = base
            raise
    model.hf_model.to(model.spec.device)
    model.hf_model.train(training)
    return model.hf_model


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names, in the order it reads them


def _adapter_files(path: Path) -> tuple[dict, Path]:
    """The saved adapter's config and its weights file, or an error naming what is missing or unreadable."""
    config = path / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"adapter path {str(path)!r} has no adapter_config.json (not a saved adapter)")
    try:
        saved = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"adapter config {str(config)!r} is not valid JSON (cut off mid-write?): {error}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"adapter config {str(config)!r} holds {type(saved).__name__}, not a JSON object")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"adapter path {str(path)!r} has adapter_config.json but no weights "
                                f"({' or '.join(WEIGHT_FILES)})")
    return saved, weights


# What must agree for saved weights to load over a model's adapter as the same adapter (the rest of the config,
# e.g. the base model's name or peft's version, does not change what the weights compute).
_LAYOUT = {"r": None, "lora_alpha": None, "target_modules": [], "use_rslora": False, "use_dora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none", "modules_to_save": []}


def _layout(config: dict) -> dict:
    out = {}
    for key, default in _LAYOUT.items():
        value = config.get(key)
        value = default if value is None else value
        out[key] = sorted(value) if isinstance(value, (list, tuple, set)) else value
    return out


def _check_same_weights(model, weights: dict, path: Path, *, hint: str = "unload_adapter(model) first") -> None:
    """Refuse saved weights that are not exactly the model's adapter's tensors (names and shapes): peft loads what
    matches and keeps the rest, which would mix two adapters (or leave layers unadapted)."""
    from peft import get_peft_model_state_dict

    mine = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model.hf_model).items()}
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    if mine != theirs:
        missing, extra = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
        shaped = sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
        first = (missing or extra or shaped)[0]
        raise ValueError(f"adapter {str(path)!r} does not fit the model's adapter: {len(missing)} of its weights "
                         f"missing, {len(extra)} unknown, {len(shaped)} of another shape (first: {first!r}); "
                         f"{hint}")


def _lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by name (peft names every LoRA weight ``...lora_A...`` / ``...lora_B...``)."""
    return {n: p for n, p in model.hf_model.named_parameters() if "lora_" in n}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter's weights, by parameter name (what ``set_adapter_weights`` puts back)."""
    return {n: p.detach().cpu().clone() for n, p in _lora_parameters(model).items()}


def set_adapter_weights(model, weights: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy ``adapter_weights`` (parameter name -> tensor) into the model's adapter of the same layout; ``where``
    names their source in the error when the names or shapes differ (nothing is copied then)."""
    params = _lora_parameters(model)
    if params.keys() != weights.keys():
        raise ValueError(f"{where}: its LoRA weights do not match the model's adapter ({len(weights)} saved, "
                         f"{len(params)} in the model)")
    shaped = [n for n, p in params.items() if tuple(p.shape) != tuple(weights[n].shape)]
    if shaped:
        raise ValueError(f"{where}: {len(shaped)} of its LoRA weights have another shape than the model's adapter "
                         f"(first: {shaped[0]!r}, {tuple(weights[shaped[0]].shape)} saved, "
                         f"{tuple(params[shaped[0]].shape)} in the model)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def _strip_lora(hf_model) -> None:
    """Put back every module a failed adapter load wrapped in a LoRA layer, and drop its ``peft_config``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(hf_model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent) if parent else hf_model, child, module.get_base_layer())
    if "peft_config" in vars(hf_model):
        del hf_model.peft_config


def unload_adapter(model) -> None:
    """Remove the LoRA layers and restore the plain Hugging Face model (weights unmerged, unchanged)."""
    if is_adapted(model):
        model.hf_model = model.hf_model.unload()


@contextlib.contextmanager
def adapter_scope(model, *, enabled: bool) -> Iterator[None]:
    """Switch a model's LoRA layers off inside the block when ``enabled`` is False (restoring their state after).

    ``enabled=True`` leaves the model as it is (an adapter that is off stays off). The engine's hook.
    """
    layers = [] if enabled else lora_layers(model)
    if not layers:
        yield
        return
    was_off = [layer.disable_adapters for layer in layers]
    grads = [[(p, p.requires_grad) for p in layer.parameters()] for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, off, flags in zip(layers, was_off, grads):
            layer.enable_adapters(not off)
            for p, flag in flags:  # peft's enable_adapters(True) marks adapter weights trainable
                p.requires_grad_(flag)


def adapter_disabled(model):
    """Context manager: every executor runs the base model inside the block.

    Example: ``with adapter_disabled(model): Choreographer(model).decode(...)``.
    """
    return adapter_scope(model, enabled=False)


@contextlib.contextmanager
def use_adapter(model, path: str | Path) -> Iterator[None]:
    """Context manager: the adapter at ``path`` applies inside the block; the model is restored after.

    Example: ``with use_adapter(model, "runs/blockage/best"): Choreographer(model).decode(...)``.
    """
    if is_adapted(model):
        raise ValueError("use_adapter needs a model without an adapter; unload_adapter(model) first")
    load_adapter(model, path)
    try:
        yield
    finally:
        unload_adapter(model)
