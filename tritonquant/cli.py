"""Command line: ``python -m tritonquant demo | bench | tune`` (also the ``tritonquant`` console script)."""

from __future__ import annotations

import argparse
import os
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _folder(text: str) -> str:
    """A folder to write into: it may not exist yet, but it must not be a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonquant", description="Activation-compressed training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,tune}")

    demo = commands.add_parser("demo", help="quantize real activations and train a small model exact vs compressed")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="'auto' (CUDA when present), 'cpu' or 'cuda'")
    demo.add_argument("--steps", type=_positive_int, default=3, help="training steps per configuration (default 3)")

    bench = commands.add_parser("bench", help="memory and step time vs exact training, checkpointing and save_on_cpu")
    bench.add_argument("--quick", action="store_true", help="small CPU version (memory from byte accounting)")
    bench.add_argument("--out", type=_folder, default=None, help="folder for bench.md and bench.json")
    bench.add_argument("--steps", type=_positive_int, default=5, help="timed steps per measurement (median reported)")
    bench.add_argument("--budget-gb", type=_positive_float, default=16.0,
                       help="memory budget for the largest-batch column")
    bench.add_argument("--plots", type=_folder, default=None, help="folder for PNG plots (needs matplotlib)")

    tune = commands.add_parser("tune", help="time kernel launch configs on this GPU and cache the fastest")
    from .tune import add_tune_arguments

    add_tune_arguments(tune)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                parser.error("--device cuda: torch sees no CUDA device (use --device auto or cpu)")
        from .demo import run_demo

        return run_demo(device=args.device, steps=args.steps)
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(quick=args.quick, out=args.out, steps=args.steps, budget_gb=args.budget_gb, plots=args.plots)
    if args.command == "tune":
        from .tune import run_tune_from_args

        return run_tune_from_args(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
