"""A task: named (input, output) pairs, and the check of a user's task file (`validate_task_json`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
KINDS = ("algorithmic", "linguistic", "translation", "knowledge", "counting", "probe", "sentiment", "user")
PROBE_NAME = "copy_probe"
#: The balanced probe's item pool (`mechcopy.tasks.probe.load_items`): data, but not a task.
PROBE_ITEMS = "probe_items"
#: names a task may not take: the results use them for rows that are not one task's (`stats.POOLED`)
RESERVED_NAMES = ("pooled",)
#: a task with at most this many distinct answers is closed-label unless its file says otherwise
MAX_LABELS = 12


@dataclass(frozen=True)
class Task:
    """A named list of (input, output) pairs; `kind` groups tasks in tables."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    kind: str = "user"
    #: the label set the file gives (`"labels"`); empty: the distinct answers
    labels: tuple[str, ...] = ()
    #: the file's `"closed"`: False refuses label scoring, True allows it beyond MAX_LABELS answers
    closed: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "pairs", tuple((str(x), str(y)) for x, y in self.pairs))
        object.__setattr__(self, "labels", tuple(map(str, self.labels)))

    def __len__(self) -> int:
        return len(self.pairs)

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"labels": list(self.labels)} if self.labels else {}
        extra.update({} if self.closed is None else {"closed": self.closed})
        return {"name": self.name, "kind": self.kind, "pairs": [list(p) for p in self.pairs], **extra}

    def label_set(self) -> tuple[str, ...] | None:
        """The labels a closed-label task answers with (the file's `labels`, else its distinct answers,
        sorted), or None for an open task (more than MAX_LABELS answers, or `"closed": false`)."""
        if self.closed is False:
            return None
        answers = self.labels or tuple(sorted({y for _, y in self.pairs}))
        return answers if self.closed or self.labels or len(answers) <= MAX_LABELS else None

    def require_labels(self) -> tuple[str, ...]:
        """`label_set()`, or a ValueError that says why this task cannot be label-scored."""
        labels = self.label_set()
        if labels is None:
            why = ('its file says "closed": false' if self.closed is False else
                   f"it has {len({y for _, y in self.pairs})} distinct answers (more than {MAX_LABELS}) "
                   'and its file gives no "labels"')
            raise ValueError(f"task {self.name!r} is open, so it cannot be scored as a label set: {why}; "
                             "use generation scoring for it")
        return labels

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Task":
        """The task `to_json` wrote (a user's task file goes through `validate_task_json`, which checks it)."""
        return cls(obj["name"], tuple((x, y) for x, y in obj["pairs"]), obj.get("kind", "user"))

    def distinct_pairs(self) -> tuple[list[tuple[str, str]], list[tuple[tuple[str, str], str]]]:
        """The pairs to use (in order) and the (pair, reason) of each pair left out: a repeat of an
        earlier pair, or any pair whose input has several outputs (no single answer is right)."""
        outputs: dict[str, set[str]] = {}
        for x, y in self.pairs:
            outputs.setdefault(x, set()).add(y)
        keep: dict[tuple[str, str], None] = {}
        dropped = []
        for pair in self.pairs:
            if len(outputs[pair[0]]) > 1:
                dropped.append((pair, f"input {pair[0]!r} has {len(outputs[pair[0]])} different outputs"))
            elif pair in keep:
                dropped.append((pair, "repeats an earlier pair"))
            else:
                keep[pair] = None
        return list(keep), dropped


def validate_task_json(obj: Any, source: str = "task file") -> Task:
    """Check a task object `{"name": str, "pairs": [[input, output], ...]}` and build the Task.

    Every error names `source`, the entry index and the field, and says what to do. Inputs and
    outputs must be non-empty strings without newlines (the newline separates demonstrations).
    """
    fix = 'expected {"name": "...", "pairs": [["input", "output"], ...]}'
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, got {type(obj).__name__}; {fix}")
    if "name" not in obj:
        raise ValueError(f'{source}: missing field "name"; {fix}')
    name = obj["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f'{source}: field "name" must be a non-empty string, got {name!r}')
    if name.strip() in RESERVED_NAMES:
        raise ValueError(f'{source}: the task name {name!r} is reserved (the comparison over all tasks is '
                         'called so in the results); give the task another "name"')
    if "pairs" not in obj:
        raise ValueError(f'{source}: missing field "pairs"; {fix}')
    pairs = obj["pairs"]
    if not isinstance(pairs, list):
        raise ValueError(f'{source}: field "pairs" must be a list of [input, output] pairs, '
                         f"got {type(pairs).__name__}")
    if not pairs:
        raise ValueError(f'{source}: field "pairs" is empty; a task needs at least two pairs')
    out = []
    for i, pair in enumerate(pairs):
        where = f"{source}: pairs[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{where} must be a list of 2 strings [input, output], got {pair!r}")
        for field, value in zip(("input", "output"), pair):
            if not isinstance(value, str):
                raise ValueError(f"{where} {field} must be a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise ValueError(f"{where} {field} is empty (or only whitespace)")
            if "\n" in value or "\r" in value:
                raise ValueError(f"{where} {field} contains a newline ({value!r}); newlines separate "
                                 "demonstrations, so inputs and outputs must be single lines")
        out.append((pair[0], pair[1]))
    kind = obj.get("kind", "user")
    if kind not in KINDS:
        raise ValueError(f'{source}: field "kind" must be one of {", ".join(KINDS)}, got {kind!r}')
    closed = obj.get("closed")
    if closed is not None and not isinstance(closed, bool):
        raise ValueError(f'{source}: field "closed" must be true or false, got {closed!r}')
    labels = obj.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() and "\n" not in x for x in labels):
        raise ValueError(f'{source}: field "labels" must be a list of non-empty one-line strings, got {labels!r}')
    if len(set(labels)) != len(labels) or (labels and closed is False):
        raise ValueError(f'{source}: field "labels" ' + ("repeats a label" if len(set(labels)) != len(labels) else
                         'contradicts "closed": false; give one of them'))
    missing = sorted({y for _, y in out} - set(labels)) if labels else []
    if missing:
        raise ValueError(f'{source}: answers {missing[:3]} are not in "labels"; every answer must be a label')
    return Task(name=name, pairs=tuple(out), kind=kind, labels=tuple(labels), closed=closed)
