"""The opening every command shares: flags named like the API they feed, the model (threads, device,
dtype), the output path, the JSON written at the end, and errors as one clear line.

A command module defines `register(sub)`, which adds its parser and sets `run=fn(args)`.
Everything is checked before the model loads, so a bad flag costs seconds, not a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable

from mechcopy.arch import HookedModel
from mechcopy.models.zoo import DEFAULT_MODEL

DTYPES = ("float32", "float64", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --threads."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo model name or model folder (default {DEFAULT_MODEL}; `mechcopy models` lists the zoo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights' dtype (default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest beside other jobs)")


def add_config_args(p: argparse.ArgumentParser, cls: type, helps: dict[str, str],
                    choices: dict[str, Iterable[str]] | None = None) -> None:
    """One flag per field of the frozen config `cls` named in `helps`: `--n-dev` feeds `n_dev`.

    Defaults come from the dataclass; tuples of ints are written comma-separated (`--ks 5,10,20`).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    choices = choices or {}
    for name, help_text in helps.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _base_type(hints[name])
        kwargs: dict[str, Any] = {"default": default, "help": f"{help_text} (default {_show(default)})"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _int_tuple if kind is tuple else kind
            kwargs["metavar"] = name.upper()
        if name in choices:
            kwargs["choices"] = list(choices[name])
            kwargs.pop("metavar", None)
        p.add_argument("--" + name.replace("_", "-"), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any):
    """The frozen config `cls` from the parsed flags (fields without a flag keep their default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return tuple
    if args:
        return _base_type(args[0])
    return hint


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 5,10,20, got {text!r}")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def open_model(args: argparse.Namespace):
    """Apply --threads, then load --model on --device in --dtype."""
    import torch

    from mechcopy.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))


def prepare_out(path: str | Path | None, inputs: Iterable[str | Path | None] = ()) -> Path | None:
    """Check an output file before any work: not one of the inputs; its folder is created."""
    if path is None:
        return None
    out = Path(path).expanduser()
    for item in inputs:
        if item is not None and Path(item).expanduser().resolve() == out.resolve():
            raise ValueError(f"--out {path} is also an input of this command; write the results elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_result(path: Path, model: HookedModel, payload: dict[str, Any]) -> Path:
    """Write a command's JSON result (with the model's fingerprint and the code's git revision)."""
    from mechcopy.io import write_json_atomic
    from mechcopy.neurons import model_fingerprint
    from mechcopy.reproduce import git_revision

    return write_json_atomic(path, {"model": model_fingerprint(model), "git_revision": git_revision(), **payload})
