"""Progress bars where someone watches them, one summary line per stage where no one does.

`tqdm` here is a drop-in for `tqdm.auto.tqdm`. On a terminal (stderr is a TTY) or in a Jupyter
kernel it is tqdm.auto's bar. Elsewhere (stderr redirected to a file, CI logs, a batch job) a bar
would write thousands of carriage-return updates into the log, so it draws nothing and, when it
closes, writes one line such as `mechcopy: evaluate: 132/132 in 04:36`; a transient bar
(`leave=False`, e.g. the batches inside one task) writes not even that. `set_bars(True)` (the
CLI's `--progress`) shows bars anyway, `set_bars(False)` never. A bar its caller disables
(`disable=True`) shows nothing either way. `library_bars()` applies the same choice to the bars
transformers draws itself (loading and saving weights).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm.std import tqdm as _std_tqdm

from mechcopy.errors import note

_FORCED: bool | None = None


def set_bars(show: bool | None) -> None:
    """Show bars always (True), never (False), or where someone watches (None, the default)."""
    global _FORCED
    _FORCED = show


def bars_shown() -> bool:
    """Whether bars are drawn now: forced by `set_bars`, else on a terminal or in a Jupyter kernel."""
    if _FORCED is not None:
        return _FORCED
    if "ipykernel" in sys.modules:
        shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
        if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
            return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # stderr replaced by an object without it, or closed
        return False


def tqdm(*args, **kwargs):
    """tqdm.auto's bar where it is watched (`bars_shown`), else a silent one that summarises on closing."""
    if kwargs.get("disable") or bars_shown():
        from tqdm.auto import tqdm as auto_tqdm   # imports IPython where it is installed: only when drawn

        return auto_tqdm(*args, **kwargs)
    return SummaryBar(*args, **kwargs)


class SummaryBar(_std_tqdm):
    """A tqdm that draws nothing and writes one line (`mechcopy: desc: n/total in time`) when it closes,
    unless it is transient (`leave=False`)."""

    def __init__(self, *args, **kwargs):
        kwargs["file"] = _devnull()
        super().__init__(*args, **kwargs)
        self._summarised = False

    def close(self):
        if not getattr(self, "_summarised", True) and not self.disable:
            self._summarised = True
            if self.leave:
                note(self.summary())
        super().close()

    def summary(self) -> str:
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        return f"{self.desc or 'progress'}: {done} in {self.format_interval(self.format_dict['elapsed'])}"


_DEVNULL = None


def _devnull():
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = open(os.devnull, "w")
    return _DEVNULL


@contextmanager
def library_bars() -> Iterator[None]:
    """Inside the block, transformers' own bars follow `bars_shown()` (they are restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not bars_shown():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()
