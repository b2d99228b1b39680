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


class _Formatter(argparse.HelpFormatter):
    """argparse's own, but ``nargs="+"`` with a metavar of two names reads as one or two values: ``--img-size
    H [W]``, not ``H [W ...]`` (argparse has no nargs for one or two; the command refuses a third value)."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == "+" and isinstance(action.metavar, tuple) and len(action.metavar) == 2:
            return "{} [{}]".format(*action.metavar)
        return super()._format_args(action, default_metavar)


class _SubcommandParser(argparse.ArgumentParser):
    """Each subcommand's parser: _Formatter unless the command gives its own."""

    def __init__(self, *args, formatter_class: type = _Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: build, convert, train, inspect.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_SubcommandParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """What is wrong with the arguments a subcommand's ``parser`` left over: each unknown flag, named with
    the closest flags the subcommand has (difflib, as a misspelt key of a config file is named); the values
    after an unknown flag are taken as its own, any other stray argument is listed as argparse lists it."""
    import difflib
    import re

    shown = {}  # each option string -> the option's first long flag, as the help shows it (--data_dir: --data-dir)
    for action in parser._actions:
        long = [f for f in action.option_strings if f.startswith("--")] or action.option_strings
        for flag in action.option_strings:
            shown[flag] = long[0]
    unknown, stray = [], []
    for arg in extras:
        if arg.startswith("-") and len(arg) > 1 and not re.fullmatch(r"-\d+|-\d*\.\d+", arg):  # not -1, -.5
            flag = arg.split("=", 1)[0]
            close = dict.fromkeys(shown[f] for f in difflib.get_close_matches(flag, shown, n=3))
            unknown.append((flag, f"did you mean {' or '.join(close)}?" if close else ""))
        elif not unknown:  # a value of an unknown flag otherwise: the number of its values is not known
            stray.append(arg)
    if len(unknown) == 1:
        flag, hint = unknown[0]
        parts = [f"unknown option {flag}" + (f"; {hint}" if hint else "")]
    else:
        parts = ["unknown options " + ", ".join(f"{flag} ({hint})" if hint else flag for flag, hint in unknown)] \
            if unknown else []
    if stray:
        parts.append(f"unrecognized arguments: {' '.join(stray)}")
    return "; ".join(parts)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # parse_args would report them under the top-level usage (`vitkit [-h] COMMAND ...`): an argument
        # a subcommand does not take is reported by that subcommand, with its usage and the closest flag
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[args.command]
        command.error(_unrecognized(command, extras))  # exits 2, as any usage error
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
