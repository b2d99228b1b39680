"""``vitkit SUBCOMMAND ...``: each subcommand is a thin layer over the Python API.

Every command module exposes ``register(subparsers)``, which adds its parser and sets
``func``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# subcommand modules, in the order `vitkit --help` lists them
COMMAND_MODULES = (
    "vitkit.commands.models",
    "vitkit.commands.convert",
    "vitkit.commands.inspect",
    "vitkit.commands.train",
    "vitkit.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: build, convert, train, inspect.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so atomic writers remove their temporaries on the way out.
    # (`vitkit train` installs its own handler: it finishes the step and saves last/.)
    signal.signal(signal.SIGTERM, _interrupt)
    from .fast import tune_cpu_allocator

    tune_cpu_allocator()  # freed tensors stay in the process: no page faults batch after batch
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # in here: a reader that went away shows up now, not as a traceback at exit
        return code
    except BrokenPipeError:
        # `vitkit predict DIR | head`: the reader had what it wanted; not an error, and nothing to print.
        # The rest of the output goes nowhere (Python's own recipe), so the exit's flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a tool stopped by the closed pipe returns
    except (ValueError, FileNotFoundError) as e:
        # Errors vitkit raises for bad input already name the input: print, don't trace.
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission problem: the message names the path
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
