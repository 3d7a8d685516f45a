"""Command line: ``python -m tritonquant demo | bench | tune`` (also the ``tritonquant`` console script)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonquant", description="Activation-compressed training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,tune}")

    demo = commands.add_parser("demo", help="quantize real activations and train a small model exact vs compressed")
    demo.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda'")
    demo.add_argument("--steps", type=int, default=3, help="training steps per configuration (default 3)")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(device=args.device, steps=args.steps)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
