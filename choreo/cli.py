"""The ``choreo`` command: demo, reproduction suites, fine-tuning, benchmarks."""

from __future__ import annotations

import argparse
import sys

from . import __version__


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
    demo.add_argument("--rounds", type=int, default=1)
    demo.add_argument("--max-tokens", type=int, default=40)
    demo.add_argument("--attention", default=None, choices=["torch", "reference", "triton"])
    demo.set_defaults(func=_demo)
    for register in _registered():
        register(sub)
    return parser


def _registered():
    """Subcommands that live beside the modules they drive."""
    from . import finetune, perf, repro

    return [repro.register, finetune.register, perf.register]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"choreo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
