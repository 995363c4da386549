"""The ``choreo`` command: demo, reproduction suites, fine-tuning, benchmarks."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import __version__

# Bad values from the command line (checked paths, names, devices) and paths the system refuses (a folder where a
# file should be, no permission): one line on stderr, exit status 2 (with CHOREO_DEBUG=1, the traceback instead).
# Any other exception is a defect and propagates with its traceback.
USER_ERRORS = (ValueError, OSError)
DEBUG_ENV = "CHOREO_DEBUG"


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def output_dir(path: str | os.PathLike, *, option: str) -> Path:
    """The folder ``option`` names, created (with its parents) and checked writable before any work starts, so a
    bad output path fails at once rather than after the run. Example: ``output_dir("results", option="--out")``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {str(folder)!r} is a file, not a folder")
    _check_writable(folder, option=option, named=folder)
    return folder


def output_file(path: str | os.PathLike, *, option: str) -> Path:
    """The file ``option`` names: not a folder, in a folder created (with its parents) and checked writable."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{option} {str(file)!r} is a folder, not a file")
    _check_writable(file.parent, option=option, named=file)
    return file


def input_file(path: str | os.PathLike, *, option: str) -> Path:
    """The existing file ``option`` names: a missing path or a folder is an error naming it."""
    file = Path(path)
    if not file.is_file():
        why = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"{option} {str(file)!r} {why}")
    return file


def _check_writable(folder: Path, *, option: str, named: Path) -> None:
    """Create ``folder`` and a temporary file in it, as ``choreo.results.write_text`` will at the end of the run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"{option} {str(named)!r}: cannot write there ({error.strerror or error})") from None


def describe(error: BaseException) -> str:
    """One line for an error; an OSError from the system names its path(s) and reason: ``'/tmp': Is a directory``."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = " -> ".join(repr(str(p)) for p in (error.filename, error.filename2) if p is not None)
        return f"{paths}: {error.strerror}"
    return str(error)


DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda if this torch finds a CUDA device, else cpu)"


def parse_device(text: str, *, who: str):
    """The ``torch.device`` that ``--device`` names, if this torch can run on it: cpu, cuda or cuda:N of a visible
    device; a ValueError naming ``text`` otherwise (``who``: what runs there, for the message)."""
    import torch

    try:
        if not text.strip():
            raise RuntimeError("blank")
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: {who} on cpu or cuda only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA device"
            raise ValueError(f"--device {text!r}: this torch ({torch.__version__}) {why}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def model_device(text: str | None, *, attention: str | None = None):
    """The ``torch.device`` that ``--device`` names (None: cuda if this torch finds a CUDA device, else cpu), checked
    with ``--attention`` before the model loads on it. Example: ``model_device("cpu", attention="triton")`` without
    ``TRITON_INTERPRET=1`` -> "--attention 'triton' cannot run with --device 'cpu': ...". Devices are named as
    ``choreo bench --device`` names them."""
    import torch

    given = text is not None
    if not given:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(text, who="choreo runs models")
    # the engine's rule (triton_kernels.is_available), read from the environment: in a fresh process the kernel
    # module is not imported yet, and will be imported for the interpreter exactly when TRITON_INTERPRET is 1
    if attention == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        default = "" if given else " (the default: this torch finds no CUDA device)"
        raise ValueError(f"--attention 'triton' cannot run with --device {text!r}{default}: the kernel needs --device "
                         f"cuda (or TRITON_INTERPRET=1 on the CPU, about 400x slower than torch)")
    return device


def _demo(args) -> int:
    from .demo import run_demo
    from .model import check_checkpoint, load_model

    if args.model is not None:  # every check before the model loads
        check_checkpoint(args.model, source="--model")
    device = model_device(args.device, attention=args.attention)
    run_demo(load_model(args.model, device=device), rounds=args.rounds, max_tokens=args.max_tokens,
             attention=args.attention)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="choreo",
                                     description="Prompt Choreography: LLM workflows over one global KV cache.",
                                     epilog=f"A bad value is reported in one line (exit status 2); set {DEBUG_ENV}=1 "
                                            "for the traceback.")
    parser.add_argument("--version", action="version", version=f"choreo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="a three-agent conversation under both executors, with timings")
    demo.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    demo.add_argument("--rounds", type=positive_int, default=1, help="turns per agent (default: 1)")
    demo.add_argument("--max-tokens", type=positive_int, default=40, help="tokens per turn at most (default: 40)")
    demo.add_argument("--device", default=None, help=f"where the model runs: {DEVICE_HELP}; fp32 on cpu, bf16 on cuda")
    demo.add_argument("--attention", default=None, choices=["torch", "reference", "triton"],
                      help="attention backend of both executors (default: triton on cuda where the kernel runs the "
                           "model's heads, else torch; triton on cpu needs TRITON_INTERPRET=1)")
    demo.set_defaults(func=_demo)
    for register in _registered():
        register(sub)
    return parser


def _registered():
    """Subcommands that live beside the modules they drive."""
    from . import finetune_cli, perf, repro

    return [repro.register, finetune_cli.register, perf.register]


def run_command(args, *, prog: str = "choreo") -> int:
    """Run a parsed subcommand; a bad value it reports, or a path the system refuses (``OSError``: a folder where a
    file should be, a file where a folder should be, no permission), becomes one line on stderr and exit status 2,
    unless ``$CHOREO_DEBUG`` is 1 (then it propagates with its traceback)."""
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"{prog} {args.command}: error: {describe(error)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what was typed: ``choreo repro`` tells its own positionals from pytest's (after --)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
