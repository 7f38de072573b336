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

import json
from pathlib import Path

from mechcopy.errors import UnknownName
from mechcopy.tasks.generators import GENERATORS
from mechcopy.tasks.probe import probe_task
from mechcopy.tasks.task import DATA_DIR, KINDS, MAX_LABELS, PROBE_ITEMS, PROBE_NAME, Task, validate_task_json


def list_tasks() -> list[str]:
    """Built-in task names: the JSON data files, the generators, and the copy probe."""
    names = sorted(p.stem for p in DATA_DIR.glob("*.json") if p.stem != PROBE_ITEMS)
    names += sorted(g for g in GENERATORS if g not in names)
    return names + [PROBE_NAME]


def load_task(name_or_path: str) -> Task:
    """A built-in task by name (see `list_tasks`), or a user task file `FILE.json`."""
    if name_or_path == PROBE_NAME:
        return probe_task()
    if name_or_path in GENERATORS:
        return GENERATORS[name_or_path]()
    builtin = DATA_DIR / f"{name_or_path}.json"
    if builtin.is_file() and "/" not in name_or_path and name_or_path != PROBE_ITEMS:
        return _read_task(builtin)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _read_task(path)
    if path.exists() or name_or_path.endswith(".json") or "/" in name_or_path:
        raise FileNotFoundError(f"task file {name_or_path} " + ("is not a file" if path.exists() else "does not exist"))
    raise UnknownName(f"unknown task {name_or_path!r}: not a built-in task ({', '.join(list_tasks())}) "
                      "and not a JSON file")


def _read_task(path: Path) -> Task:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return validate_task_json(obj, source=str(path))


def load_tasks(spec: str) -> list[Task]:
    """`"all"` (every built-in task), `"name,name"` (built-in names or files), or `"FILE.json"`.

    A task listed twice, or two tasks with the same name (a task file named like a built-in task),
    are refused: their rows could not be told apart.
    """
    spec = spec.strip()
    if spec == "all":
        return [load_task(n) for n in list_tasks()]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("no tasks given: use 'all', a comma-separated list of names, or a FILE.json")
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


__all__ = ["Task", "list_tasks", "load_task", "load_tasks", "validate_task_json", "DATA_DIR", "KINDS", "MAX_LABELS",
           "PROBE_ITEMS", "PROBE_NAME"]
