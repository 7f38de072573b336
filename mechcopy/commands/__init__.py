"""The `mechcopy` command: one module per subcommand, all opened the same way (`commands.common`)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = ["models", "reproduce", "find", "evaluate", "task_vectors", "patch", "train_organism"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechcopy", description=__import__("mechcopy").__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mechcopy.commands.{name}").register(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; an error becomes one line on stderr and exit status 2."""
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"mechcopy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mechcopy {args.command}: error: {msg}", file=sys.stderr)
        return 2


