"""Writing results so no reader ever sees half a file, with the user's umask, and journals that
survive a kill."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the umask.

    `tempfile.mkstemp` and safetensors create files 0600 whatever the umask, so a shared cache or
    output folder would be unreadable by the group; every writer here applies this mode instead.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_mode(path: str | Path) -> Path:
    """Give a file written by a library that ignores the umask the mode of `file_mode()`."""
    os.chmod(path, file_mode())
    return Path(path)


def side_file(out: str | Path, suffix: str) -> Path:
    """`neurons.json` -> `neurons<suffix>`: files that belong to an output live beside it."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".json") else out.name
    return out.with_name(stem + suffix)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to a temporary file beside `path`, then rename, so no reader
    ever sees half a file; the temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (see `write_atomic`)."""
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


def _jsonl(obj: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":")) + "\n"


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append `obj` as one JSON line and fsync it: once this returns, a kill cannot lose it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_jsonl(obj))
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: str | Path, objs: Iterable[Any]) -> Path:
    """Replace a JSON-lines file with `objs`, one per line, atomically."""
    return write_atomic(path, "".join(_jsonl(o) for o in objs))


def parse_json(text: str, source: str) -> Any:
    """JSON from a user's file, strictly: a key given twice in one object is refused (json would keep
    the last silently), and so is nesting too deep to parse (a RecursionError otherwise). Every
    error is a ValueError that names `source`."""
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{source}: the key {key!r} appears twice in one object (JSON keeps only the "
                                 "last one); keep one")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{source}: its JSON is nested too deeply to read; check the file") from None


def read_json(path: str | Path, what: str = "") -> Any:
    """`parse_json` of the UTF-8 file `path` (`what` names it in errors, e.g. "task file")."""
    source = f"{what} {path}".strip()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_json(text, source)


def read_jsonl(path: str | Path) -> Iterator[Any]:
    """The objects of a JSON-lines file, skipping a line that a kill cut short (or any unreadable one)."""
    path = Path(path)
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def as_tuples(obj: Any) -> Any:
    """JSON lists back as the tuples a frozen result holds, at every depth (dicts kept as they are)."""
    return tuple(as_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj
