"""`vitkit bench`: images/s, peak memory and FLOP rate of vitkit against timm, side by side."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench import add_arguments

    p = sub.add_parser("bench", help="throughput and memory of vitkit against timm, measured side by side",
                       description="Contestants take turns run by run in one process; medians are reported.")
    add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import run_from_args

    run_from_args(args)
    return 0
