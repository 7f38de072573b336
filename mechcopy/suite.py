"""Every task under every condition, checkpointed: `run_evaluation`, the evaluation `mechcopy evaluate`
and the main job run.

A result row (`ResultRow`) is one task under one condition: its `TaskResult` (the condition's label in
`condition`; on closed-label tasks its copy effect and demo share beside the copy rate), the task's kind,
the number of pairs its prompt builder dropped, the seconds, the condition's structured fields
(`ConditionSpec`: family, group, kind, ablation, positions, seed, means, readout, versus) and one record
per prompt (`PromptRecord`: text, answer, demo labels, prediction). As JSON it is `TaskResult.to_json()`
with those beside it (the spec under `spec`, the records under `per_prompt`). `copy_effects` gives the copy
effect pooled over tasks and with the task as the unit, for the part of a result that is not rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mechcopy.arch import HookedModel
from mechcopy.conditions import UNPRUNED, Condition, ConditionSpec
from mechcopy.errors import check_items, note
from mechcopy.copy_effect import copy_effect_report
from mechcopy.evaluation import TaskResult, check_context, evaluate_conditions
from mechcopy.fingerprint import model_fingerprint, numerics
from mechcopy.io import append_jsonl, write_jsonl_atomic
from mechcopy.progress import tqdm
from mechcopy.scoring import CONTENT_FREE, reference_queries
from mechcopy.tasks.prompts import ICLPrompt, PromptSet, build_prompts
from mechcopy.tasks.task import Task

#: the journal beside a result (`OUT.partial.jsonl`): its finished rows until the result is written
JOURNAL_SUFFIX = ".partial.jsonl"


@dataclass(frozen=True)
class PromptRecord:
    """One evaluated prompt as a result row records it: the prompt's text, its gold answer, its demo
    labels and the prediction (what anyone needs to recompute the outcome from the file alone)."""

    prompt: str
    answer: str
    demo_labels: tuple[str, ...]
    prediction: str

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "demo_labels": list(self.demo_labels),
                "prediction": self.prediction}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "PromptRecord":
        return cls(obj["prompt"], obj["answer"], tuple(obj["demo_labels"]), obj["prediction"])


@dataclass(frozen=True)
class ResultRow:
    """One task under one condition: the result, the task's kind, the pairs dropped, the seconds, and
    the condition's structured fields."""

    result: TaskResult
    kind: str
    n_dropped: int
    seconds: float
    spec: ConditionSpec
    per_prompt: tuple[PromptRecord, ...] = ()

    @property
    def task(self) -> str:
        return self.result.task

    @property
    def condition(self) -> str:
        """The condition's label (`unpruned`, `pruned`, `random-0`, `pruned@20`, ...)."""
        return self.result.condition

    def to_json(self) -> dict[str, Any]:
        return {**self.result.to_json(), "kind": self.kind, "n_dropped": self.n_dropped, "seconds": self.seconds,
                "spec": self.spec.to_json(), "per_prompt": [r.to_json() for r in self.per_prompt]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ResultRow":
        if "spec" not in obj:
            raise ValueError(f"result row ({obj.get('task')!r}, {obj.get('condition')!r}) carries no condition spec: "
                             "it was written by an older mechcopy; evaluate again to compare its conditions")
        return cls(TaskResult.from_json(obj), obj.get("kind", ""), obj.get("n_dropped", 0), obj.get("seconds", 0.0),
                   ConditionSpec.from_json(obj["spec"]),
                   tuple(PromptRecord.from_json(r) for r in obj.get("per_prompt", ())))


def build_prompt_sets(model: HookedModel, tasks, shots: int = 4, n: int = 100, seed: int = 0,
                      gold_in_demos: bool = True, copy_control: bool = False) -> dict[str, PromptSet]:
    """Every task's prompts (`tasks.prompts.build_prompts`), checked against the model's context."""
    prompt_sets = {task.name: build_prompts(task, model.tokenizer, shots=shots, n=n, seed=seed,
                                            gold_in_demos=gold_in_demos, copy_control=copy_control)
                   for task in tasks}
    for ps in prompt_sets.values():
        check_context(model, ps.prompts)
    return prompt_sets


def check_readouts(tasks, conditions: Sequence[Condition]) -> None:
    """Refuse label scoring on an open task (`Task.require_labels`): before any model work."""
    if any(c.readout.labels for c in conditions):
        for task in tasks:
            task.require_labels()


def run_evaluation(model: HookedModel, tasks, shots: int = 4, n: int = 100, seed: int = 0,
                   conditions: Sequence[Condition] | None = None, progress: bool = True,
                   batch_size: int = 128, checkpoint: str | Path | None = None,
                   gold_in_demos: bool = True, copy_control: bool = False) -> tuple[list[ResultRow], dict[str, list]]:
    """Build prompts for every task and evaluate every condition; returns (result rows, dropped pairs).

    `conditions` (default: `UNPRUNED` only) are evaluated in one pass per task (`evaluate_task`),
    `batch_size` rows (prompts x conditions) at a time; conditions that score labels (their `Readout`)
    need closed-label tasks (refused here otherwise). Arbitrary hooks go through
    `evaluation.evaluate(model, prompts, fwd_hooks=...)`. Every task's prompts are built and checked
    against the context before the first evaluation (`build_prompt_sets`); with `gold_in_demos=False`
    no demo carries its query's gold label, so every prediction equal to a demo label is a copy error;
    with `copy_control` every label is among a prompt's demos as often as it is absent (the
    construction the copy effect is estimated from). Every row of a closed-label task carries its copy
    effect and demo share beside the copy rate.

    With `checkpoint` (a JSON-lines file), every finished (task, condition) row is appended to it at
    once with a digest of its content, keyed by everything its numbers depend on: the model's
    fingerprint, dtype and device kind, the settings, the task's pairs and the condition (its fields,
    readout, components and means). Rows found there under the same key, whose digest matches, are
    reused, so a killed run started again redoes none of them and returns what an uninterrupted run
    returns (`read_journal`: rows of other settings are kept, damaged or edited ones evaluated again,
    and both are said).
    """
    tasks = check_items(tasks, Task, "tasks", "mechcopy.tasks.load_tasks('antonyms,to_upper')")
    conditions = [UNPRUNED] if conditions is None else check_items(
        conditions, Condition, "conditions", "mechcopy.conditions.UNPRUNED, standard_conditions(...)")
    check_readouts(tasks, conditions)
    prompt_sets = build_prompt_sets(model, tasks, shots, n, seed, gold_in_demos, copy_control)
    keys = _row_keys(model, tasks, shots, n, seed, conditions, gold_in_demos, copy_control) if checkpoint else {}
    done = read_journal(Path(checkpoint), keys) if checkpoint else {}
    rows: list[ResultRow] = []
    dropped: dict[str, list] = {}
    with tqdm(total=len(tasks) * len(conditions), initial=len(done), desc="evaluate", disable=not progress) as bar:
        for task in tasks:
            ps = prompt_sets[task.name]
            dropped[task.name] = [[list(pair), reason] for pair, reason in ps.dropped]
            todo = [c for c in conditions if keys.get((task.name, c.label)) not in done]
            bar.set_postfix_str(task.name)
            fresh = {r.condition: r for r in evaluate_task(model, task, ps, todo, seed, batch_size)} if todo else {}
            for c in conditions:
                if c.label not in fresh:
                    rows.append(done[keys[(task.name, c.label)]])
                    continue
                if checkpoint:
                    key, row = keys[(task.name, c.label)], fresh[c.label].to_json()
                    append_jsonl(checkpoint, {"key": key, "task": task.name, "condition": c.label, "row": row,
                                              "digest": _digest(key, row)})
                rows.append(fresh[c.label])
            bar.update(len(todo))
    return rows, dropped


def evaluate_task(model: HookedModel, task, prompts: PromptSet, conditions: Sequence[Condition],
                  seed: int = 0, batch_size: int = 128) -> list[ResultRow]:
    """One task's result rows, one per condition, from one pass (the seconds: the pass's time, shared
    equally by the rows; the per-prompt records: `PromptRecord`). A closed-label task's label set is what
    label-scored conditions choose from (with the reference queries their calibrations need:
    `scoring.reference_queries`, domain queries from the task's inputs) and gives every row its copy effect."""
    t0 = time.perf_counter()
    labels = task.label_set()
    calibrations = {c.readout.calibration for c in conditions}
    references = reference_queries(calibrations, [x for x, _ in task.pairs], seed)
    results = evaluate_conditions(model, prompts.prompts, conditions, seed=seed, batch_size=batch_size, labels=labels,
                                  references=references)
    seconds = round((time.perf_counter() - t0) / len(results), 2)
    return [ResultRow(results[c.label], task.kind, len(prompts.dropped), seconds, c.spec,
                      per_prompt(prompts.prompts, results[c.label].predictions)) for c in conditions]


def per_prompt(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> tuple[PromptRecord, ...]:
    """One record per prompt: its text, gold answer, demo labels and the prediction, so anyone can
    recompute a prediction (and its outcome) from the result file alone."""
    return tuple(PromptRecord(p.text, p.answer, tuple(p.demo_labels), pred) for p, pred in zip(prompts, predictions))


def copy_effects(rows: Sequence[ResultRow], prompt_sets: dict[str, PromptSet], tasks, seed: int = 0
                 ) -> dict[str, dict[str, Any]]:
    """The copy effect over tasks, per condition (the per-task figures are in the rows): pooled over
    the closed-label tasks whose effect could be estimated (each task weighs the same; prompts
    resampled within tasks) and with the task as the unit (`stats.task_level`): {condition: {"pooled",
    "task_level", "tasks"}} (`copy_effect.copy_effect_report` without its per-task part). The probe,
    on which neurons are chosen, is left out as it is from the pooled comparisons."""
    labels = {t.name: t.label_set() for t in tasks if t.kind != "probe"}
    by_condition: dict[str, dict] = {}
    for r in rows:
        if labels.get(r.task) is not None:
            by_condition.setdefault(r.condition, {})[r.task] = (prompt_sets[r.task].prompts, r.result.predictions,
                                                                labels[r.task])
    out = {}
    for condition, per_task in by_condition.items():
        report = copy_effect_report(per_task, seed=seed)
        out[condition] = {"pooled": report["pooled"], "task_level": report["task_level"],
                          "tasks": sorted(t for t, v in report["tasks"].items() if v["copy_effect"]["effect"] is not None)}
    return out


def _condition_key(condition: Condition) -> dict[str, Any]:
    """What a row of `condition` depends on: its fields, its components and its means' values."""
    means = condition.means
    digest = None
    if means is not None:
        h = hashlib.sha256()
        for layer, values in sorted(means.values.items()):
            h.update(str(layer).encode() + values.float().cpu().numpy().tobytes())
        digest = h.hexdigest()
    return {**condition.describe(), "label": condition.label,
            "components": None if condition.components is None else [list(x) for x in condition.components.pairs],
            "means_values": digest}


def _row_keys(model: HookedModel, tasks, shots: int, n: int, seed: int, conditions: Sequence[Condition],
              gold_in_demos: bool = True, copy_control: bool = False) -> dict[tuple[str, str], str]:
    """(task, condition label) -> a hash of everything its row depends on: model (dtype and device kind
    included), settings (the prompt construction, the content-free queries), pairs and label set,
    condition (readout: scoring and calibration, included)."""
    common = {"model": model_fingerprint(model), **numerics(model), "shots": shots, "n": n, "seed": seed,
              "gold_in_demos": gold_in_demos, "copy_control": copy_control, "content_free": list(CONTENT_FREE)}
    keys = {}
    for task in tasks:
        for c in conditions:
            what = {**common, "task": task.to_json(), "condition": _condition_key(c)}
            keys[(task.name, c.label)] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return keys


def _digest(key: str, row: Any) -> str:
    """What a journal line's row must hash to: an edited row (or another line's) is not reused."""
    return hashlib.sha256((key + json.dumps(row, sort_keys=True, default=str)).encode()).hexdigest()[:24]


def _entry_problem(entry: Any, wanted: set[str]) -> str | None:
    """Why a journal line cannot be reused by this run (None: it can; "other" if it is of other settings)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        return "not a journal entry"
    if entry["key"] not in wanted:
        return "other"
    if not isinstance(entry.get("row"), dict):
        return f"its row is {type(entry.get('row')).__name__}, not a result row"
    if entry.get("digest") != _digest(entry["key"], entry["row"]):
        return "its row does not match its digest (edited, or written by an older mechcopy)"
    return None


def read_journal(path: Path, keys: dict[tuple[str, str], str]) -> dict[str, ResultRow]:
    """The rows of the journal `path` that this run can reuse: key -> row, for the lines whose key is one
    of `keys` and whose row matches its digest. Nothing is dropped without a word: a line a kill cut
    short, a damaged or edited row (evaluated again), and rows of other settings (kept in the journal
    until this run's result is written) are each said. The file is rewritten with the reusable rows
    and those of other settings."""
    wanted = set(keys.values())
    entries: dict[str, dict] = {}
    rows: dict[str, ResultRow] = {}
    others: list[dict] = []
    bad: list[str] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            bad.append(f"line {i}: not JSON (cut short by a kill?)")
            continue
        problem = _entry_problem(entry, wanted)
        if problem == "other":
            others.append(entry)
        elif problem:
            bad.append(f"line {i}: {problem}")
        else:
            try:
                rows[entry["key"]] = ResultRow.from_json(entry["row"])
            except (KeyError, TypeError, ValueError) as e:
                bad.append(f"line {i}: its row is not a result row ({type(e).__name__}: {e})")
                continue
            entries[entry["key"]] = entry
    if path.exists():
        write_jsonl_atomic(path, [*others, *entries.values()])
    if bad:
        note(f"{path}: {len(bad)} line{'s' if len(bad) > 1 else ''} not reused ({'; '.join(bad[:3])}"
             f"{'; ...' if len(bad) > 3 else ''}); {'their rows are' if len(bad) > 1 else 'its row is'} evaluated again")
    if others:
        note(f"{path} also holds {len(others)} row{'s' if len(others) > 1 else ''} of other settings (another n, "
             "shots, seed, task data, condition, model, dtype or device): kept until this run's result is written, "
             "which removes the journal")
    if entries:
        note(f"resuming from {path}: {len(entries)} of {len(keys)} (task, condition) rows already done")
    return {key: rows[key] for key in entries}
