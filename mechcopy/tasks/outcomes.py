"""What a prediction is: correct, a copy error, or another error. The one home of the copy rule.

A *copy error* is a wrong prediction equal to one of the demo labels (`copy_error`). On prompts that
carry a label space (the balanced probe), a wrong prediction is further a wrong label that no demo
shows (`in_range`) or not a label at all (`other`): `outcomes` gives each prediction one of `OUTCOMES`.
Everything here compares stripped strings and needs no model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from mechcopy.tasks.prompts import ICLPrompt

OUTCOMES = ("correct", "copy", "in_range", "other")


def copy_error(prediction: str, answer: str, labels: Iterable[str]) -> bool:
    """The copy-error rule: a wrong prediction equal to one of `labels` (all compared after strip())."""
    pred = prediction.strip()
    return pred != answer.strip() and pred in {label.strip() for label in labels}


def _paired(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> None:
    if len(predictions) != len(prompts):
        raise ValueError(f"{len(predictions)} predictions for {len(prompts)} prompts; they must pair up one to one")


def classify(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean arrays (correct, copy): correct = prediction equals the answer (stripped); copy =
    `copy_error` against the prompt's demo labels."""
    _paired(prompts, predictions)
    correct = np.array([pred.strip() == p.answer.strip() for p, pred in zip(prompts, predictions)], dtype=bool)
    copy = np.array([copy_error(pred, p.answer, p.demo_labels) for p, pred in zip(prompts, predictions)], dtype=bool)
    return correct, copy


def outcomes(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> np.ndarray:
    """Each prediction as one of `OUTCOMES`: correct; copy (a wrong demo label, `copy_error`); in_range
    (wrong, in the prompt's `label_space`, no demo's label); other (not a label at all)."""
    _paired(prompts, predictions)
    out = []
    for p, pred in zip(prompts, predictions):
        if not p.label_space:
            raise ValueError(f"prompt {p.text!r} has no label_space: build it with build_probe")
        pred = pred.strip()
        if pred == p.answer.strip():
            out.append("correct")
        elif copy_error(pred, p.answer, p.demo_labels):
            out.append("copy")
        elif pred in {label.strip() for label in p.label_space}:
            out.append("in_range")
        else:
            out.append("other")
    return np.array(out)


def outcome_rates(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> dict[str, float]:
    """Share of each outcome, and copy / in_range per available label: a model that errs on a uniform
    wrong in-range label has equal per-label rates; copying shows as copy_per_label >> in_range_per_label."""
    codes = outcomes(prompts, predictions)
    rates = {o: float((codes == o).mean()) for o in OUTCOMES}
    n_demo = np.mean([len(set(p.demo_labels) - {p.answer}) for p in prompts])
    n_absent = np.mean([len(set(p.label_space) - set(p.demo_labels) - {p.answer}) for p in prompts])
    rates["copy_per_label"] = float(rates["copy"] / n_demo)
    rates["in_range_per_label"] = float(rates["in_range"] / n_absent) if n_absent else float("nan")
    return rates


def outcome_arrays(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> dict[str, np.ndarray]:
    """0-1 outcome per prompt: accuracy and copy_rate (and in_range_rate, for prompts that carry a label
    space): what paired comparisons of rates take."""
    correct, copy = classify(prompts, predictions)
    out = {"accuracy": correct, "copy_rate": copy}
    if all(p.label_space for p in prompts):
        out["in_range_rate"] = outcomes(prompts, predictions) == "in_range"
    return out


def copy_rate(predictions: Sequence[str], prompts: Sequence[ICLPrompt], labels: Iterable[str]) -> float:
    """Share of predictions that are copy errors against one label set `labels` (e.g. the demo labels of
    the prompts a task vector was extracted from), NaN for no predictions."""
    if not predictions:
        return float("nan")
    labels = frozenset(labels)
    return sum(copy_error(pred, p.answer, labels) for pred, p in zip(predictions, prompts)) / len(predictions)
