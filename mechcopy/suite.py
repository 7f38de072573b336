"""Every task under every condition, checkpointed: `run_evaluation`, the evaluation `mechcopy evaluate`
and the main job run.

A result row is `TaskResult.to_json()` (the condition's label in `condition`; on closed-label tasks its
copy effect and demo share beside the copy rate) plus the task's kind, the number of pairs its prompt
builder dropped, the seconds, and the condition's structured fields in `spec` (`Condition.describe`:
family, group, kind, ablation, positions, seed, means, readout, versus). `copy_effects` gives the copy
effect pooled over tasks and with the task as the unit, for the part of a result that is not rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from mechcopy.arch import HookedModel
from mechcopy.conditions import UNPRUNED, Condition
from mechcopy.errors import note
from mechcopy.copy_effect import copy_effect_report
from mechcopy.evaluation import check_context, evaluate_conditions
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import append_jsonl, read_jsonl, write_jsonl_atomic
from mechcopy.scoring import CONTENT_FREE, reference_queries
from mechcopy.tasks.prompts import PromptSet, build_prompts


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
                   gold_in_demos: bool = True, copy_control: bool = False) -> tuple[list[dict], dict]:
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
    once, keyed by the model's fingerprint, the settings, the task's pairs and the condition (its
    fields, readout, components and means); rows found there under the same key are reused, so a
    killed run started again redoes none of them and returns what an uninterrupted run returns.
    """
    conditions = [UNPRUNED] if conditions is None else list(conditions)
    check_readouts(tasks, conditions)
    prompt_sets = build_prompt_sets(model, tasks, shots, n, seed, gold_in_demos, copy_control)
    keys = _row_keys(model, tasks, shots, n, seed, conditions, gold_in_demos, copy_control) if checkpoint else {}
    done = _read_journal(Path(checkpoint), keys) if checkpoint else {}
    rows, dropped = [], {}
    with tqdm(total=len(tasks) * len(conditions), initial=len(done), desc="evaluate", disable=not progress) as bar:
        for task in tasks:
            ps = prompt_sets[task.name]
            dropped[task.name] = [[list(pair), reason] for pair, reason in ps.dropped]
            todo = [c for c in conditions if keys.get((task.name, c.label)) not in done]
            bar.set_postfix_str(task.name)
            fresh = {r["condition"]: r for r in evaluate_task(model, task, ps, todo, seed, batch_size)} if todo else {}
            for c in conditions:
                key = keys.get((task.name, c.label))
                if c.label in fresh and checkpoint:
                    append_jsonl(checkpoint, {"key": key, "task": task.name, "condition": c.label, "row": fresh[c.label]})
                rows.append(fresh[c.label] if c.label in fresh else done[key])
            bar.update(len(todo))
    return rows, dropped


def evaluate_task(model: HookedModel, task, prompts: PromptSet, conditions: Sequence[Condition],
                  seed: int = 0, batch_size: int = 128) -> list[dict]:
    """One task's result rows, one per condition, from one pass: `TaskResult.to_json()` plus the task
    kind, the number of dropped pairs, the seconds (the pass's time, shared equally by the rows) and
    the condition's `spec`. A closed-label task's label set is what label-scored conditions choose
    from (with the reference queries their calibrations need: `scoring.reference_queries`, domain
    queries from the task's inputs) and gives every row its copy effect."""
    t0 = time.perf_counter()
    labels = task.label_set()
    calibrations = {c.readout.calibration for c in conditions}
    references = reference_queries(calibrations, [x for x, _ in task.pairs], seed)
    results = evaluate_conditions(model, prompts.prompts, conditions, seed=seed, batch_size=batch_size, labels=labels,
                                  references=references)
    seconds = round((time.perf_counter() - t0) / len(results), 2)
    return [{**results[c.label].to_json(), "kind": task.kind, "n_dropped": len(prompts.dropped), "seconds": seconds,
             "spec": c.describe()} for c in conditions]


def copy_effects(rows: Sequence[dict], prompt_sets: dict[str, PromptSet], tasks, seed: int = 0) -> dict[str, dict]:
    """The copy effect over tasks, per condition (the per-task figures are in the rows): pooled over
    the closed-label tasks whose effect could be estimated (each task weighs the same; prompts
    resampled within tasks) and with the task as the unit (`stats.task_level`): {condition: {"pooled",
    "task_level", "tasks"}} (`copy_effect.copy_effect_report` without its per-task part). The probe,
    on which neurons are chosen, is left out as it is from the pooled comparisons."""
    labels = {t.name: t.label_set() for t in tasks if t.kind != "probe"}
    by_condition: dict[str, dict] = {}
    for r in rows:
        if r["task"] in labels and labels[r["task"]] is not None:
            by_condition.setdefault(r["condition"], {})[r["task"]] = (prompt_sets[r["task"]].prompts, r["predictions"],
                                                                     labels[r["task"]])
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
    """(task, condition label) -> a hash of everything its row depends on: model, settings (the prompt
    construction, the content-free queries), pairs and label set, condition (readout: scoring and
    calibration, included)."""
    common = {"model": model_fingerprint(model), "shots": shots, "n": n, "seed": seed, "gold_in_demos": gold_in_demos,
              "copy_control": copy_control, "content_free": list(CONTENT_FREE)}
    keys = {}
    for task in tasks:
        for c in conditions:
            what = {**common, "task": task.to_json(), "condition": _condition_key(c)}
            keys[(task.name, c.label)] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return keys


def _read_journal(path: Path, keys: dict[tuple[str, str], str]) -> dict[str, dict]:
    """Rows of `path` whose key is one of `keys` (key -> row). The file is rewritten with those rows
    only, so lines under other keys, and a last line a kill cut short, do not stay in the way."""
    wanted = set(keys.values())
    entries = {e["key"]: e for e in read_jsonl(path) if isinstance(e, dict) and e.get("key") in wanted and "row" in e}
    if path.exists():
        write_jsonl_atomic(path, entries.values())
    if entries:
        note(f"resuming from {path}: {len(entries)} of {len(keys)} (task, condition) rows already done")
    return {key: e["row"] for key, e in entries.items()}
