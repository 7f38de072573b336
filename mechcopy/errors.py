"""Errors that carry a message for the user (`mechcopy.commands.main` prints them as one line), notes
that are not errors, and the bounds check every frozen config runs on its counts."""

from __future__ import annotations

import sys
from typing import Any


def note(message: str) -> None:
    """Tell the user something they must know but that stops nothing (a resume, a damaged checkpoint)."""
    print(f"mechcopy: {message}", file=sys.stderr, flush=True)


class UnknownName(KeyError):
    """An unknown model or task name. A KeyError (it is a failed look-up), but printed as written:
    a plain KeyError prints as a quoted key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def below_minimum(value: Any, low: int | float) -> str | None:
    """Why `value` is not a number >= `low` (an integer when `low` is), or None when it is."""
    kind = "a number" if isinstance(low, float) else "an integer"
    types = (int, float) if isinstance(low, float) else (int,)
    if isinstance(value, bool) or not isinstance(value, types) or not value >= low:  # NaN too
        return f"must be {kind} >= {low}, got {value!r}"
    return None


def check_minimums(config: Any) -> None:
    """Raise ValueError naming the first field of `config` below its bound in `config.MINIMUM`.

    Tuple fields are checked element by element (`ks=(5, 0)` fails); None means "the default".
    The command line builds its flag types from the same bounds (`commands.common.add_config_args`),
    so a bad flag is refused, by name, before anything loads.
    """
    for name, low in type(config).MINIMUM.items():
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, tuple) and not value:
            raise ValueError(f"{name} must not be empty")
        for v in value if isinstance(value, tuple) else (value,):
            problem = below_minimum(v, low)
            if problem:
                raise ValueError(f"{name} {problem}")
