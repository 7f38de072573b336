"""The `mechcopy` command: one module per subcommand, all opened the same way (`commands.common`).

`main` is the one place where errors meet the user: every exception becomes one line on stderr that
names the bad input and what to do (exit status 2; `--debug` shows the traceback), and Ctrl-C says
what was saved and how to resume (exit status 130): a command sets `args.saved`, a callable that
says it at that moment (`common.saved_in`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import NoReturn

from safetensors import SafetensorError

from mechcopy.errors import FieldError, UnknownName
from mechcopy.models.zoo import ZooError
from mechcopy.progress import set_bars

COMMANDS = ["models", "reproduce", "find", "evaluate", "task_vectors", "function_vectors", "patch", "train_organism"]
NOTHING_SAVED = "nothing was saved; run the command again"


class UsageError(Exception):
    """A bad flag, found by argparse (its message names the flag)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (through `main`) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    from mechcopy.commands.common import add_progress_args

    parser = Parser(prog="mechcopy", description=__import__("mechcopy").__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mechcopy.commands.{name}").register(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        add_progress_args(p)
    return parser


def flag_of(args: argparse.Namespace | None, field: str) -> str | None:
    """The flag that feeds the config field `field` (`ks` -> `--ks`; `find.ks` too), if the command has one."""
    dests = [d for d in vars(args or argparse.Namespace()) if d == field or d.endswith("." + field)]
    return "--" + dests[0].replace(".", "-").replace("_", "-") if len(dests) == 1 else None


def describe(e: BaseException, args: argparse.Namespace | None = None) -> str:
    """One line for the user: what was wrong and, where the message does not say it, what to do."""
    flag = flag_of(args, e.field) if isinstance(e, FieldError) else None
    if flag and isinstance(e, FieldError):
        text = f"argument {flag}: {e.problem}"
    elif isinstance(e, OSError) and e.errno is not None:
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f"{e.strerror}: {where}; check the path and its permissions" if where else f"{e.strerror}"
    elif isinstance(e, KeyError) and not isinstance(e, UnknownName):
        text = f"internal error: missing key {e}; run again with --debug and report the traceback"
    elif isinstance(e, (ValueError, TypeError, IndexError, OSError, UnknownName, ZooError)):
        text = str(e) or type(e).__name__
    elif isinstance(e, SafetensorError):
        text = f"a .safetensors file is damaged or is not one ({e}); run again with --debug to see which"
    else:
        text = f"{type(e).__name__}: {e} (unexpected; run again with --debug for the traceback)"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; an error becomes one line on stderr and exit status 2."""
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    set_bars(True if args.progress else None)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        saved = getattr(args, "saved", None)
        print(f"mechcopy {args.command}: interrupted; {(saved() if saved else None) or NOTHING_SAVED}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"mechcopy {args.command}: error: {describe(e, args)}", file=sys.stderr)
        return 2
