"""mechcopy.stats against hand computations, exact enumerations and coverage simulations."""

import dataclasses
import itertools
import math
import re
import time

import numpy as np
import pytest
from jaxtyping import TypeCheckError
from scipy import stats as st

from mechcopy.stats import (
    Comparison, bootstrap_ci, compare_all, compare_task, holm, mcnemar_exact, mde, paired, paired_means, pooled,
    rate_interval, seed_interval, versus_sets,
)

C_POWER = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.8, from a normal table


def correlated(rng, n, p, q):
    """Paired Bernoulli outcomes with P(x=1)=p, P(y=1)=q through a shared uniform."""
    u = rng.random(n)
    return u < p, u < q


def from_counts(b, c, both=0, neither=0):
    """x, y with exactly b prompts (1, 0), c prompts (0, 1) and the given concordant counts."""
    x = np.array([1] * b + [0] * c + [1] * both + [0] * neither, dtype=bool)
    y = np.array([0] * b + [1] * c + [1] * both + [0] * neither, dtype=bool)
    return x, y


def exact_sign_flip(v):
    """Exact p of |sum v| over all 2^m sign patterns of the nonzero entries (enumeration)."""
    v = np.asarray(v, dtype=float)
    v = v[v != 0]
    obs = abs(v.sum())
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=len(v))))
    return float(np.mean(np.abs(signs @ v) >= obs - 1e-12))


def hand_holm(p, alpha=0.05):
    order = sorted(range(len(p)), key=lambda i: p[i])
    reject = [False] * len(p)
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        reject[i] = True
    return reject


def binom_two_sided(b, c):
    """Two-sided exact binomial(b + c, 1/2) p-value from the pmf by hand."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n)


# ---------------------------------------------------------------------------------------------
# single rates and runs


def test_rate_interval_edges_and_middle():
    lo, hi = rate_interval(0, 12)
    assert lo == 0.0 and hi == pytest.approx(0.2646, abs=1e-3)
    assert hi == pytest.approx(1 - 0.025 ** (1 / 12), abs=1e-9)  # closed form at k = 0
    lo, hi = rate_interval(12, 12)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 12), abs=1e-9)
    lo, hi = rate_interval(5, 20)
    assert lo == pytest.approx(st.beta.ppf(0.025, 5, 16), abs=1e-9)
    assert hi == pytest.approx(st.beta.ppf(0.975, 6, 15), abs=1e-9)
    lo90, hi90 = rate_interval(5, 20, alpha=0.10)
    assert lo < lo90 and hi90 < hi
    assert all(math.isnan(v) for v in rate_interval(0, 0))


@pytest.mark.parametrize("k, n", [(13, 12), (-1, 5), (2.0, 5), (2, 5.5), (True, 5)])
def test_rate_interval_rejects_bad_counts(k, n):
    """Refused by its own check; a float count is refused by its `int` annotation first where the
    annotations are checked at run time (the tests: pyproject's addopts)."""
    with pytest.raises((ValueError, TypeCheckError)) as refused:
        rate_interval(k, n)
    if refused.type is ValueError:
        assert re.search(r"k=.*n=|integer counts", str(refused.value))
    else:
        assert isinstance(k, float) or isinstance(n, float)


def test_seed_interval_matches_t_by_hand():
    for values in ([1.0, 2.0, 4.0], [0.3, 0.5, 0.4, 0.9, 0.1]):
        v = np.array(values)
        m, s = v.sum() / len(v), math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - 1))
        half = st.t.ppf(0.975, len(v) - 1) * s / math.sqrt(len(v))
        assert seed_interval(values) == pytest.approx((m, m - half, m + half), abs=1e-12)
    assert st.t.ppf(0.975, 2) == pytest.approx(4.303, abs=1e-3)  # the table value for 3 runs
    m, lo, hi = seed_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="at least one"):
        seed_interval([])


@pytest.mark.parametrize("size", [3, 5])
def test_seed_interval_coverage(size):
    # 2000 normal samples (more than needed, so the 93-97% band is ~4 sd wide); a z interval
    # (1.96 instead of t) would cover ~80% for 3 values and ~88% for 5
    hits = 0
    for seed in range(2000):
        m, lo, hi = seed_interval(np.random.default_rng(seed).normal(1.0, 2.0, size))
        hits += lo <= 1.0 <= hi
    assert 0.93 <= hits / 2000 <= 0.97


def test_bootstrap_ci_shapes_and_normal_approximation():
    rng = np.random.default_rng(3)
    values = np.stack([rng.random(2000) < 0.3, rng.random(2000) < 0.8], axis=1)
    ci = bootstrap_ci(values, n_boot=2000, seed=1)
    assert ci.shape == (2, 2)
    for j in range(2):
        m, se = values[:, j].mean(), values[:, j].std() / math.sqrt(2000)
        assert ci[j] == pytest.approx([m - 1.96 * se, m + 1.96 * se], abs=0.15 * 1.96 * se)
    assert bootstrap_ci(values[:, 0], seed=1).shape == (1, 2)
    assert np.array_equal(bootstrap_ci(np.ones(7)), [[1.0, 1.0]])
    assert np.isnan(bootstrap_ci(np.zeros((0, 3)))).all() and bootstrap_ci(np.zeros((0, 3))).shape == (3, 2)
    assert np.array_equal(bootstrap_ci(values, seed=5), bootstrap_ci(values, seed=5))


# ---------------------------------------------------------------------------------------------
# tests, multiplicity, power


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2 ** 10, abs=1e-15) == pytest.approx(0.021484375)
    assert mcnemar_exact(3, 12) == pytest.approx(binom_two_sided(3, 12), abs=1e-12)
    assert mcnemar_exact(12, 3) == mcnemar_exact(3, 12)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 2 ** 6)


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02 reject, 0.01*3 = 0.03 reject, 0.03*2 = 0.06 stop
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == [True, False, False, True]
    # step-down stops at the first failure even when a later p would pass its own threshold
    assert holm([0.001, 0.02, 0.024, 0.5]).tolist() == [True, False, False, False]
    # everything passes: 0.012*3 = 0.036, 0.02*2 = 0.04, 0.045*1
    assert holm([0.045, 0.012, 0.02]).tolist() == [True, True, True]
    # nan is never rejected and not counted: m = 2 -> 0.02*2 = 0.04, 0.04*1
    assert holm([0.04, float("nan"), 0.02]).tolist() == [True, False, True]
    assert holm([]).tolist() == []


def test_mde():
    assert mde(0.1, 100) == pytest.approx(C_POWER * 0.1, rel=1e-9)
    assert mde(0.0, 100) == pytest.approx(C_POWER ** 2 / 100, rel=1e-9)
    assert C_POWER ** 2 / 100 == pytest.approx(0.0785, abs=1e-4)
    assert mde(0.001, 50) == pytest.approx(C_POWER ** 2 / 50, rel=1e-9)  # the floor wins for tiny se
    c90 = st.norm.ppf(0.975) + st.norm.ppf(0.9)
    assert mde(0.1, 100, power=0.9) == pytest.approx(c90 * 0.1, rel=1e-9)
    assert math.isnan(mde(float("nan"), 10))
    with pytest.raises(ValueError, match="n > 0"):
        mde(0.1, 0)


# ---------------------------------------------------------------------------------------------
# Comparison


def test_comparison_json_and_significance():
    c = Comparison(task="t", condition="pruned", baseline="unpruned", metric="accuracy", diff=-0.1,
                   ci=(-0.2, -0.01), p_value=0.03, mde=0.08, n=100, test="mcnemar-exact",
                   extra={"n_discordant": np.int64(12)})
    d = c.to_json()
    assert list(d) == ["task", "condition", "baseline", "metric", "diff", "ci", "p_value", "mde", "n", "test",
                       "n_discordant"]
    assert d["ci"] == [-0.2, -0.01] and d["n_discordant"] == 12 and type(d["n_discordant"]) is int
    assert c.significant and not dataclasses.replace(c, p_value=0.05).significant
    assert Comparison("t", "a", "b", "m", 0.0, (0.0, 0.0), 1.0, 0.1, 5, "x").extra == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.diff = 0.0
    with pytest.raises(ValueError, match="overwrite"):
        dataclasses.replace(c, extra={"diff": 1})


# ---------------------------------------------------------------------------------------------
# paired


def test_paired_by_hand():
    x, y = from_counts(b=3, c=9, both=20, neither=8)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    r = paired(x, y, "t", "pruned", "unpruned", "accuracy", n_boot=2000)
    assert r.diff == pytest.approx(23 / 40 - 29 / 40)
    assert r.p_value == pytest.approx(binom_two_sided(3, 9))
    assert r.extra == {"n_discordant": 12} and r.n == 40 and r.test == "mcnemar-exact"
    assert r.ci[0] < r.diff < r.ci[1]
    # the bootstrap se is close to the analytic paired se of the mean difference
    d = x.astype(float) - y
    assert r.mde == pytest.approx(C_POWER * d.std() / math.sqrt(len(d)), rel=0.1)
    # identical outcomes: no discordant prompt, the mde falls back to its floor
    same = paired(x, x, "t", "a", "b", "m")
    assert same.diff == 0 and same.ci == (0, 0) and same.p_value == 1.0
    assert same.mde == pytest.approx(C_POWER ** 2 / 40)
    assert paired(x, y, "t", "a", "b", "m", seed=4) == paired(x, y, "t", "a", "b", "m", seed=4)


def test_paired_coverage():
    # true difference 0.6 - 0.45; y = 1 implies x = 1, so ignoring the pairing would give intervals
    # about twice as wide (coverage ~100%); 400 seeds put the 93-98.5% band >= 1.8 sd from 95%
    hits = 0
    for seed in range(400):
        x, y = correlated(np.random.default_rng(seed), 200, 0.6, 0.45)
        lo, hi = paired(x, y, "t", "a", "b", "m", n_boot=1000, seed=seed).ci
        hits += lo <= 0.15 <= hi
    assert 0.93 <= hits / 400 <= 0.985


def test_paired_errors():
    with pytest.raises(ValueError, match="x has 3 prompts, y has 4"):
        paired(np.ones(3, bool), np.ones(4, bool), "t", "a", "b", "m")
    with pytest.raises(ValueError, match="no prompts"):
        paired(np.array([], bool), np.array([], bool), "t", "a", "b", "m")
    with pytest.raises(ValueError, match="0-1"):
        paired(np.array([0, 2]), np.array([0, 1]), "t", "a", "b", "m")


# ---------------------------------------------------------------------------------------------
# versus_sets


def test_versus_sets_reduces_to_paired_with_identical_sets():
    x, y = correlated(np.random.default_rng(1), 150, 0.55, 0.4)
    ref = paired(x, y, "t", "pruned", "random", "m")
    r = versus_sets(x, np.stack([y, y, y]), "t", "pruned", "random", "m")
    assert r.diff == pytest.approx(ref.diff) and r.ci == pytest.approx(ref.ci)
    assert r.test == "sign-flip" and r.extra == {"n_sets": 3} and r.n == 150
    # on 0/+-1 differences the sign-flip test is the exact sign test, i.e. McNemar, up to Monte Carlo error
    assert r.p_value == pytest.approx(ref.p_value, abs=0.006)
    one = versus_sets(x, y[None, :], "t", "pruned", "random", "m")  # a single set works
    assert one.diff == pytest.approx(ref.diff) and one.extra == {"n_sets": 1}


def test_versus_sets_p_value_matches_exact_enumeration():
    rng = np.random.default_rng(7)
    x = rng.random(12) < 0.8
    Y = rng.random((3, 12)) < 0.35
    d = x - Y.mean(axis=0)
    r = versus_sets(x, Y, "t", "pruned", "random", "m")
    assert r.diff == pytest.approx(x.mean() - Y.mean())
    exact = exact_sign_flip(d)
    assert 0.01 < exact < 0.9  # a case where Monte Carlo error is visible, not a trivial p
    assert r.p_value == pytest.approx(exact, abs=0.015)


def test_versus_sets_interval_carries_set_variance():
    rng = np.random.default_rng(11)
    n = 100
    x = rng.random(n) < 0.5
    y0 = rng.random(n) < 0.5
    same = np.stack([y0, y0, y0])
    differ = np.stack([rng.random(n) < 0.2, y0, rng.random(n) < 0.8])
    w_same = np.diff(versus_sets(x, same, "t", "a", "random", "m").ci)[0]
    w_differ = np.diff(versus_sets(x, differ, "t", "a", "random", "m").ci)[0]
    # prompt variance alone is smaller for the differing sets (their per-prompt mean varies less),
    # so only the set resampling can make this interval wider
    assert w_differ > 1.4 * w_same


def test_versus_sets_flip():
    rng = np.random.default_rng(2)
    x, Y = rng.random(80) < 0.7, rng.random((4, 80)) < 0.5
    a = versus_sets(x, Y, "t", "pruned", "random", "m")
    b = versus_sets(x, Y, "t", "random", "unpruned", "m", flip=True)
    assert b.diff == pytest.approx(-a.diff) and b.diff == pytest.approx(Y.mean() - x.mean())
    assert b.ci == pytest.approx((-a.ci[1], -a.ci[0]))
    assert b.p_value == a.p_value and b.mde == a.mde


def test_versus_sets_errors():
    with pytest.raises(ValueError, match="x has 5 prompts, Y has 6"):
        versus_sets(np.ones(5, bool), np.ones((2, 6), bool), "t", "a", "b", "m")
    with pytest.raises(ValueError, match="no prompts"):
        versus_sets(np.ones(0, bool), np.ones((2, 0), bool), "t", "a", "b", "m")
    with pytest.raises(ValueError, match="at least one set"):
        versus_sets(np.ones(5, bool), np.ones((0, 5), bool), "t", "a", "b", "m")


# ---------------------------------------------------------------------------------------------
# pooled


def test_pooled_diff_weighs_tasks_equally():
    rng = np.random.default_rng(5)
    sizes, probs = [20, 60, 150], [(0.9, 0.5), (0.5, 0.5), (0.3, 0.6)]
    per_task = {f"t{i}": correlated(rng, n, p, q) for i, (n, (p, q)) in enumerate(zip(sizes, probs))}
    by_hand = np.mean([x.mean() - y.mean() for x, y in per_task.values()])
    by_prompt = np.mean(np.concatenate([x.astype(float) - y for x, y in per_task.values()]))
    assert abs(by_hand - by_prompt) > 0.02  # the weighting matters in this case
    r = pooled(per_task, "pruned", "unpruned", "m")
    assert r.diff == pytest.approx(by_hand)
    assert r.task == "pooled" and r.n == 230 and r.test == "stratified sign-flip"
    assert r.extra["n_tasks"] == 3
    flipped = pooled(per_task, "pruned", "unpruned", "m", flip=True)
    assert flipped.diff == pytest.approx(-by_hand) and flipped.ci == pytest.approx((-r.ci[1], -r.ci[0]))


def test_pooled_single_task_equals_per_task_functions():
    rng = np.random.default_rng(8)
    x, y = correlated(rng, 90, 0.6, 0.5)
    Y = np.stack([y, rng.random(90) < 0.4])
    one, ref = pooled({"t": (x, y)}, "a", "b", "m"), paired(x, y, "t", "a", "b", "m")
    assert one.diff == pytest.approx(ref.diff) and one.ci == pytest.approx(ref.ci)
    sets, ref = pooled({"t": (x, Y)}, "a", "random", "m"), versus_sets(x, Y, "t", "a", "random", "m")
    assert sets.diff == pytest.approx(ref.diff) and sets.ci == pytest.approx(ref.ci)
    assert sets.p_value == pytest.approx(ref.p_value)


def test_pooled_shares_the_set_resample_across_tasks():
    # every prompt of every task sees set 0 at 1 and set 1 at 0 while x is 1: all the variance is in
    # which sets a replicate draws (0, 1 or 2 copies of set 0); shared across tasks, the pooled
    # replicates are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1]
    # (independent set draws per task would average out and narrow it)
    x, Y = np.ones(30, bool), np.stack([np.ones(30, bool), np.zeros(30, bool)])
    r = pooled({f"t{i}": (x, Y) for i in range(4)}, "pruned", "random", "m")
    assert r.diff == 0.5 and r.ci == (0.0, 1.0)


def test_pooled_up_down_follow_holm_of_mcnemar():
    counts = {"up": (15, 0), "down": (0, 12), "weak": (8, 1), "null1": (3, 3), "null2": (0, 0), "null3": (4, 2)}
    per_task = {t: from_counts(b, c, both=10, neither=10) for t, (b, c) in counts.items()}
    p = [binom_two_sided(b, c) for b, c in counts.values()]
    assert p[2] < 0.05  # "weak" is significant alone, not after Holm
    reject = hand_holm(p)
    up = sum(r and b > c for r, (b, c) in zip(reject, counts.values()))
    down = sum(r and b < c for r, (b, c) in zip(reject, counts.values()))
    assert (up, down) == (1, 1)
    r = pooled(per_task, "pruned", "unpruned", "m")
    assert (r.extra["n_up"], r.extra["n_down"]) == (up, down)
    r = pooled(per_task, "pruned", "unpruned", "m", flip=True)
    assert (r.extra["n_up"], r.extra["n_down"]) == (down, up)


def test_pooled_up_down_with_sets_follow_holm_of_sign_flip():
    rng = np.random.default_rng(9)
    Y_rate, x_rates = 0.5, {"a": 0.95, "b": 0.05, "c": 0.5, "d": 0.6}
    per_task = {t: (rng.random(60) < q, rng.random((3, 60)) < Y_rate) for t, q in x_rates.items()}
    per = [versus_sets(x, Y, t, "pruned", "random", "m") for t, (x, Y) in per_task.items()]
    reject = hand_holm([c.p_value for c in per])
    up = sum(r and c.diff > 0 for r, c in zip(reject, per))
    down = sum(r and c.diff < 0 for r, c in zip(reject, per))
    assert up >= 1 and down >= 1
    r = pooled(per_task, "pruned", "random", "m")
    assert (r.extra["n_up"], r.extra["n_down"]) == (up, down)
    assert r.diff == pytest.approx(np.mean([c.diff for c in per]))


def test_pooled_p_value_matches_exact_stratified_enumeration():
    # task A (4 prompts) and B (8 prompts): each prompt's difference weighs 1 / (2 * n_task)
    xa, ya = np.array([1, 1, 1, 0], bool), np.array([0, 0, 0, 0], bool)
    xb, yb = np.array([0, 0, 1, 0, 0, 1, 0, 1], bool), np.array([1, 1, 0, 1, 0, 1, 0, 1], bool)
    weights = np.concatenate([(xa.astype(float) - ya) / 8, (xb.astype(float) - yb) / 16])
    exact = exact_sign_flip(weights)
    unweighted = exact_sign_flip(np.concatenate([xa.astype(float) - ya, xb.astype(float) - yb]))
    assert abs(exact - unweighted) > 0.1  # the stratification changes the answer here
    r = pooled({"A": (xa, ya), "B": (xb, yb)}, "pruned", "unpruned", "m")
    assert r.p_value == pytest.approx(exact, abs=0.015)


def test_pooled_coverage():
    # 4 tasks x 50 prompts; the truth is the mean of the per-task differences
    probs = [(0.6, 0.45), (0.3, 0.3), (0.8, 0.7), (0.5, 0.6)]
    truth = np.mean([p - q for p, q in probs])
    hits = 0
    for seed in range(400):
        rng = np.random.default_rng(10_000 + seed)
        per_task = {f"t{i}": correlated(rng, 50, p, q) for i, (p, q) in enumerate(probs)}
        lo, hi = pooled(per_task, "a", "b", "m", n_boot=1000, seed=seed).ci
        hits += lo <= truth <= hi
    assert 0.93 <= hits / 400 <= 0.985


def test_pooled_errors():
    x = np.ones(5, bool)
    with pytest.raises(ValueError, match="same baseline shape"):
        pooled({"a": (x, np.ones((2, 5), bool)), "b": (x, np.ones((3, 5), bool))}, "p", "r", "m")
    with pytest.raises(ValueError, match="b: x has 5 prompts, b: Y has 4"):
        pooled({"a": (x, x), "b": (x, np.ones(4, bool))}, "p", "u", "m")
    with pytest.raises(ValueError, match="at least one task"):
        pooled({}, "p", "u", "m")


# ---------------------------------------------------------------------------------------------
# compare_task, compare_all


def conditions(rng, n, sets=3, pruned=True):
    base = rng.random(n)
    out = {"unpruned": base < 0.6, "bottom": base < 0.55}
    if pruned:
        out["pruned"] = base < 0.4
    out.update({f"random-{i}": (base < 0.6) ^ (rng.random(n) < 0.1) for i in range(sets)})
    return out


def families(outcomes):
    """The conditions' families, as `Condition.family` gives them (the names are only labels)."""
    return {name: "random" if name.startswith("random") else name for name in outcomes}


def test_compare_task():
    out = conditions(np.random.default_rng(0), 80)
    res = compare_task("antonyms", out, "accuracy", families(out), n_boot=500)
    assert [(c.condition, c.baseline) for c in res] == [
        ("bottom", "unpruned"), ("pruned", "unpruned"), ("random", "unpruned"), ("pruned", "random")]
    Y = np.stack([out[f"random-{i}"] for i in range(3)])
    assert res[1].diff == pytest.approx(out["pruned"].mean() - out["unpruned"].mean())
    assert res[2].diff == pytest.approx(Y.mean() - out["unpruned"].mean())  # random minus unpruned
    assert res[3].diff == pytest.approx(out["pruned"].mean() - Y.mean())
    assert [c.test for c in res] == ["mcnemar-exact"] * 2 + ["sign-flip"] * 2
    assert all(c.task == "antonyms" and c.metric == "accuracy" and c.n == 80 for c in res)
    no_pruned = conditions(np.random.default_rng(0), 80, pruned=False)
    no_pruned = compare_task("t", no_pruned, "accuracy", families(no_pruned), n_boot=200)
    assert [(c.condition, c.baseline) for c in no_pruned] == [("bottom", "unpruned"), ("random", "unpruned")]
    no_sets = conditions(np.random.default_rng(0), 80, sets=0)
    no_sets = compare_task("t", no_sets, "accuracy", families(no_sets), n_boot=200)
    assert [c.condition for c in no_sets] == ["bottom", "pruned"]
    # without families every condition is its own: the random sets are compared one by one, never as a set
    alone = compare_task("t", out, "accuracy", n_boot=200)
    assert [c.condition for c in alone] == ["bottom", "pruned", "random-0", "random-1", "random-2"]
    # the family decides, not the name: a set called anything joins the random family
    renamed = {("control-7" if k == "random-1" else k): v for k, v in out.items()}
    fams = {**families(renamed), "control-7": "random"}
    again = compare_task("antonyms", renamed, "accuracy", fams, n_boot=500)
    assert [(c.condition, c.baseline) for c in again] == [(c.condition, c.baseline) for c in res]
    assert [c.diff for c in again] == pytest.approx([c.diff for c in res])


def test_compare_task_errors():
    out = conditions(np.random.default_rng(0), 30)
    with pytest.raises(ValueError, match="baseline 'unpruned' missing"):
        compare_task("t", {k: v for k, v in out.items() if k != "unpruned"}, "accuracy")
    out["bottom"] = out["bottom"][:25]
    with pytest.raises(ValueError, match=r"unpruned: 30.*bottom: 25"):
        compare_task("t", out, "accuracy")


def test_compare_all_pools_the_per_task_pairs():
    rng = np.random.default_rng(4)
    per_task = {"a": conditions(rng, 40), "b": conditions(rng, 70), "c": conditions(rng, 55)}
    fams = families(per_task["a"])
    res = compare_all(per_task, "copy_rate", fams, n_boot=300)
    per, pool = res[:12], res[12:]
    expected = [compare_task(t, out, "copy_rate", fams, n_boot=300) for t, out in per_task.items()]
    assert [c.to_json() for c in per] == [c.to_json() for cs in expected for c in cs]
    assert [(c.task, c.condition, c.baseline) for c in pool] == [
        ("pooled", "bottom", "unpruned"), ("pooled", "pruned", "unpruned"),
        ("pooled", "random", "unpruned"), ("pooled", "pruned", "random")]
    for j, c in enumerate(pool):
        assert c.diff == pytest.approx(np.mean([cs[j].diff for cs in expected]))
        assert c.n == 165 and c.extra["n_tasks"] == 3
    per_task["c"] = {k.replace("random-2", "random-9"): v for k, v in per_task["c"].items()}
    with pytest.raises(ValueError, match="random sets differ"):
        compare_all(per_task, "copy_rate", {**fams, "random-9": "random"}, n_boot=100)


def test_compare_all_is_fast():
    rng = np.random.default_rng(0)
    per_task = {f"t{i}": conditions(rng, 100) for i in range(25)}  # 6 conditions each
    start = time.perf_counter()
    for metric in ("accuracy", "copy_rate"):
        compare_all(per_task, metric, families(per_task["t0"]))
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------
# paired_means: continuous per-prompt values


def test_paired_means_equals_the_0_1_comparisons_on_0_1_outcomes():
    rng = np.random.default_rng(4)
    x = rng.random(40) < 0.3
    Y = rng.random((5, 40)) < 0.5
    a, b = paired_means(x, Y, "t", "pruned", "random", "acc", seed=7), versus_sets(x, Y, "t", "pruned", "random", "acc", seed=7)
    assert (a.diff, a.ci, a.p_value, a.extra) == (b.diff, b.ci, b.p_value, b.extra)
    c, d = paired_means(x, Y[0], "t", "p", "u", "acc", seed=3), paired(x, Y[0], "t", "p", "u", "acc", seed=3)
    assert c.diff == pytest.approx(d.diff) and c.ci == d.ci and c.extra == {}


def test_paired_means_continuous_against_hand_computations():
    rng = np.random.default_rng(0)
    n = 10
    x, y = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
    r = paired_means(x, y, "t", "chosen", "unpruned", "contrast", n_boot=4000, seed=1)
    d = x - y
    assert r.diff == pytest.approx(d.mean()) and r.n == n and r.test == "sign-flip"
    # the interval: a percentile bootstrap of mean(x - y) over resampled prompts, same draws
    idx = np.random.default_rng(1).integers(0, n, size=(4000, n))
    assert r.ci == pytest.approx(tuple(np.quantile(d[idx].mean(1), [0.025, 0.975])))
    # the p-value: the exact sign-flip distribution over all 2^n patterns, within Monte Carlo error
    signs = np.array(list(itertools.product((-1, 1), repeat=n)))
    exact = float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))
    assert abs(r.p_value - exact) < 0.015, (r.p_value, exact)
    assert r.mde == pytest.approx(C_POWER * d[idx].mean(1).std(ddof=1))  # no 0-1 floor
    with pytest.raises(ValueError, match="non-finite"):
        paired_means(np.array([1.0, np.nan]), np.zeros(2), "t", "a", "b", "m")
    with pytest.raises(ValueError, match="differ in length"):
        paired_means(np.zeros(3), np.zeros((2, 4)), "t", "a", "b", "m")

