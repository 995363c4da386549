"""Peak memory of one workflow run, measured in isolation (one subprocess per configuration).

Process RSS on CPU: the peak resident set (``VmHWM``, reset before the run) above the RSS before it. Freed heap
pages are handed back to the system first (glibc ``malloc_trim(0)``, ``trim_heap``): otherwise allocations served
from pages that are freed but still resident do not grow the RSS, and the growth undercounts the run (a 45 MiB KV
store showed as +23 MiB). KV-cache bytes and, on CUDA, ``torch.cuda.max_memory_allocated`` come from ``run_once``.

Example: ``measure_memory(make_shape("multiqa", k=2), "baseline", Lengths())["rss_delta"]``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ..model import Model
from .arms import make_executor
from .measure import run_once
from .shapes import Lengths, Shape, Synth, make_shape


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``), so that RSS measured from here
    grows with every page a run touches; False where the C library is not glibc (nothing is trimmed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim  # musl has no libc.so.6 and no malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS; False where the kernel does not allow it (then the peak is since start)."""
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set) of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set of this process in bytes (since the last ``reset_peak_rss``; without /proc, since the
    process started: ``getrusage``, whose ru_maxrss is in KiB on Linux and in bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_memory_here(model: Model, shape: Shape, arm: str, lengths: Lengths) -> dict:
    """Peak RSS of one run in this process, above the RSS before it.

    One 2-token forward pass runs first: the first pass of a process allocates a fixed ~0.4 GiB (library
    initialisation, the same in every arm) that is not the workflow's. Then the heap is trimmed (``trim_heap``)
    before the RSS is read and its peak reset. The workflow itself is not warmed up, and its executor is created
    inside the measured window: the executor's KV store (allocated with room for 1,024 tokens, then grown),
    activations and allocator growth are its footprint.
    """
    import psutil

    synth = Synth(model.tokenizer, lengths)
    with torch.inference_mode():
        model.hf_model(input_ids=torch.tensor([[1, 2]], device=model.spec.device), logits_to_keep=1)
    trimmed = trim_heap()
    before = psutil.Process().memory_info().rss
    reset = reset_peak_rss()
    executor = None if arm == "hf" else make_executor(model, arm)
    result = run_once(model, shape, arm, synth, executor)
    peak = peak_rss()
    return {"arm": arm, "shape": shape.label, "threads": torch.get_num_threads(), "rss_before": before,
            "rss_peak": peak, "peak_reset": reset,
            "heap_trimmed": trimmed, "rss_delta": max(peak - before, 0), "kv_peak_bytes": result["kv_peak_bytes"],
            "cuda_peak_bytes": result["cuda_peak_bytes"]}


def measure_memory(shape: Shape, arm: str, lengths: Lengths, *, model_path: str | None = None,
                   timeout: float = 900) -> dict:
    """``measure_memory_here`` in a fresh subprocess (one per configuration, so peaks do not mix), with this
    process's torch thread count (``threads`` in the result records the subprocess's own)."""
    threads = torch.get_num_threads()
    spec = {"shape": shape.name, "size": dict(shape.size), "arm": arm, "lengths": dataclasses.asdict(lengths),
            "model": model_path, "threads": threads}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "choreo.perf.memory", json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {shape.label} / {arm} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_memory_model(model: Model, model_path: str | None, *, where: str, otherwise: str = "") -> None:
    """Refuse (ValueError starting with ``where``) to join memory measured by subprocesses that load another model
    than ``model``: they load ``model_path`` (None: the embedded model) at the loader's CPU default, fp32.
    ``otherwise`` ends the error's advice (", or rss=False").

    Example: ``check_memory_model(llama_8b, None, where="bench")`` raises: the subprocesses would load SmolLM2.
    """
    from ..model import checkpoint_sha256, embedded_checkpoint

    if model_path is None:
        loaded = "the embedded model"
        sha = json.loads((embedded_checkpoint() / "choreo.json").read_text())["gguf_sha256"]
    else:
        loaded, sha = f"model_path {model_path!r}", checkpoint_sha256(model_path)
    if (sha, torch.float32) != (model.spec.sha256, model.spec.dtype):
        raise ValueError(f"{where}: the memory subprocesses load {loaded} (sha256 {sha}, torch.float32), not the "
                         f"timed model {model.spec.name!r} (sha256 {model.spec.sha256}, {model.spec.dtype}); pass "
                         f"model_path= the timed model's checkpoint (loaded in fp32){otherwise}")


def _child(spec: dict) -> None:
    from ..model import load_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = load_model(spec["model"])
    result = measure_memory_here(model, make_shape(spec["shape"], **spec["size"]), spec["arm"],
                                 Lengths(**spec["lengths"]))
    print(json.dumps(result))


if __name__ == "__main__":  # python -m choreo.perf.memory '<json spec>': one measurement, printed as JSON
    _child(json.loads(sys.argv[1]))
