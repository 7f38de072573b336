"""The opening every command shares: flags named like the API they feed, the model (threads, device,
dtype), the output path, the JSON written at the end.

A command module defines `register(sub)`, which adds its parser and sets `run=fn(args)`. Everything
that can be checked without the model is checked before it loads (flag values by their argparse
types, input files, `--out`), and everything that needs the model right after it loads, before any
work: a bad input costs seconds, not a run. Errors become one line in `commands.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mechcopy.arch import HookedModel
from mechcopy.components import Components
from mechcopy.errors import below_minimum, check_device, input_file
from mechcopy.find import CHECKPOINT_SUFFIX, SET_SUFFIXES
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import side_file, write_json_atomic
from mechcopy.models import zoo
from mechcopy.models.loading import folder_config
from mechcopy.models.zoo import DEFAULT_MODEL
from mechcopy.provenance import git_revision
from mechcopy.suite import JOURNAL_SUFFIX
from mechcopy.tasks import task_file, task_names

DTYPES = ("float32", "float64", "bfloat16", "float16")
#: torch CPU threads unless --threads says otherwise (docs/reliability.md: measured on 2 cores)
DEFAULT_THREADS = 1
#: more threads than torch can count (a 32-bit int) overflowed in torch; no machine has more than this
MAX_THREADS = 4096

Inputs = Mapping[str, "str | Path | Iterable[str | Path] | None"]


# ------------------------------------------------------------------------------------------- flag types


def at_least(low: int | float, most: int | None = None) -> Callable[[str], int | float]:
    """An argparse type: an integer (a number, if `low` is a float) >= `low` (and <= `most`)."""
    def convert(text: str) -> int | float:
        try:
            value: Any = float(text) if isinstance(low, float) else int(text)
        except ValueError:
            value = text
        problem = below_minimum(value, low)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be an integer <= {most}, got {value}")
        return value

    convert.__name__ = f"at_least_{low}"
    return convert


def int_list(low: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers >= `low`, such as 5,10,20."""
    def convert(text: str) -> tuple[int, ...]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            values = tuple(int(x) for x in items)
        except ValueError:
            values = ()
        if not values or any(below_minimum(v, low) for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {low} such as 5,10,20, "
                                             f"got {text!r}")
        return values

    convert.__name__ = "int_list"
    return convert


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def existing_file(what: str) -> Callable[[str], str]:
    """An argparse type: a path to an existing regular file (not a folder, not /dev/null)."""
    def convert(text: str) -> str:
        try:
            input_file(text, what)
        except (ValueError, TypeError, OSError) as e:
            raise argparse.ArgumentTypeError(str(e))
        return text

    convert.__name__ = "existing_file"
    return convert


def device_name(text: str) -> str:
    """An argparse type: a torch device this machine has (so `--device cuda` fails here, not in torch)."""
    try:
        return check_device(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e))


# ------------------------------------------------------------------------------------------- flags


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --threads."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo model name or model folder (default {DEFAULT_MODEL}; `mechcopy models` lists the zoo)")
    add_device_args(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights' dtype (default float32)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --threads (also for commands that build their model themselves)."""
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=at_least(1, most=MAX_THREADS), default=DEFAULT_THREADS,
                   help=f"torch CPU threads (default {DEFAULT_THREADS}: more threads lose badly when another job "
                        "shares the cores; see docs/reliability.md)")


def add_progress_args(p: argparse.ArgumentParser) -> None:
    """--progress (every command: `commands.build_parser`; `mechcopy.progress` says what it changes)."""
    p.add_argument("--progress", action="store_true",
                   help="draw progress bars even when stderr is not a terminal (default: bars on a terminal, "
                        "else one summary line per stage)")


def add_out_args(p: argparse.ArgumentParser, help_text: str, required: bool = False) -> None:
    """--out and --force (replace an existing result)."""
    p.add_argument("--out", type=Path, required=required, default=None, help=help_text)
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def add_config_args(p: argparse.ArgumentParser, cls: type, helps: dict[str, str],
                    choices: dict[str, Iterable[str]] | None = None, types: dict[str, Callable] | None = None) -> None:
    """One flag per field of the frozen config `cls` named in `helps`: `--n-dev` feeds `n_dev`.

    A field of a nested config is named by its path, `find.n` (`ReproduceConfig.find.n`), and its
    flag by the same path with dashes, `--find-n`. Defaults come from the dataclass; tuples of ints
    are written comma-separated (`--ks 5,10,20`). Bounds come from the config's `MINIMUM` (the config
    checks the same bounds), so a bad value is refused, with its flag's name, before anything loads;
    `types` gives a field (by its path) another flag type (a file).
    """
    choices = choices or {}
    for path, help_text in helps.items():
        owner, name, default = _field(cls, path)
        hints = typing.get_type_hints(owner)
        minimum = getattr(owner, "MINIMUM", {})
        kind = _base_type(hints[name])
        kwargs: dict[str, Any] = {"default": default, "help": f"{help_text} (default {_show(default)})"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if types is not None and name in types:
                kwargs["type"] = types[name]
            elif kind is tuple:
                kwargs["type"] = int_list(minimum.get(name, 0))
            elif name in minimum:
                kwargs["type"] = at_least(minimum[name])
            else:
                kwargs["type"] = kind
            kwargs["metavar"] = name.upper()
        if path in choices:
            kwargs["choices"] = list(choices[path])
            kwargs.pop("metavar", None)
        p.add_argument("--" + path.replace(".", "-").replace("_", "-"), dest=path, **kwargs)


def _field(cls: type, path: str) -> tuple[type, str, Any]:
    """(the config class that owns field `path`, its name there, its default in `cls`'s default)."""
    *outer, name = path.split(".")
    value: Any = None
    owner = cls
    for part in outer:
        f = {f.name: f for f in dataclasses.fields(owner)}[part]
        value = getattr(value, part) if value is not None else _default(f)
        owner = type(value)
    f = {f.name: f for f in dataclasses.fields(owner)}[name]
    return owner, name, getattr(value, name) if value is not None else _default(f)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any):
    """The frozen config `cls` from the parsed flags (fields without a flag keep their default; a
    nested config is built from its own flags, `find.n`, over its default in `cls`)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in vars(args):
            values[f.name] = vars(args)[f.name]
            continue
        prefix = f.name + "."
        nested = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if nested:
            values[f.name] = dataclasses.replace(_default(f), **nested)
    return cls(**{**values, **extra})


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return tuple
    if args:
        return _base_type(args[0])
    return hint


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


# ------------------------------------------------------------------------------------------- the model


def open_model(args: argparse.Namespace):
    """Apply --threads, then load --model on --device in --dtype."""
    import torch

    from mechcopy.models import load_model

    torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))


# ------------------------------------------------------------------------------------------- outputs


#: suffixes of the files mechcopy keeps beside a result and reads back (resume, bottom baseline)
SIDE_SUFFIXES = (JOURNAL_SUFFIX, CHECKPOINT_SUFFIX, *SET_SUFFIXES)
#: those beside a neuron file: what `find` wrote with it, and its checkpoint
NEURON_SIDE_SUFFIXES = (CHECKPOINT_SUFFIX, *SET_SUFFIXES)
#: mechcopy's own folder: its code and the task data every run reads
PACKAGE = Path(__file__).resolve().parent.parent


def files_in(spec: str | None) -> list[Path]:
    """The files a task list such as --tasks reads: task files and the built-in tasks' data files."""
    try:
        names = task_names(spec or "")
    except (ValueError, TypeError):
        return []
    return [f for f in map(task_file, names) if f is not None]


def model_path(name: str) -> str | Path:
    """What --model reads: a zoo model's cache folder, or the folder named (whose config.json is
    checked here, before any model loads)."""
    if name in zoo.ZOO:
        return zoo.model_dir(name)
    folder = Path(name).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        folder_config(folder)
    return name


def load_neurons(flag: str, path: str | Path | None):
    """The neuron file of `flag` (None if not given), and what `prepare_out` must not overwrite with it:
    the file and the files read with it (its copy scores, wherever its meta puts them, and find's
    attributions)."""
    if path is None:
        return None, {}
    neurons = Components.load(input_file(path, "neuron file"))
    side = [side_file(path, s) for s in NEURON_SIDE_SUFFIXES]
    if isinstance(neurons.meta.get("scores_path"), str):
        side.append(Path(neurons.meta["scores_path"]))
    return neurons, {flag: [Path(path)], f"{flag} {path}'s side file": side}


def prepare_out(path: str | Path | None, inputs: Inputs | None = None, force: bool = False,
                side: Iterable[Path] = ()) -> Path | None:
    """Check an output file before any work: not one of the `inputs` (flag -> paths) nor inside an
    input folder, not a folder, not an existing result unless `force`; its folder is created and must
    be writable. `side` files written beside it are checked against the inputs too."""
    if path is None:
        return None
    out = Path(path).expanduser()
    for f in (out, *side):
        _not_an_input(f, path, inputs)
    taken = next((s for s in SIDE_SUFFIXES if out.name.endswith(s)), None)
    if taken:
        raise ValueError(f"--out {path} is named like a file mechcopy keeps beside a result and reads back "
                         f"(*{taken}); name the result FILE.json")
    if out.is_dir():
        raise ValueError(f"--out {path} is a folder; name a file, such as {Path(path) / 'results.json'}")
    if out.exists() and not force:
        raise ValueError(f"--out {path} exists; pass --force to replace it, or choose another file")
    _writable_folder(out.parent, path)
    return out


def prepare_out_dir(path: str | Path, inputs: Inputs | None = None, force: bool = False,
                    resume: str | None = None) -> Path:
    """Check an output folder before any work: not an input, not a file, created and writable. A
    folder that is not empty is refused unless `force`, or unless it holds the file `resume` (a run
    of this command, which then resumes)."""
    out = Path(path).expanduser()
    _not_an_input(out, path, inputs)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not force and not (resume and (out / resume).exists()):
        raise ValueError(f"--out {path} is a folder that is not empty; pass --force to write into it anyway, "
                         "or choose a new folder")
    _writable_folder(out, path)
    return out


def _not_an_input(out: Path, given: str | Path, inputs: Inputs | None) -> None:
    """Refuse an output that is an input file (by path, symlink or hard link) or lies in an input folder,
    or in mechcopy's own folder (its code, and the built-in task data every run may read)."""
    target = out.expanduser().resolve()
    if target == PACKAGE or PACKAGE in target.parents:
        raise ValueError(f"--out {given} lies in mechcopy's own folder {PACKAGE}, which holds its code and task "
                         "data; write the results elsewhere")
    for flag, value in (inputs or {}).items():
        for item in [value] if isinstance(value, (str, Path)) else list(value or []):
            src = Path(item).expanduser()
            if not src.exists():
                continue
            src = src.resolve()
            same = target == src or (target.exists() and os.path.samefile(target, src))
            if same or (src.is_dir() and src in target.parents):
                raise ValueError(f"--out {given} would overwrite the input {flag} {item}; write the results elsewhere")


def _writable_folder(folder: Path, given: str | Path) -> None:
    """Create `folder` (and its parents) and make sure a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [folder, *folder.parents] if p.exists() and not p.is_dir())
        raise ValueError(f"--out {given}: {blocker} is a file, not a folder")
    except OSError as e:
        raise ValueError(f"--out {given}: cannot create the folder {folder} ({e.strerror})")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"--out {given}: cannot write in {folder} ({e.strerror})")


def saved_in(path: Path, what: str) -> Callable[[], str | None]:
    """What `main` says on Ctrl-C: `what` is in `path`, if it is there by then (None: nothing saved)."""
    return lambda: f"{what} in {path}: run the same command to resume" if path.exists() else None


def write_result(path: Path, model: HookedModel, payload: dict[str, Any]) -> Path:
    """Write a command's JSON result (with the model's fingerprint and the code's git revision)."""
    return write_json_atomic(path, {"model": model_fingerprint(model), "git_revision": git_revision(), **payload})
