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

# what computes or grades a result: the model's numerics (torch, transformers, safetensors, tokenizers; gguf
# dequantizes the embedded model), the adapters (peft), the kernel (triton), the statistics (numpy, scipy), MATH
# answers (math-verify)
_LIBRARIES = ("choreo", "torch", "transformers", "tokenizers", "safetensors", "peft", "triton", "numpy", "scipy",
              "math-verify", "gguf")


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


# where the code that runs lives (the kernel benchmarks behind results/kernels in tests/): an untracked file of a kind
# tracked there (a new module, say) is uncommitted code too; results (results/, results-*/) lie outside them
SOURCE_FOLDERS = ("choreo", "triton_kernels", "suites", "scripts", "tests")


def git_commit(root: Path | None = None) -> str | None:
    """HEAD of the source tree (``root``, default this package's checkout), with "+dirty.<digest>" if tracked files
    outside ``results/`` differ from it, or if ``SOURCE_FOLDERS`` hold untracked files (not ignored) with a suffix
    that tracked files there have (a new module): the result came from uncommitted code. The digest, the first 12
    hex digits of the SHA-256 of ``git diff HEAD`` over those tracked files followed by each untracked file's path
    and content, tells one uncommitted state from another. Where ``root`` is not the top of a git repository (a copy
    of the tree without its .git, or the package installed into site-packages, which may lie in someone else's
    repository), $CHOREO_GIT_COMMIT, else None. A run records the commit read when it started (``COMMIT_AT_START``).
    """
    try:
        root = (root or Path(__file__).parent.parent).resolve()
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        lines = out.stdout.split("\n")
        if out.returncode != 0 or len(lines) < 2 or Path(lines[0]).resolve() != root:
            return os.environ.get("CHOREO_GIT_COMMIT") or None
        head = lines[1].strip()
        code = ["--", ".", ":(exclude)results", ":(exclude)results-*"]
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", *code],
                                capture_output=True, text=True, timeout=10)
        try:
            untracked = _untracked_sources(root)
        except subprocess.SubprocessError:  # HEAD is known; whether new files sit beside it is not
            return f"{head}+dirty.unknown"
        if status.returncode != 0 or not status.stdout.strip() and not untracked:
            return head
        # plumbing options: no external diff driver, textconv or colour from the user's config in the digest
        diff = subprocess.run(["git", "-C", str(root), "diff", "--no-ext-diff", "--no-textconv", "--no-color",
                               "--binary", "HEAD", *code], capture_output=True, timeout=30)
        if diff.returncode != 0:
            return f"{head}+dirty.unknown"
        digest = hashlib.sha256(diff.stdout)
        for name in untracked:
            try:
                content = (root / name).read_bytes()
            except OSError:  # removed since it was listed
                content = b""
            digest.update(b"\0untracked\0" + name.encode() + b"\0" + content)
        return f"{head}+dirty.{digest.hexdigest()[:12]}"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CHOREO_GIT_COMMIT") or None


def _untracked_sources(root: Path) -> list[str]:
    """Untracked, not ignored files under ``root``'s ``SOURCE_FOLDERS`` whose suffix a tracked file there has
    (e.g. ``choreo/new_module.py``; not ``choreo/notes.xyz`` where no tracked file ends in .xyz), in path order."""
    def listed(*options):
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *options, "--", *SOURCE_FOLDERS],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise subprocess.SubprocessError(out.stderr)
        return [name for name in out.stdout.split("\0") if name]

    kinds = {Path(name).suffix for name in listed()} - {""}
    return sorted(name for name in listed("--others", "--exclude-standard") if Path(name).suffix in kinds)


# The code a run executes is the code this process imported: read once, when the package is imported (it is by
# ``import choreo``), so that a checkout changed during a long run (an edit, a commit) is not named for it.
COMMIT_AT_START = git_commit()


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
    """A JSON-ready record of how a result was produced. ``git_commit`` is the code this process imported
    (``COMMIT_AT_START``); where the checkout has changed since, what it holds now is ``git_commit_at_write``.

    Example: ``provenance(model, seeds=[0, 1], sample_sizes={"games": 64})``.
    """
    spec = getattr(model, "spec", None)
    now = git_commit()
    return {
        "model": None if spec is None else {"name": spec.name, "sha256": spec.sha256, "dtype": str(spec.dtype)},
        "device": device_name(spec.device if spec is not None else "cpu"),
        "seeds": seeds,
        "sample_sizes": sample_sizes,
        "versions": library_versions(),
        "git_commit": COMMIT_AT_START,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(shlex.quote(a) for a in command_argv()),
        # CHOREO_* variables change what runs (sizes, arms, paths): a command alone may not reproduce the result
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CHOREO_")},
        **({} if now == COMMIT_AT_START else {"git_commit_at_write": now}),
        **extra,
    }
