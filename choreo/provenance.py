"""Provenance for every number written to ``results/``: model and hash, versions, device, date, command."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

# what computes or grades a result: the model's numerics (torch, transformers, safetensors, tokenizers), the
# adapters (peft), the kernel (triton), the statistics (numpy, scipy), MATH answers (math-verify)
_LIBRARIES = ("choreo", "torch", "transformers", "tokenizers", "safetensors", "peft", "triton", "numpy", "scipy",
              "math-verify")


def library_versions() -> dict[str, str | None]:
    """Python's and each library's version (None where one is not installed), and the CUDA torch was built for."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda  # None for a CPU build
    return out


def device_name(device: str | torch.device = "cpu") -> str:
    """A human-readable device: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit(root: Path | None = None) -> str | None:
    """HEAD of the source tree (``root``, default this package's checkout), with "+dirty.<digest>" if tracked files
    outside ``results/`` differ from it (the result came from uncommitted code; the digest, the first 12 hex digits
    of the SHA-256 of ``git diff HEAD`` over those files, tells one uncommitted state from another); where ``root``
    is not the top of a git repository (a copy of the tree without its .git, or the package installed into
    site-packages, which may lie in someone else's repository), $CHOREO_GIT_COMMIT, else None."""
    try:
        root = (root or Path(__file__).parent.parent).resolve()
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        lines = out.stdout.split("\n")
        if out.returncode != 0 or len(lines) < 2 or Path(lines[0]).resolve() != root:
            return os.environ.get("CHOREO_GIT_COMMIT") or None
        head = lines[1].strip()
        code = ["--", ".", ":(exclude)results"]
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", *code],
                                capture_output=True, text=True, timeout=10)
        if status.returncode != 0 or not status.stdout.strip():
            return head
        # plumbing options: no external diff driver, textconv or colour from the user's config in the digest
        diff = subprocess.run(["git", "-C", str(root), "diff", "--no-ext-diff", "--no-textconv", "--no-color",
                               "--binary", "HEAD", *code], capture_output=True, timeout=30)
        digest = hashlib.sha256(diff.stdout).hexdigest()[:12] if diff.returncode == 0 else "unknown"
        return f"{head}+dirty.{digest}"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CHOREO_GIT_COMMIT") or None


def command_argv() -> list[str]:
    """This process's command line, the installed ``choreo`` and ``pytest`` scripts named as typed (not by their
    venv paths), and ``python -m choreo`` / ``python -m pytest`` as typed (not as the path of the package's
    ``__main__.py``)."""
    argv = list(sys.argv)
    for name in ("choreo", "pytest"):
        if argv and Path(argv[0]).name == name:
            argv[0] = name
        elif argv and Path(argv[0]).parts[-2:] == (name, "__main__.py"):
            argv[0:1] = ["python", "-m", name]
    return argv


def provenance(model=None, *, seeds=None, sample_sizes=None, command: str | None = None, **extra) -> dict:
    """A JSON-ready record of how a result was produced.

    Example: ``provenance(model, seeds=[0, 1], sample_sizes={"games": 64})``.
    """
    spec = getattr(model, "spec", None)
    return {
        "model": None if spec is None else {"name": spec.name, "sha256": spec.sha256, "dtype": str(spec.dtype)},
        "device": device_name(spec.device if spec is not None else "cpu"),
        "seeds": seeds,
        "sample_sizes": sample_sizes,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(shlex.quote(a) for a in command_argv()),
        # CHOREO_* variables change what runs (sizes, arms, paths): a command alone may not reproduce the result
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CHOREO_")},
        **extra,
    }
