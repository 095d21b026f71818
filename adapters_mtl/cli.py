"""The ``adapters-mtl`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapters-mtl",
        description="Multi-task learning with per-row routed LoRA and prefix adapters on a frozen transformer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="showcase on the packaged real MiniLM: 3 adapters, one mixed batch, checks and timings",
        description="Load the packaged MiniLM-L6 (no download), attach a LoRA, a prefix and a LoRA+prefix "
        "adapter each with its own head, route real texts (BBC headlines, tweets) through them in one "
        "batch, check each row against the row run alone, time hot swap and merge.",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for adapter initialisation (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
