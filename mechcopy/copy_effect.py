"""Copying told apart from label preference, on closed-label tasks.

The copy rate counts every wrong answer that is a demo label. On a label task that mixes two things:
a model that copies from its demos, and a model that prefers some labels whatever the demos show (with
2 labels and no gold among the demos every wrong answer is a demo label). Two measures separate them:

- **The copy effect.** For a label X and a prompt whose gold is not X, does X's presence among the
  demos make the answer X more likely? Per label, P(answer = X | X among the demos) minus
  P(answer = X | X absent), over the prompts where X is wrong; averaged over the labels where both
  can be estimated, so a preference for one label cancels (it raises both terms). Prompts built with
  `build_prompts(..., copy_control=True)` show each label as often as they leave it out. The effect
  is null, with the reason, where the prompts cannot estimate it: with 2 labels and no gold among the
  demos the wrong label is always present.
- **The demo share against chance** (the probe's test, `docs/replication.md` section 1): of the wrong
  answers inside the label set, the share that are demo labels, against the share expected if the
  wrong answer ignored which labels the demos show: per prompt, (wrong labels among its demos) /
  (wrong labels). Exact Poisson-binomial test (the binomial where every prompt has the same chance).
  The chance share assumes the demos' labels are drawn without regard to which labels the model
  prefers: true of the balanced probe and of the copy-control construction, only roughly of the
  standard one (a task's frequent labels are its frequent demo labels).

Intervals resample prompts (percentile bootstrap); pooled figures weigh every task the same and
resample prompts within tasks; `mechcopy.stats.task_level` takes the task as the unit.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mechcopy.errors import check_items
from mechcopy.stats import check_boot, rate_interval, task_level
from mechcopy.tasks.prompts import ICLPrompt

N_BOOT = 2000


def _tuple(x):
    return None if x is None else tuple(x)


@dataclass(frozen=True)
class CopyEffect:
    """The copy effect of one task (or "pooled"): `effect` = `present_rate` − `absent_rate`, each the
    mean over `labels` (those with both estimates) of P(answer = X | X among / not among the demos) on
    prompts whose gold is not X; `n_present` / `n_absent` (prompt, wrong label) pairs behind them. None
    with `reason` where it cannot be estimated."""

    task: str
    n: int
    effect: float | None
    ci: tuple[float, float] | None
    present_rate: float | None
    absent_rate: float | None
    n_present: int
    n_absent: int
    labels: tuple[str, ...]
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"], d["labels"] = (None if self.ci is None else list(self.ci)), list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CopyEffect":
        return cls(**{**d, "ci": _tuple(d["ci"]), "labels": tuple(d["labels"])})


@dataclass(frozen=True)
class DemoShare:
    """Of the `n_wrong` wrong answers inside the label set, `n_demo` are demo labels: `share` (exact
    95% interval `ci`) against `chance`, the mean over those prompts of (wrong labels among the demos)
    / (wrong labels); `p_value` of the exact two-sided Poisson-binomial test. None with `reason` where
    there is no wrong in-set answer."""

    task: str
    n_wrong: int
    n_demo: int
    share: float | None
    ci: tuple[float, float] | None
    chance: float | None
    p_value: float | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = None if self.ci is None else list(self.ci)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DemoShare":
        return cls(**{**d, "ci": _tuple(d["ci"])})


# ---------------------------------------------------------------- per task


def _arrays(prompts: Sequence[ICLPrompt], predictions: Sequence[str], labels: Sequence[str]):
    """[prompts, labels] booleans: X is among the demos, X is wrong (not the gold), the answer is X."""
    prompts = check_items(prompts, ICLPrompt, "prompts", "tasks.prompts.build_prompts(...).prompts")
    predictions = check_items(predictions, str, "predictions", "evaluation.predict(...)")
    if len(prompts) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(prompts)} prompts; they must pair up one to one")
    labels = [y.strip() for y in check_items(labels, str, "labels", "the task's label set, Task.label_set()")]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"the copy effect needs at least two distinct labels, got {labels}")
    shown = np.array([[y in {d.strip() for d in p.demo_labels} for y in labels] for p in prompts], dtype=bool)
    wrong = np.array([[y != p.answer.strip() for y in labels] for p in prompts], dtype=bool)
    said = np.array([[y == pred.strip() for y in labels] for pred in predictions], dtype=bool)
    return shown, wrong, said


def _rates(weights: np.ndarray, shown, wrong, said, cols) -> tuple[np.ndarray, np.ndarray]:
    """P(answer = X | X shown / not shown, X wrong) per label column `cols`, for prompt weights
    [reps, prompts] (bootstrap counts; one row of ones for the sample itself): [reps, len(cols)] each."""
    out = []
    for here in (shown, ~shown):
        den = weights @ (here & wrong)[:, cols].astype(float)
        num = weights @ (here & wrong & said)[:, cols].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    return out[0], out[1]


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` leaving out nan (nan where every value is nan), without numpy's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _why_not(shown, wrong) -> str:
    n_labels = shown.shape[1]
    gold_shown = (shown & ~wrong).any()
    if not (shown & wrong).any():
        return "no wrong label is ever among the demos"
    if not (~shown & wrong).any():
        hint = (f" (with {n_labels} labels and no gold among the demos the wrong label is always present)"
                if n_labels == 2 and not gold_shown else "")
        return "every wrong label is among the demos whenever it is wrong" + hint
    return "no label is both among the demos and absent from them on prompts where it is wrong"


def _effect(task, prompts, predictions, labels, n_boot, rng) -> tuple[CopyEffect, np.ndarray | None]:
    shown, wrong, said = _arrays(prompts, predictions, labels)
    n = len(prompts)
    n_present, n_absent = int((shown & wrong).sum()), int((~shown & wrong).sum())
    pres, absn = _rates(np.ones((1, n)), shown, wrong, said, slice(None))
    cols = np.flatnonzero(~np.isnan(pres[0]) & ~np.isnan(absn[0]))
    if not len(cols):
        return CopyEffect(task, n, None, None, None, None, n_present, n_absent, (), _why_not(shown, wrong)), None
    present_rate, absent_rate = float(pres[0, cols].mean()), float(absn[0, cols].mean())
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    bp, ba = _rates(weights, shown, wrong, said, cols)
    reps = _nanmean(bp - ba, axis=1)                # labels a replicate cannot estimate are left out
    lo, hi = np.nanquantile(reps, [0.025, 0.975])
    return CopyEffect(task, n, present_rate - absent_rate, (float(lo), float(hi)), present_rate, absent_rate,
                      n_present, n_absent, tuple(labels[c] for c in cols)), reps


def copy_effect(prompts: Sequence[ICLPrompt], predictions: Sequence[str], labels: Sequence[str] | None,
                task: str | None = None, n_boot: int = N_BOOT, seed: int = 0) -> CopyEffect:
    """The copy effect of one task's predictions (see the module docstring); `labels` is the task's
    label set (`Task.label_set()`), None for an open task (the effect is then null)."""
    check_boot(n_boot, seed)
    name = task or (prompts[0].task if prompts else "")
    if labels is None:
        return CopyEffect(name, len(prompts), None, None, None, None, 0, 0, (),
                          "an open task has no label set (more than 12 distinct answers or \"closed\": false)")
    return _effect(name, prompts, predictions, labels, n_boot, np.random.default_rng(seed))[0]


def copy_effect_difference(per_task: Mapping[str, tuple[Sequence[ICLPrompt], Sequence[str], Sequence[str], Sequence[str]]],
                           n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """The paired difference of two conditions' copy effects on the same prompts, pooled over tasks
    (task -> (prompts, predictions a, predictions b, label set)): diff = mean over tasks of CE(a) - CE(b),
    each task's effects over the label columns both can estimate (the same for a and b: which labels
    are shown and wrong depends on the prompts only). The (1 - alpha) interval is a task-stratified
    paired bootstrap: one resample of each task's prompts serves both conditions. Tasks where neither
    can be estimated are left out and listed. {"diff", "ci", "tasks": {task: diff}, "left_out", "n_boot"}."""
    diffs, reps, left_out = {}, [], []
    for i, (t, (prompts, a, b, labels)) in enumerate(per_task.items()):
        shown, wrong, said_a = _arrays(prompts, a, labels)
        said_b = _arrays(prompts, b, labels)[2]
        n = len(prompts)
        pres, absn = _rates(np.ones((1, n)), shown, wrong, said_a, slice(None))
        cols = np.flatnonzero(~np.isnan(pres[0]) & ~np.isnan(absn[0]))
        if not len(cols):
            left_out.append(t)
            continue
        pb, ab = _rates(np.ones((1, n)), shown, wrong, said_b, cols)
        diffs[t] = float((pres[0, cols] - absn[0, cols]).mean() - (pb[0] - ab[0]).mean())
        weights = np.random.default_rng([seed, i]).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
        ra, rb = _rates(weights, shown, wrong, said_a, cols), _rates(weights, shown, wrong, said_b, cols)
        reps.append(_nanmean((ra[0] - ra[1]) - (rb[0] - rb[1]), axis=1))
    if not diffs:
        return {"diff": None, "ci": None, "tasks": {}, "left_out": left_out, "n_boot": n_boot}
    lo, hi = np.nanquantile(_nanmean(np.stack(reps), axis=0), [alpha / 2, 1 - alpha / 2])
    return {"diff": float(np.mean(list(diffs.values()))), "ci": [float(lo), float(hi)], "tasks": diffs,
            "left_out": left_out, "n_boot": n_boot}


def poisson_binomial_test(k: int, chances: Sequence[float] | np.ndarray) -> float:
    """Two-sided exact p-value of k successes among independent trials with success probabilities
    `chances`: the total probability of every count no more likely than k (scipy's binomial rule)."""
    pmf = np.ones(1)
    for c in chances:
        pmf = np.convolve(pmf, [1.0 - c, c])
    if not 0 <= k < len(pmf):
        raise ValueError(f"k must lie in [0, {len(pmf) - 1}], got {k}")
    return float(min(1.0, pmf[pmf <= pmf[k] * (1 + 1e-7)].sum()))


def demo_share(prompts: Sequence[ICLPrompt], predictions: Sequence[str], labels: Sequence[str] | None,
               task: str | None = None) -> DemoShare:
    """The probe's demo-share test on any label task (see the module docstring)."""
    name = task or (prompts[0].task if prompts else "")
    if labels is None:
        return DemoShare(name, 0, 0, None, None, None, None, "an open task has no label set")
    shown, wrong, said = _arrays(prompts, predictions, labels)
    mine = (said & wrong).any(axis=1)                 # wrong answers inside the label set
    n_wrong = int(mine.sum())
    if not n_wrong:
        return DemoShare(name, 0, 0, None, None, None, None, "no wrong answer inside the label set")
    n_demo = int((said & wrong & shown).any(axis=1)[mine].sum())
    chances = ((shown & wrong).sum(axis=1) / wrong.sum(axis=1))[mine]
    return DemoShare(name, n_wrong, n_demo, n_demo / n_wrong, rate_interval(n_demo, n_wrong), float(chances.mean()),
                     poisson_binomial_test(n_demo, chances))


# ---------------------------------------------------------------- all tasks


def copy_effect_report(per_task: Mapping[str, tuple[Sequence[ICLPrompt], Sequence[str], Sequence[str] | None]],
                       n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Copy effect and demo share for every task (task -> (prompts, predictions, label set or None)),
    and the copy effect pooled over the tasks that have one (each task weighs the same; interval from
    resampling prompts within tasks) and taken with the task as the unit (`stats.task_level`, sign
    test and t interval over tasks): {"tasks": {task: {"copy_effect", "demo_share"}}, "pooled",
    "task_level"}, the part of a result JSON that is not per-task rows."""
    check_boot(n_boot, seed)
    tasks, reps = {}, {}
    for i, (t, (prompts, predictions, labels)) in enumerate(per_task.items()):
        if labels is None:
            effect = copy_effect(prompts, predictions, None, t)
        else:   # each task its own stream: a stratified bootstrap draws the tasks independently
            effect, r = _effect(t, prompts, predictions, labels, n_boot, np.random.default_rng([seed, i]))
            if r is not None:
                reps[t] = r
        tasks[t] = {"copy_effect": effect.to_json(), "demo_share": demo_share(prompts, predictions, labels, t).to_json()}
    effects = {t: tasks[t]["copy_effect"]["effect"] for t in reps}
    if not effects:
        pooled = CopyEffect("pooled", 0, None, None, None, None, 0, 0, (), "no task's copy effect could be estimated")
        level = None
    else:
        lo, hi = np.nanquantile(_nanmean(np.stack([reps[t] for t in effects]), axis=0), [0.025, 0.975])
        rows = [CopyEffect.from_json(tasks[t]["copy_effect"]) for t in effects]
        pooled = CopyEffect("pooled", sum(r.n for r in rows), float(np.mean(list(effects.values()))),
                            (float(lo), float(hi)), float(np.mean([r.present_rate for r in rows])),
                            float(np.mean([r.absent_rate for r in rows])), sum(r.n_present for r in rows),
                            sum(r.n_absent for r in rows), ())
        level = task_level(effects, metric="copy_effect", condition="present", baseline="absent", seed=seed).to_json()
    return {"tasks": tasks, "pooled": pooled.to_json(), "task_level": level}
