"""Intervals and paired tests for comparing conditions (unpruned, pruned, random sets, ...).

Every condition of a task runs on the same prompts, so comparisons are paired: intervals come from
bootstraps that resample prompt indices (the same indices for both sides), p-values from exact
McNemar tests on the discordant prompts or from sign-flip permutation tests on per-prompt
differences. A family of random neuron sets is a second source of variance: its intervals resample
the sets too. Pooled comparisons weigh every task the same and resample within tasks. Continuous
per-prompt values (a logit difference) go through `paired_means`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechcopy.errors import check_number

N_PERM = 10_000


def _scipy_stats():
    """scipy.stats, imported on first use: it takes most of a second, and every `mechcopy` command
    imports this module before it parses its flags."""
    from scipy import stats

    return stats


#: the task name of comparisons pooled over tasks (no task may take it)
POOLED = "pooled"
_CORE_KEYS = ("task", "condition", "baseline", "metric", "diff", "ci", "p_value", "mde", "n", "test")


# ---------------------------------------------------------------------------------------------
# single rates and runs


def rate_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Clopper-Pearson exact interval for k successes in n trials.

    Exact rather than normal-approximate so that it stays honest at the edges (0 of 12 gives
    [0, 0.265], not [0, 0]). n == 0 gives (nan, nan).
    """
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"rate_interval needs integer counts, got {name}={v!r}")
    if not 0 <= k <= n:
        raise ValueError(f"rate_interval needs 0 <= k <= n, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if n == 0:
        return float("nan"), float("nan")
    ci = _scipy_stats().binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="exact")
    return float(ci.low), float(ci.high)


def seed_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over independent runs (training seeds): (mean, lo, hi).

    With few runs the interval is wide on purpose; one run gives (value, nan, nan).
    """
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    half = float(_scipy_stats().t.ppf(0.975, x.size - 1)) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return mean, mean - half, mean + half


def check_boot(n_boot: int, seed: int = 0, alpha: float = 0.05) -> None:
    """Refuse bootstrap settings that cannot give the interval asked: `n_boot` must leave at least one
    replicate beyond each end of a (1 - alpha) percentile interval (n_boot >= 2 / alpha: 40 for 95%;
    `n_boot=1` gave the 95% interval (0.5, 0.5)); the seed is an integer >= 0; alpha lies in (0, 1)."""
    check_number(alpha, "alpha", above=0.0)
    if not alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    check_number(seed, "seed", low=0, integer=True)
    least = int(np.ceil(2 / alpha - 1e-9))
    check_number(n_boot, f"n_boot (bootstrap replicates; a {1 - alpha:.0%} interval needs at least {least})",
                 low=least, integer=True)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> np.ndarray:
    """Percentile bootstrap intervals of the mean for each column of `values` [n, m] (or [n]) -> [m, 2].

    n == 0 gives nan rows.
    """
    check_boot(n_boot, seed, alpha)
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    n = len(values)
    if n == 0:
        return np.full((values.shape[1], 2), np.nan)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    means = values[idx].mean(axis=1)  # [n_boot, m]
    return np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0).T


# ---------------------------------------------------------------------------------------------
# tests, multiplicity, power


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    b = prompts where the condition is 1 and the baseline 0, c = the reverse. Under no effect each
    discordant prompt goes either way with probability 1/2, so b ~ Binomial(b + c, 1/2); concordant
    prompts carry no information. No discordant prompt gives 1.0.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(_scipy_stats().binomtest(b, b + c, 0.5).pvalue)


def holm(p_values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Holm-Bonferroni step-down rejections (bool array, input order) at family-wise level alpha.

    Sorted ascending, p_(i) is rejected while p_(i) <= alpha / (m - i) (i from 0) and testing stops
    at the first failure. nan p-values (tests that could not be run) are never rejected and do not
    count in m.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"holm needs a 1-D sequence of p-values, got shape {p.shape}")
    reject = np.zeros(p.shape, dtype=bool)
    order = np.flatnonzero(~np.isnan(p))
    order = order[np.argsort(p[order], kind="stable")]
    m = len(order)
    passed = p[order] <= alpha / (m - np.arange(m))
    k = m if passed.all() else int(np.argmin(passed))  # index of the first failure
    reject[order[:k]] = True
    return reject


def mde(se: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimal detectable effect: max(c * se, c**2 / n) with c = z_{1-alpha/2} + z_{power} (~2.80).

    The true difference that a two-sided test at `alpha` detects with probability `power`, given
    the standard error `se` of the observed difference. The floor c**2 / n matters when no prompt
    is discordant: se is then 0, but a zero observed variance must not claim infinite precision.
    An effect d moves at least d * n prompts, so its standard error is at least sqrt(d / n), and
    d >= c * sqrt(d / n) gives d >= c**2 / n.
    """
    if n <= 0:
        raise ValueError(f"mde needs n > 0 prompts, got n={n}")
    if np.isnan(se):
        return float("nan")
    norm = _scipy_stats().norm
    c = float(norm.ppf(1 - alpha / 2) + norm.ppf(power))
    return float(max(c * float(se), c * c / n))


def _sign_flip_p(v: np.ndarray, seed: int, n_perm: int = N_PERM) -> float:
    """p-value of |sum(v)| under independent random sign flips of each v_i.

    p = (1 + #{|perm| >= |obs|}) / (1 + n_perm). Zeros are dropped first (flipping them changes
    nothing). The flips use their own stream, independent of the bootstrap's.
    """
    v = np.asarray(v, dtype=float).ravel()
    v = v[v != 0]
    obs = abs(float(v.sum()))
    if v.size == 0:
        return 1.0
    thresh = obs - 1e-9 * float(np.abs(v).sum())  # ties up to float rounding count as extreme
    rng = np.random.default_rng([seed, 1])
    chunk = max(1, (1 << 22) // v.size)
    hits = 0
    for start in range(0, n_perm, chunk):
        k = min(chunk, n_perm - start)
        flips = rng.integers(0, 2, size=(k, v.size), dtype=np.int8).astype(float)
        # flipping the set F turns sum(v) into sum(v) - 2 * sum_F(v)
        hits += int(np.count_nonzero(np.abs(v.sum() - 2.0 * (flips @ v)) >= thresh))
    return (1 + hits) / (1 + n_perm)


# ---------------------------------------------------------------------------------------------
# comparisons


@dataclass(frozen=True)
class Comparison:
    """One condition against one baseline on one metric, for one task or pooled over tasks.

    diff = condition minus baseline; ci is its (1 - alpha, by default 95%) interval; mde the
    minimal detectable effect at 80% power; test names the test behind p_value.
    """

    task: str
    condition: str
    baseline: str
    metric: str
    diff: float
    ci: tuple[float, float]
    p_value: float
    mde: float
    n: int
    test: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.extra) & set(_CORE_KEYS))
        if clash:
            raise ValueError(f"extra keys {clash} would overwrite Comparison fields")

    @property
    def significant(self) -> bool:
        """p_value < 0.05 (unadjusted)."""
        return bool(self.p_value < 0.05)

    @property
    def n_tasks(self) -> int | None:
        """A pooled comparison's number of tasks (None for one task's)."""
        return self.extra.get("n_tasks")

    @property
    def tasks(self) -> list[str]:
        """The tasks a pooled comparison pools (empty for one task's)."""
        return list(self.extra.get("tasks", []))

    @property
    def n_up(self) -> int | None:
        """A pooled comparison's tasks that move up significantly after Holm (None for one task's)."""
        return self.extra.get("n_up")

    @property
    def n_down(self) -> int | None:
        """A pooled comparison's tasks that move down significantly after Holm (None for one task's)."""
        return self.extra.get("n_down")

    def to_json(self) -> dict[str, Any]:
        """Flat dict: the fields (ci as a list) with the extra items merged in."""
        d: dict[str, Any] = {
            "task": self.task, "condition": self.condition, "baseline": self.baseline, "metric": self.metric,
            "diff": float(self.diff), "ci": [float(self.ci[0]), float(self.ci[1])],
            "p_value": float(self.p_value), "mde": float(self.mde), "n": int(self.n), "test": self.test,
        }
        d.update({k: v.item() if isinstance(v, np.generic) else v for k, v in self.extra.items()})
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Comparison":
        """The comparison `to_json` wrote: its fields, and every other key as `extra`."""
        return cls(obj["task"], obj["condition"], obj["baseline"], obj["metric"], obj["diff"],
                   (obj["ci"][0], obj["ci"][1]), obj["p_value"], obj["mde"], obj["n"], obj["test"],
                   {k: v for k, v in obj.items() if k not in _CORE_KEYS})


def _outcomes(a: Any, name: str, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    """Boolean / 0-1 outcomes as a float array, checked."""
    arr = np.asarray(a)
    if arr.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimension(s), got shape {arr.shape}")
    arr = arr.astype(float)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold boolean / 0-1 outcomes")
    return arr


def _check_pair(x: np.ndarray, y: np.ndarray, xname: str = "x", yname: str = "y") -> int:
    """Common prompt count of x [n] and y [..., n]; ValueError when they differ or are empty."""
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"paired outcomes differ in length: {xname} has {x.shape[-1]} prompts, "
                         f"{yname} has {y.shape[-1]}")
    if x.shape[-1] == 0 or y.size == 0:
        raise ValueError(f"no prompts to compare ({xname} and {yname} are empty)")
    return x.shape[-1]


def _replicates(x: np.ndarray, y: np.ndarray, idx: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Bootstrap means of x minus y [n_boot] for prompt indices idx [n_boot, n] and, when y is a set
    family [s, n], set weights w [n_boot, s] (resample counts / s)."""
    xm = x[idx].mean(axis=1)
    if y.ndim == 1:
        return xm - y[idx].mean(axis=1)
    y_rep = w @ y  # [n_boot, n]: per-prompt mean over the resampled sets
    return xm - np.take_along_axis(y_rep, idx, axis=1).mean(axis=1)


def _set_weights(rng: np.random.Generator, s: int, n_boot: int) -> np.ndarray:
    """Resampling s sets with replacement, as weights [n_boot, s] summing to 1 per replicate."""
    return rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot) / s


def _interval(reps: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired(x: np.ndarray, y: np.ndarray, task: str, condition: str, baseline: str, metric: str,
           n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Condition x against baseline y on the same prompts (0-1 outcomes [n] each).

    diff = mean(x) - mean(y) with a 95% percentile bootstrap that resamples prompts (the same
    indices for x and y, which keeps the pairing); p-value from the exact McNemar test.
    """
    check_boot(n_boot, seed)
    x, y = _outcomes(x, "x"), _outcomes(y, "y")
    n = _check_pair(x, y)
    rng = np.random.default_rng(seed)
    reps = _replicates(x, y, rng.integers(0, n, size=(n_boot, n)), None)
    b, c = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    return Comparison(task=task, condition=condition, baseline=baseline, metric=metric,
                      diff=float(x.mean() - y.mean()), ci=_interval(reps, 0.05), p_value=mcnemar_exact(b, c),
                      mde=mde(float(reps.std(ddof=1)), n), n=n, test="mcnemar-exact",
                      extra={"n_discordant": b + c})


def versus_sets(x: np.ndarray, Y: np.ndarray, task: str, condition: str, baseline: str, metric: str,
                n_boot: int = 2000, seed: int = 0, flip: bool = False) -> Comparison:
    """One condition x [n] against a family of random sets Y [s, n] on the same prompts.

    diff = mean(x) - mean(Y), or with flip=True mean(Y) - mean(x) (e.g. "random minus unpruned":
    x = unpruned, condition="random"). The 95% interval carries both prompt and set variance: each
    bootstrap replicate resamples the s sets and the n prompts (same prompt indices for x and Y);
    with identical sets it equals `paired`'s interval for the same seed. The p-value is a sign-flip
    permutation test on d_i = x_i - mean_s Y_si, which treats the sets' mean as fixed: it asks
    whether x differs from these sets, not from the population they were drawn from (the interval
    is the one that speaks to that). A 1-D Y is taken as a single set.
    """
    check_boot(n_boot, seed)
    x, Y = _outcomes(x, "x"), _outcomes(Y, "Y", ndim=(1, 2))
    Y = np.atleast_2d(Y)
    if Y.shape[0] == 0:
        raise ValueError("versus_sets needs at least one set (Y has 0 rows)")
    n = _check_pair(x, Y, "x", "Y")
    s = Y.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    reps = _replicates(x, Y, idx, _set_weights(rng, s, n_boot))
    sign = -1.0 if flip else 1.0
    d = x - Y.mean(axis=0)
    lo, hi = _interval(sign * reps, 0.05)
    return Comparison(task=task, condition=condition, baseline=baseline, metric=metric,
                      diff=float(sign * d.mean()), ci=(lo, hi), p_value=_sign_flip_p(d / n, seed),
                      mde=mde(float(reps.std(ddof=1)), n), n=n, test="sign-flip", extra={"n_sets": s})


def paired_means(x: np.ndarray, Y: np.ndarray, task: str, condition: str, baseline: str, metric: str,
                 n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Continuous per-prompt values (e.g. a logit difference) x [n] against one baseline Y [n] or a
    family of random sets Y [s, n], on the same prompts.

    diff = mean(x) - mean(Y). The 95% interval is `versus_sets`' bootstrap (prompts resampled with the
    same indices on both sides, and the sets too for a family), the p-value its sign-flip test on
    d_i = x_i - mean_s Y_si: both hold for any real values, so on 0-1 outcomes the diff, interval and
    p-value equal `versus_sets`' (and the interval `paired`'s for a single baseline). Only the mde
    differs: no 0-1 floor.
    """
    check_boot(n_boot, seed)
    x, Y = np.asarray(x, dtype=float), np.asarray(Y, dtype=float)
    for name, a, dims in (("x", x, (1,)), ("Y", Y, (1, 2))):
        if a.ndim not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimension(s), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds non-finite values")
    family = Y.ndim == 2
    Y = np.atleast_2d(Y)
    if Y.shape[0] == 0:
        raise ValueError("paired_means needs at least one set (Y has 0 rows)")
    n = _check_pair(x, Y, "x", "Y")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    reps = _replicates(x, Y, idx, _set_weights(rng, Y.shape[0], n_boot))
    d = x - Y.mean(axis=0)
    norm = _scipy_stats().norm
    c = float(norm.ppf(0.975) + norm.ppf(0.8))
    return Comparison(task=task, condition=condition, baseline=baseline, metric=metric, diff=float(d.mean()),
                      ci=_interval(reps, 0.05), p_value=_sign_flip_p(d / n, seed), mde=c * float(reps.std(ddof=1)),
                      n=n, test="sign-flip", extra={"n_sets": Y.shape[0]} if family else {})


def pooled(per_task: Mapping[str, tuple[np.ndarray, np.ndarray]], condition: str, baseline: str, metric: str,
           n_boot: int = 2000, seed: int = 0, alpha: float = 0.05, flip: bool = False) -> Comparison:
    """A comparison pooled over tasks, each task weighing the same.

    per_task maps task -> (x, Y): x [n_t] the condition, Y [n_t] a single baseline or [s, n_t] a
    family of random sets (the same s sets, in the same order, for every task: they are the same
    neurons). diff = mean over tasks of (mean(x) - mean(Y)), negated with flip=True as in
    `versus_sets`. The (1 - alpha) interval is a task-stratified bootstrap: each replicate resamples every
    task's prompts within the task and, for set families, one resample of the sets shared by all
    tasks. The p-value is a stratified sign-flip test of the same statistic (each prompt's
    difference flipped independently). extra: n_tasks and n_up / n_down, the tasks that move
    significantly up / down after Holm correction of per-task p-values (exact McNemar for a
    single baseline, the sign-flip test of `versus_sets` for sets), and the `tasks` themselves.
    """
    check_boot(n_boot, seed, alpha)
    if not per_task:
        raise ValueError("pooled needs at least one task")
    tasks = list(per_task)
    xs, Ys = [], []
    for t in tasks:
        x, Y = per_task[t]
        x, Y = _outcomes(x, f"{t}: x"), _outcomes(Y, f"{t}: Y", ndim=(1, 2))
        _check_pair(x, Y, f"{t}: x", f"{t}: Y")
        xs.append(x)
        Ys.append(Y)
    shapes = {Y.shape[0] if Y.ndim == 2 else None for Y in Ys}
    if len(shapes) > 1:
        detail = ", ".join(f"{t}: {'1-D' if Y.ndim == 1 else f'{Y.shape[0]} sets'}" for t, Y in zip(tasks, Ys))
        raise ValueError(f"pooled needs the same baseline shape for every task ({detail})")
    s = shapes.pop()
    if s == 0:
        raise ValueError("pooled needs at least one set (Y has 0 rows)")
    sign = -1.0 if flip else 1.0

    rng = np.random.default_rng(seed)
    idxs = [rng.integers(0, len(x), size=(n_boot, len(x))) for x in xs]
    w = _set_weights(rng, s, n_boot) if s is not None else None
    reps = np.mean([_replicates(x, Y, idx, w) for x, Y, idx in zip(xs, Ys, idxs)], axis=0)

    ds = [x - (Y if Y.ndim == 1 else Y.mean(axis=0)) for x, Y in zip(xs, Ys)]
    task_diffs = np.array([sign * d.mean() for d in ds])
    if s is None:
        task_p = [mcnemar_exact(int((d > 0).sum()), int((d < 0).sum())) for d in ds]
    else:
        task_p = [_sign_flip_p(d / len(d), seed) for d in ds]
    rejected = holm(task_p, alpha)
    n_total = int(sum(len(x) for x in xs))
    p = _sign_flip_p(np.concatenate([d / (len(tasks) * len(d)) for d in ds]), seed)
    return Comparison(task=POOLED, condition=condition, baseline=baseline, metric=metric,
                      diff=float(task_diffs.mean()), ci=_interval(sign * reps, alpha), p_value=p,
                      mde=mde(float(reps.std(ddof=1)), n_total, alpha), n=n_total, test="stratified sign-flip",
                      extra={"n_tasks": len(tasks), "n_up": int((rejected & (task_diffs > 0)).sum()),
                             "n_down": int((rejected & (task_diffs < 0)).sum()), "tasks": tasks})


# ---------------------------------------------------------------------------------------------
# a task's conditions, and all tasks


@dataclass(frozen=True)
class _Spec:
    """One planned comparison: x against y (1-D) or a set family (2-D), diff negated when flip."""

    condition: str
    baseline: str
    x: np.ndarray
    y: np.ndarray
    flip: bool
    sets: tuple[str, ...] = ()


def _plan(task: str, outcomes: Mapping[str, np.ndarray], families: Mapping[str, str] | None,
          baseline: str, versus: Mapping[str, Sequence[str]] | None = None) -> list[_Spec]:
    """The comparisons of one task: every other condition vs the baseline, then the random family
    vs the baseline (random minus baseline) and every condition of the `pruned` family vs the random
    family, then each condition vs the conditions `versus` names for it (those present; paired).
    `families` maps a condition to its family (default: each its own)."""
    if baseline not in outcomes:
        raise ValueError(f"task {task}: baseline {baseline!r} missing (conditions: {sorted(outcomes)})")
    families = families or {}
    arrays = {name: np.asarray(a) for name, a in outcomes.items()}
    lengths = {name: a.shape[-1] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}: {k}" for name, k in lengths.items())
        raise ValueError(f"task {task}: conditions differ in prompt count ({detail})")
    family = {name: families.get(name, name) for name in arrays}
    sets = tuple(sorted(name for name in arrays if family[name] == "random"))
    specs = [_Spec(name, baseline, arrays[name], arrays[baseline], False)
             for name in arrays if name != baseline and name not in sets]
    if sets:
        Y = np.stack([arrays[name] for name in sets])
        specs.append(_Spec("random", baseline, arrays[baseline], Y, True, sets))
        specs += [_Spec(name, "random", arrays[name], Y, False, sets) for name in arrays if family[name] == "pruned"]
    specs += [_Spec(name, other, arrays[name], arrays[other], False) for name, others in (versus or {}).items()
              if name in arrays for other in others if other in arrays and other not in (name, baseline)]
    return specs


def _run(task: str, spec: _Spec, metric: str, n_boot: int, seed: int) -> Comparison:
    if spec.sets:
        return versus_sets(spec.x, spec.y, task, spec.condition, spec.baseline, metric, n_boot, seed, flip=spec.flip)
    return paired(spec.x, spec.y, task, spec.condition, spec.baseline, metric, n_boot, seed)


def compare_task(task: str, outcomes: Mapping[str, np.ndarray], metric: str, families: Mapping[str, str] | None = None,
                 baseline: str = "unpruned", n_boot: int = 2000, seed: int = 0,
                 versus: Mapping[str, Sequence[str]] | None = None) -> list[Comparison]:
    """All comparisons of one task; outcomes maps condition -> 0-1 outcomes over the same prompts, and
    `families` a condition to its family (`Condition.family`; default: each its own).

    Every condition that is neither the baseline nor in the `random` family against the baseline
    (`paired`); if the random family has members, "random" minus the baseline and every condition of
    the `pruned` family minus "random" (`versus_sets`); each condition against the others `versus`
    names for it (`Condition.versus`: a calibration against pruning; `paired`).
    """
    check_boot(n_boot, seed)
    return [_run(task, spec, metric, n_boot, seed) for spec in _plan(task, outcomes, families, baseline, versus)]


def compare_all(per_task: Mapping[str, Mapping[str, np.ndarray]], metric: str,
                families: Mapping[str, str] | None = None, baseline: str = "unpruned", n_boot: int = 2000,
                seed: int = 0, versus: Mapping[str, Sequence[str]] | None = None) -> list[Comparison]:
    """`compare_task` for every task, then the same (condition, baseline) pairs pooled over the tasks
    that have them (task "pooled"). Random families must name the same sets in every task."""
    check_boot(n_boot, seed)
    if POOLED in per_task:
        raise ValueError(f"a task is named {POOLED!r}, the name of the comparison pooled over tasks; rename it")
    out: list[Comparison] = []
    groups: dict[tuple[str, str], dict[str, _Spec]] = {}
    for task, outcomes in per_task.items():
        for spec in _plan(task, outcomes, families, baseline, versus):
            out.append(_run(task, spec, metric, n_boot, seed))
            groups.setdefault((spec.condition, spec.baseline), {})[task] = spec
    for (condition, base), specs in groups.items():
        names = {spec.sets for spec in specs.values()}
        if len(names) > 1:
            detail = "; ".join(f"{t}: {list(spec.sets)}" for t, spec in specs.items())
            raise ValueError(f"random sets differ across tasks, cannot pool {condition} vs {base} ({detail})")
        flip = next(iter(specs.values())).flip
        out.append(pooled({t: (spec.x, spec.y) for t, spec in specs.items()}, condition, base, metric,
                          n_boot=n_boot, seed=seed, flip=flip))
    return out


# ---------------------------------------------------------------------------------------------
# tasks as the unit of inference


@dataclass(frozen=True)
class TaskLevel:
    """A difference with the task as the unit: each task's difference (`diffs`, e.g. a per-task
    `Comparison.diff`) is one observation. `mean` over tasks with a Student t interval `ci` and the
    one-sample t-test's `p_value`; a percentile bootstrap over tasks (`bootstrap_ci`); the exact sign
    test over the tasks that moved (`n_up` up, `n_down` down; `n_zero` did not move): `sign_p`.

    The pooled `Comparison` holds the tasks fixed and resamples prompts: it says whether these tasks
    moved. This says whether a task drawn like these would: a claim about tasks rests on it.
    """

    condition: str
    baseline: str
    metric: str
    n_tasks: int
    mean: float
    ci: tuple[float, float]
    p_value: float
    bootstrap_ci: tuple[float, float]
    n_up: int
    n_down: int
    n_zero: int
    sign_p: float
    diffs: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("condition", "baseline", "metric", "n_tasks", "mean", "p_value",
                                           "n_up", "n_down", "n_zero", "sign_p")}
        return {**d, "ci": list(self.ci), "bootstrap_ci": list(self.bootstrap_ci), "diffs": dict(self.diffs),
                "test": "t over tasks; exact sign test over tasks"}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TaskLevel":
        fields = {k: v for k, v in d.items() if k != "test"}
        return cls(**{**fields, "ci": tuple(d["ci"]), "bootstrap_ci": tuple(d["bootstrap_ci"]),
                      "diffs": dict(d["diffs"])})


def task_level(diffs: Mapping[str, float], metric: str, condition: str, baseline: str, n_boot: int = 10_000,
               seed: int = 0, alpha: float = 0.05) -> TaskLevel:
    """`TaskLevel` of per-task differences (task -> condition minus baseline). Fewer than 2 tasks give
    nan for the t and bootstrap figures; no task that moved gives sign_p = 1."""
    if not diffs:
        raise ValueError("task_level needs at least one task's difference")
    x = np.asarray(list(diffs.values()), dtype=float)
    if not np.isfinite(x).all():
        raise ValueError(f"task differences must be finite numbers, got {dict(diffs)}")
    n = x.size
    mean = float(x.mean())
    if n >= 2 and x.std(ddof=1) > 0:
        half = float(_scipy_stats().t.ppf(1 - alpha / 2, n - 1)) * float(x.std(ddof=1)) / np.sqrt(n)
        ci, p = (float(mean - half), float(mean + half)), float(_scipy_stats().ttest_1samp(x, 0.0).pvalue)
    elif n >= 2:   # every task moved by the same amount: no spread to test against
        ci, p = (mean, mean), (1.0 if mean == 0 else 0.0)
    else:
        ci, p = (float("nan"), float("nan")), float("nan")
    if n >= 2:
        means = x[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(axis=1)
        boot = _interval(means, alpha)
    else:
        boot = (float("nan"), float("nan"))
    up, down = int((x > 0).sum()), int((x < 0).sum())
    return TaskLevel(condition=condition, baseline=baseline, metric=metric, n_tasks=n, mean=mean, ci=ci, p_value=p,
                     bootstrap_ci=boot, n_up=up, n_down=down, n_zero=n - up - down, sign_p=mcnemar_exact(up, down),
                     diffs={t: float(v) for t, v in diffs.items()})


def task_level_of(comparisons: Mapping[str, Sequence[Mapping[str, Any]]], condition: str, baseline: str,
                  metric: str, **kwargs) -> TaskLevel:
    """`task_level` of the per-task diffs in `comparisons` (`comparisons.compare_rows`' output: task ->
    [Comparison.to_json(), ...]), every task but "pooled" and those without this comparison."""
    diffs = {t: c["diff"] for t, cs in comparisons.items() if t != "pooled" for c in cs
             if (c["condition"], c["baseline"], c["metric"]) == (condition, baseline, metric)}
    if not diffs:
        raise ValueError(f"no task has the comparison {condition} - {baseline} on {metric}")
    return task_level(diffs, metric, condition, baseline, **kwargs)
