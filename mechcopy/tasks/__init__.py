"""ICL tasks: built-in JSON data, seeded generators, the copy probe, and user task files.

A task is a list of (input, output) string pairs. Built-in tasks live in `mechcopy/tasks/data/*.json`
(`{"name", "kind", "description", "pairs": [[x, y], ...]}`), generators in
`mechcopy.tasks.generators.GENERATORS`, and the copy probe (vowel counting) in `mechcopy.tasks.probe`
(its item pool, `data/probe_items.json`, is not a task).
A user task file has the same shape (`{"name": ..., "pairs": [[x, y], ...]}`); `validate_task_json`
checks it and names the entry and field of every problem. A task is *closed-label* (its answers can be
scored as a label set, `Task.label_set`) when it has at most `MAX_LABELS` distinct answers, unless its
file says otherwise: `"labels": [...]` gives the set, `"closed": false` refuses label scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mechcopy.errors import UnknownName, check_number, input_file
from mechcopy.io import read_json
from mechcopy.tasks.generators import GENERATORS
from mechcopy.tasks.probe import probe_task
from mechcopy.tasks.task import (DATA_DIR, KINDS, MAX_LABELS, PROBE_ITEMS, PROBE_NAME, RESERVED_NAMES, Task,
                                 validate_task_json)

def list_tasks() -> list[str]:
    """Built-in task names: the JSON data files, the generators, and the copy probe."""
    names = sorted(p.stem for p in DATA_DIR.glob("*.json") if p.stem != PROBE_ITEMS)
    names += sorted(g for g in GENERATORS if g not in names)
    return names + [PROBE_NAME]


def load_task(name_or_path: str) -> Task:
    """A built-in task by name (see `list_tasks`), or a user task file `FILE.json`."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise TypeError(f"a task is a built-in task name or a task file, got {type(name_or_path).__name__} "
                        f"{name_or_path!r}")
    name_or_path = str(name_or_path)
    if name_or_path == PROBE_NAME:
        return probe_task()
    if name_or_path in GENERATORS:
        return GENERATORS[name_or_path]()
    builtin = _builtin_file(name_or_path)
    if builtin is not None:
        return _read_task(builtin)
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.endswith(".json") or "/" in name_or_path:
        return _read_task(input_file(name_or_path, "task file"))
    raise UnknownName(f"unknown task {name_or_path!r}: not a built-in task ({', '.join(list_tasks())}) "
                      "and not a JSON file")


def _builtin_file(name: str) -> Path | None:
    """The data file of the built-in task `name`, if it is one."""
    builtin = DATA_DIR / f"{name}.json"
    return builtin if builtin.is_file() and "/" not in name and name != PROBE_ITEMS else None


def task_file(name: str) -> Path | None:
    """The file a task name or path is read from (a built-in task's data file too), or None (a
    generator, the probe, an unknown name): what an output must never overwrite."""
    if name == PROBE_NAME or name in GENERATORS:
        return None
    path = _builtin_file(name) or Path(name).expanduser()
    return path if path.is_file() else None


def _read_task(path: Path) -> Task:
    return validate_task_json(read_json(path), source=str(path))


def task_names(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """The tasks a spec names: `"all"`, a comma-separated list, or a list of names and files.

    A comma separates tasks, but a file whose name holds a comma is one task when it exists
    (`a,b.json`); a list (the API) needs no separator at all.
    """
    if isinstance(spec, Path):
        return [str(spec)]
    if isinstance(spec, (list, tuple)):
        bad = [s for s in spec if not isinstance(s, (str, Path)) or not str(s).strip()]
        if bad:
            raise TypeError(f"tasks must be task names or task files, got {bad[0]!r}")
        return [str(s).strip() for s in spec]
    if not isinstance(spec, str):
        raise TypeError(f"tasks must be 'all', a comma-separated string of names or files, or a list of them, "
                        f"got {type(spec).__name__} {spec!r}")
    spec = spec.strip()
    if spec == "all":
        return list_tasks()
    if Path(spec).expanduser().is_file():
        return [spec]
    parts, names, i = spec.split(","), [], 0
    while i < len(parts):
        # the longest run of parts that joins into an existing file name, else one part
        j = next((j for j in range(len(parts), i + 1, -1) if Path(",".join(parts[i:j]).strip()).expanduser().is_file()),
                 i + 1)
        name = ",".join(parts[i:j]).strip()
        if name:
            names.append(name)
        i = j
    if not names:
        raise ValueError("no tasks given: use 'all', a comma-separated list of names, or a FILE.json")
    return names


def load_tasks(spec: str | Path | Sequence[str | Path]) -> list[Task]:
    """`"all"` (every built-in task), `"name,name"` (built-in names or files), `"FILE.json"`, or a list
    of names and files (see `task_names`).

    A task listed twice, or two tasks with the same name (a task file named like a built-in task),
    are refused: their rows could not be told apart.
    """
    names = task_names(spec)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task {repeated[0]!r} is listed twice; list each task once")
    tasks = [load_task(n) for n in names]
    seen: dict[str, str] = {}
    for given, task in zip(names, tasks):
        if task.name in seen:
            raise ValueError(f"{seen[task.name]} and {given} are both named {task.name!r}, so their results could "
                             "not be told apart; give the task file another \"name\"")
        seen[task.name] = given
    return tasks


def check_shots(tasks: Sequence[Task], shots: int, flag: str = "shots") -> None:
    """Refuse, before any model loads, a number of shots that a task cannot fill: a prompt needs
    `shots` demonstrations and a query, all distinct pairs. (Pairs the tokenizer cannot make exact
    are dropped later, so passing this is necessary, not sufficient.)"""
    check_number(shots, flag, low=0, integer=True)
    for task in tasks:
        n = len(task.distinct_pairs()[0])
        if n < shots + 1:
            raise ValueError(f"{flag} {shots}: task {task.name!r} has {n} distinct pairs, and {shots} shots need at "
                             f"least {shots + 1} (the demonstrations and a query); use fewer shots or add pairs")


__all__ = ["Task", "list_tasks", "load_task", "load_tasks", "task_names", "task_file", "check_shots",
           "validate_task_json", "DATA_DIR", "KINDS", "MAX_LABELS", "PROBE_ITEMS", "PROBE_NAME", "RESERVED_NAMES"]
