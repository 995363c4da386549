"""The ``choreo`` command: demo, reproduction suites, fine-tuning, benchmarks."""

from __future__ import annotations

import argparse
import sys

from . import __version__

# Bad values from the command line (checked paths, names, devices): one line on stderr, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _demo(args) -> int:
    from .demo import run_demo
    from .model import load_model

    run_demo(load_model(args.model), rounds=args.rounds, max_tokens=args.max_tokens, attention=args.attention)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="choreo", description="Prompt Choreography: LLM workflows over one global KV cache.")
    parser.add_argument("--version", action="version", version=f"choreo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="a three-agent conversation under both executors, with timings")
    demo.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    demo.add_argument("--rounds", type=positive_int, default=1, help="turns per agent (default: 1)")
    demo.add_argument("--max-tokens", type=positive_int, default=40, help="tokens per turn at most (default: 40)")
    demo.add_argument("--attention", default=None, choices=["torch", "reference", "triton"])
    demo.set_defaults(func=_demo)
    for register in _registered():
        register(sub)
    return parser


def _registered():
    """Subcommands that live beside the modules they drive."""
    from . import finetune, perf, repro

    return [repro.register, finetune.register, perf.register]


def run_command(args) -> int:
    """Run a parsed subcommand; a bad value it reports becomes one line on stderr and exit status 2."""
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"choreo {args.command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
