"""Errors that carry a message for the user (`mechcopy.commands.main` prints them as one line), notes
that are not errors, and the checks shared by the command line and the API: the bounds and types every
frozen config checks (`check_minimums`), the numbers and input files the flags check.

What counts as the project's own error (the hostile-input tests assert that nothing else escapes): a
`ValueError`, `TypeError`, `IndexError`, `FileNotFoundError` or `UnknownName` raised by mechcopy's own
code (the innermost frame of its traceback is a mechcopy module) with a one-line message that names
the input at fault; `own_error` says whether an exception is one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import stat
import sys
import typing
from pathlib import Path
from typing import Any

#: the largest integer torch and numpy take as a seed or a size (a larger one overflows there, late)
INT_MAX = 2**63 - 1


def note(message: str) -> None:
    """Tell the user something they must know but that stops nothing (a resume, a damaged checkpoint)."""
    print(f"mechcopy: {message}", file=sys.stderr, flush=True)


class UnknownName(KeyError):
    """An unknown model or task name. A KeyError (it is a failed look-up), but printed as written:
    a plain KeyError prints as a quoted key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FieldError(ValueError):
    """A setting's value refused where it is checked against what only the model or the data show (k
    above the model's neurons, more perplexity tokens than the text holds). The message names the
    field (`ks: ...`); the command line names the flag that feeds it instead (`argument --ks: ...`)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def number_problem(value: Any, low: int | float | None = None, above: float | None = None,
                   integer: bool = False) -> str | None:
    """Why `value` is not a finite number (an integer if `integer`, at most 2**63 - 1: what torch and
    numpy hold) >= `low` and > `above`, or None when it is. The one number check of flags and API."""
    kind = "an integer" if integer else "a finite number"
    bound = f" >= {low}" if low is not None else f" > {above}" if above is not None else ""
    is_number = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
    if (not is_number or not (integer or _finite(value)) or (low is not None and not value >= low)
            or (above is not None and not value > above)):   # NaN fails every comparison
        return f"must be {kind}{bound}, got {value!r}"
    if integer and value > INT_MAX:
        return f"must be an integer <= 2**63 - 1 ({INT_MAX}), got {value}"
    return None


class Above(float):
    """A strict lower bound in a config's `MINIMUM`: `Above(0.0)` means > 0 (a plain float means >=)."""


def below_minimum(value: Any, low: int | float) -> str | None:
    """Why `value` is not a number >= `low` (> `low` if it is `Above`; an integer when `low` is an int),
    or None when it is."""
    if isinstance(low, Above):
        return number_problem(value, above=float(low))
    return number_problem(value, low=low, integer=not isinstance(low, float))


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:   # an integer beyond any float
        return False


def check_number(value: Any, name: str, low: int | float | None = None, above: float | None = None,
                 integer: bool = False) -> Any:
    """`value` if `number_problem` finds nothing; else a ValueError (a TypeError for a value that is not
    a number of the kind asked) naming `name`."""
    problem = number_problem(value, low, above, integer)
    if problem:
        wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)
        raise (TypeError if wrong_type else ValueError)(f"{name} {problem}")
    return value


def check_items(values: Any, kind: type | tuple[type, ...], name: str, example: str = "") -> list:
    """`values` as a list whose items are all `kind` (a TypeError naming `name` and the first stray item
    otherwise; a string is not a list of anything)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    what = " or ".join(k.__name__ for k in kinds)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of {what}{f' ({example})' if example else ''}, got "
                        f"{type(values).__name__} {values!r:.60}")
    items = list(values)
    for i, v in enumerate(items):
        if not isinstance(v, kinds):
            raise TypeError(f"{name}[{i}] must be a {what}{f' ({example})' if example else ''}, got "
                            f"{type(v).__name__} {v!r:.60}")
    return items


def input_file(path: Any, what: str) -> Path:
    """`path` as an existing regular file, or an error that names `what` and says what it is instead
    (missing, a folder, a device such as /dev/null, a pipe)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise TypeError(f"{what} must be a file path, got {type(path).__name__} {path!r}")
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) \
            else "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise ValueError(f"{what} {path} is {kind}, not a file")
    return p


def check_device(device: Any) -> str:
    """`device` as a torch device name this machine has (cpu, cuda, cuda:N): a ValueError naming it, not
    torch's error later. The --device flag and `load_model` share it."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a name such as 'cpu' or 'cuda', got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s); got {str(device)!r}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; use cpu or cuda")
    return str(device)


def check_dtype(dtype: Any) -> Any:
    """`dtype` as a torch floating dtype (`torch.float32`, ...): the --dtype flag names one, the API
    takes the dtype itself, and a string here is refused with the fix rather than deep in torch."""
    import torch

    if not isinstance(dtype, torch.dtype):
        hint = f" (torch.{dtype})" if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) else ""
        raise TypeError(f"dtype must be a torch dtype such as torch.float32{hint}, got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
    return dtype


def check_minimums(config: Any) -> None:
    """Raise TypeError naming the first field of `config` whose value is not of its annotated type,
    then ValueError naming the first field below its bound in `config.MINIMUM`.

    Every float field must be finite and every integer at most 2**63 - 1 (`check_types`). Tuple
    fields are checked element by element (`ks=(5, 0)` fails); None means "the default". The
    command line builds its flag types from the same bounds (`commands.common.add_config_args`), so
    a bad flag is refused, by name, before anything loads.
    """
    check_types(config)
    for name, low in type(config).MINIMUM.items():
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, (tuple, list)) and not value:
            raise ValueError(f"{name} must not be empty")
        for v in value if isinstance(value, (tuple, list)) else (value,):
            problem = below_minimum(v, low)
            if problem:
                raise ValueError(f"{name} {problem}")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the annotation `hint` (None: it fits). Paths pass as strings, lists
    as tuples (configs turn them into tuples); floats must be finite, integers <= 2**63 - 1."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        problems = [_type_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        plain = [a for a in args if a is not type(None)]
        return next(p for p, a in zip(problems, args) if a is not type(None)) if len(plain) == 1 else \
            f"must be one of {', '.join(getattr(a, '__name__', str(a)) for a in args)}"
    if hint is type(None):
        return None if value is None else "must be None"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return None if value <= INT_MAX else f"must be an integer <= 2**63 - 1 ({INT_MAX})"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if _finite(value) else "must be a finite number"
    if hint is str:
        return None if isinstance(value, (str, os.PathLike)) else "must be a string"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return "must be a tuple"
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        for i, v in enumerate(value):
            problem = _type_problem(v, items[0] if len(items) == 1 else items[min(i, len(items) - 1)])
            if problem:
                return f"item {i} {problem}"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return "must be a dict"
        bad = [k for k in value if not isinstance(k, str)] if args and args[0] is str else []
        return f"keys must be strings, got {bad[0]!r}" if bad else None
    return None


def check_types(config: Any) -> None:
    """Raise TypeError (ValueError for a non-finite or too large number) naming the first field of
    the frozen dataclass `config` whose value does not fit its annotation."""
    cls: type = type(config)
    for name, hint in _field_types(cls):
        value = getattr(config, name)
        problem = _type_problem(value, hint)
        if problem:
            error = ValueError if ("finite" in problem or "2**63" in problem) else TypeError
            raise error(f"{name} {problem}, got {type(value).__name__} {value!r}")


OWN_ERRORS = (ValueError, TypeError, IndexError, FileNotFoundError, UnknownName)


def own_error(e: BaseException) -> bool:
    """Whether `e` is one of the project's own errors: one of `OWN_ERRORS`, raised by mechcopy's code
    (the innermost traceback frame is a mechcopy module), with a non-empty message."""
    if not isinstance(e, OWN_ERRORS) or not str(e).strip():
        return False
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = str(Path(__file__).resolve().parent)
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(package + os.sep)
