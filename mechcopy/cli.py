"""The `mechcopy` command. Each feature module registers its own sub-command."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Modules with a `register(subparsers)` function; each adds one sub-command.
COMMAND_MODULES = [
    "mechcopy.models.commands",
    "mechcopy.reproduce",
    "mechcopy.organisms.commands",
    "mechcopy.task_vectors",
    "mechcopy.patching",
    "mechcopy.find_cli",
    "mechcopy.evaluate_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechcopy", description=__import__("mechcopy").__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (KeyError, ValueError, IndexError, FileNotFoundError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mechcopy {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
