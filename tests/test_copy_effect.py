"""The copy effect and the demo-share test against hand counts on constructed examples, the
copy-control construction, and the separation of copying from label preference on simulated answers."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from scipy import stats as st

from mechcopy.copy_effect import (CopyEffect, DemoShare, copy_effect, copy_effect_report, demo_share,
                                  poisson_binomial_test)
from mechcopy.tasks.outcomes import classify
from mechcopy.models.tiny import char_tokenizer
from mechcopy.tasks import Task
from mechcopy.tasks.prompts import ICLPrompt, build_prompts


def prompt(gold, demo_labels, task="t"):
    return ICLPrompt(task=task, text="", query="q", answer=gold, answer_ids=(0,),
                     demos=tuple(("x", y) for y in demo_labels), demo_labels=tuple(demo_labels),
                     demo_label_ids=tuple((0,) for _ in demo_labels))


# (gold, demo labels, prediction); worked out by hand in the test below
CASES = [("a", "b", "b"), ("a", "c", "b"), ("b", "ac", "a"), ("b", "b", "c"), ("c", "a", "c"), ("c", "ab", "a")]


def test_copy_effect_equals_a_hand_count():
    prompts = [prompt(g, tuple(d)) for g, d, _ in CASES]
    preds = [p for _, _, p in CASES]
    r = copy_effect(prompts, preds, ("a", "b", "c"))
    # label a, wrong in prompts 3-6: shown in 3 (said), 5, 6 (said) -> 2/3; absent in 4 -> 0/1
    # label b, wrong in 1, 2, 5, 6: shown in 1 (said), 6 -> 1/2; absent in 2 (said), 5 -> 1/2
    # label c, wrong in 1-4: shown in 2, 3 -> 0/2; absent in 1, 4 (said) -> 1/2
    assert r.present_rate == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert r.absent_rate == pytest.approx((0 + 1 / 2 + 1 / 2) / 3)
    assert r.effect == pytest.approx(1 / 18)
    assert (r.n, r.n_present, r.n_absent, r.labels, r.reason) == (6, 7, 5, ("a", "b", "c"), None)
    assert r.ci[0] <= r.effect <= r.ci[1]
    assert CopyEffect.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_demo_share_equals_a_hand_count():
    prompts = [prompt(g, tuple(d)) for g, d, _ in CASES]
    r = demo_share(prompts, [p for _, _, p in CASES], ("a", "b", "c"))
    # wrong in-set answers: prompts 1 (b, shown), 2 (b, not), 3 (a, shown), 4 (c, not), 6 (a, shown);
    # chance = wrong labels shown / wrong labels: 1/2, 1/2, 2/2, 0/2, 2/2
    assert (r.n_wrong, r.n_demo, r.share, r.chance) == (5, 3, 0.6, pytest.approx(0.6))
    assert r.p_value == pytest.approx(1.0)        # 2 sure + Binomial(2, 1/2): 3 is the likeliest count
    assert r.ci == pytest.approx(st.binomtest(3, 5).proportion_ci(method="exact"))
    assert DemoShare.from_json(json.loads(json.dumps(r.to_json()))) == r
    empty = demo_share(prompts[4:5], ["c"], ("a", "b", "c"))
    assert empty.share is None and "no wrong answer" in empty.reason


def test_poisson_binomial_test():
    assert poisson_binomial_test(0, [0.5] * 3) == pytest.approx(0.25)             # 1/8 + 1/8
    for k, n, c in [(51, 69, 0.8), (36, 54, 0.8), (41, 67, 0.8), (3, 10, 0.25)]:  # the probe's figures
        assert poisson_binomial_test(k, [c] * n) == pytest.approx(st.binomtest(k, n, c).pvalue, rel=1e-9)
    assert round(poisson_binomial_test(51, [0.8] * 69), 2) == 0.23                # docs/replication.md


def test_null_where_the_construction_cannot_estimate_it():
    # 2 labels, no gold among the demos: the wrong label is always among the demos
    prompts = [prompt("pos", ("neg", "neg")), prompt("neg", ("pos", "pos")), prompt("pos", ("neg",))]
    r = copy_effect(prompts, ["neg", "neg", "pos"], ("neg", "pos"))
    assert r.effect is None and r.ci is None and "always present" in r.reason and r.n_present == 3
    assert "open task" in copy_effect(prompts, ["neg"] * 3, None).reason
    never = copy_effect([prompt("a", ("a",)), prompt("b", ("b",))], ["b", "a"], ("a", "b"))
    assert never.effect is None and "ever among the demos" in never.reason


def label_task(labels=("neg", "pos"), per_label=30):
    return Task("sent", tuple((f"w{i}{y}", y) for y in labels for i in range(per_label)))


@pytest.mark.parametrize("labels", [("neg", "pos"), ("a", "b", "c", "d"), ("a", "b", "c", "d", "e")])
def test_copy_control_shows_each_label_as_often_as_not(labels):
    task = label_task(labels)
    ps = build_prompts(task, char_tokenizer(), shots=4, n=len(task), seed=3, copy_control=True).prompts
    assert len(ps) == len(task)
    shown = Counter(y for p in ps for y in set(p.demo_labels))
    for y in labels:
        assert abs(shown[y] / len(ps) - 0.5) <= 0.05, (y, shown)
    assert all(len(p.demos) == 4 and p.query not in {x for x, _ in p.demos} for p in ps)
    again = build_prompts(task, char_tokenizer(), shots=4, n=len(task), seed=3, copy_control=True).prompts
    assert again == ps


def test_copy_control_without_gold_and_open_tasks():
    task = label_task()
    ps = build_prompts(task, char_tokenizer(), shots=4, n=20, copy_control=True, gold_in_demos=False).prompts
    assert all(set(p.demo_labels) == {"neg", "pos"} - {p.answer} for p in ps)
    open_task = Task("open", tuple((f"x{i}", f"y{i}") for i in range(20)))
    with pytest.raises(ValueError, match="is open"):
        build_prompts(open_task, char_tokenizer(), shots=2, n=5, copy_control=True)
    plain = build_prompts(task, char_tokenizer(), shots=4, n=20, seed=1)
    assert plain == build_prompts(task, char_tokenizer(), shots=4, n=20, seed=1, copy_control=False)


def simulate(prompts, labels, copy: float, prefer: str, seed=0):
    """Answers of a model that copies a random demo label with probability `copy` and otherwise says
    the correct label half the time and its favourite label `prefer` the rest."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        u = rng.random()
        out.append(rng.choice(p.demo_labels) if u < copy else p.answer if u < copy + (1 - copy) / 2 else prefer)
    return out


def test_copy_effect_separates_copying_from_preference():
    labels = ("a", "b", "c", "d")
    ps = build_prompts(label_task(labels, 60), char_tokenizer(), shots=4, n=240, seed=0, copy_control=True).prompts
    prefers = simulate(ps, labels, copy=0.0, prefer="a")
    copies = simulate(ps, labels, copy=0.5, prefer="a")
    _, copy_rate = classify(ps, prefers)
    assert copy_rate.mean() > 0.15                    # the preference shows as copying in the copy rate
    r_pref, r_copy = copy_effect(ps, prefers, labels), copy_effect(ps, copies, labels)
    assert r_pref.ci[0] < 0 < r_pref.ci[1]            # ... but not in the copy effect
    assert r_copy.ci[0] > 0.1
    report = copy_effect_report({"pref": (ps, prefers, labels), "copy": (ps, copies, labels),
                                 "open": (ps, prefers, None)})
    assert set(report) == {"tasks", "pooled", "task_level"}
    assert report["tasks"]["open"]["copy_effect"]["effect"] is None
    assert report["pooled"]["effect"] == pytest.approx((r_pref.effect + r_copy.effect) / 2)
    lo, hi = report["pooled"]["ci"]
    assert lo < report["pooled"]["effect"] < hi
    assert report["task_level"]["n_tasks"] == 2 and report["task_level"]["metric"] == "copy_effect"
    assert json.loads(json.dumps(report)) == report
