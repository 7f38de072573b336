"""The balanced copy probe and the no-gold-in-demos switch: properties over seeds, variants and sizes."""

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechcopy.models.tiny import char_tokenizer
from mechcopy.tasks import load_task
from mechcopy.tasks.outcomes import outcome_rates, outcomes
from mechcopy.tasks.probe import (
    FORMATS, ITEM_SETS, SPLITS, ProbeConfig, build_probe, probe_splits, vowel_count,
)
from mechcopy.tasks.prompts import build_prompts, encode

TOK = char_tokenizer()
PROPERTY = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def gold_is_uniform(prompts, labels) -> bool:
    """Gold labels exactly uniform over `labels`, up to rounding (counts differ by at most one)."""
    counts = Counter(p.answer for p in prompts)
    per_label = [counts[label] for label in labels]
    return set(counts) <= set(labels) and max(per_label) - min(per_label) <= 1


@st.composite
def variants(draw):
    k = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(1, 6), min_size=k + 1, max_size=6, unique=True))
    config = ProbeConfig(tuple(sorted(counts)), draw(st.sampled_from(ITEM_SETS)),
                         draw(st.sampled_from(sorted(FORMATS))), k)
    # every count has >= 36 items in every list: at most 30 queries per count keeps all variants feasible
    cap = 30 * len(counts)
    sizes = draw(st.tuples(*[st.integers(0, cap // 3)] * 3))
    return config, sizes, draw(st.integers(0, 10_000))


@PROPERTY
@given(variants())
def test_balanced_probe_properties(case):
    config, (n_attr, n_dev, n_test), seed = case
    ps = build_probe(TOK, config, n_attr, n_dev, n_test, seed=seed)
    template, sep = FORMATS[config.template]
    queries = {}
    for split, size in zip(SPLITS, (n_attr, n_dev, n_test)):
        prompts = getattr(ps, split)
        assert len(prompts) == size
        assert gold_is_uniform(prompts, config.labels), ps.gold_counts(split)
        if size % len(config.counts) == 0:
            assert set(ps.gold_counts(split).values()) == {size // len(config.counts)}
        queries[split] = {p.query for p in prompts}
        assert len(queries[split]) == size
        subsets = Counter()
        for p in prompts:
            # answers: single digits, the vowel count, one exact token
            assert len(p.answer) == 1 and p.answer.isdigit() and p.answer == str(vowel_count(p.query))
            assert len(p.answer_ids) == 1 and all(len(ids) == 1 for ids in p.demo_label_ids)
            assert encode(TOK, p.text) + list(p.answer_ids) == encode(TOK, p.text + p.answer)
            # demos: k distinct labels from the counts, never the gold, each the demo item's count
            assert p.answer not in p.demo_labels and p.answer_ids not in p.demo_label_ids
            assert len(p.demos) == config.shots and len(set(p.demo_labels)) == config.shots
            assert set(p.demo_labels) <= set(config.labels)
            assert all(y == str(vowel_count(x)) for x, y in p.demos)
            assert p.label_space == config.labels and p.task == config.name
            # the format: demos joined by the separator, the query's template up to the answer
            demos = sep.join(template.replace("{x}", x).replace("{y}", y) for x, y in p.demos)
            assert p.text == demos + sep + f"{p.query} -> "
            subsets[p.answer, frozenset(p.demo_labels)] += 1
        # every k-subset of the non-gold counts equally often per gold label, up to one pass
        for gold in config.labels:
            used = [subsets[g, s] for g, s in subsets if g == gold]
            if used:
                assert max(used) - min(used) <= 1, (gold, used)
    assert not queries["attribution"] & queries["dev"]
    assert not queries["attribution"] & queries["test"]
    assert not queries["dev"] & queries["test"]
    assert build_probe(TOK, config, n_attr, n_dev, n_test, seed=seed) == ps


def test_uniformity_check_fails_on_the_classic_probe():
    """The check above has teeth: the classic probe's natural labels (2 vowels: half the words) fail it."""
    attr, dev = probe_splits(TOK, n_attr=100, n_dev=50)
    labels = tuple(sorted({p.answer for p in attr + dev}))
    assert not gold_is_uniform(attr, labels) and not gold_is_uniform(dev, labels)
    natural = build_probe(TOK, ProbeConfig(items="words", balanced=False), 120, 0, 0)
    assert not gold_is_uniform(natural.attribution, natural.config.labels)
    assert all(p.answer not in p.demo_labels for p in natural.attribution)


def test_drops_are_reported_and_replaced(monkeypatch):
    import mechcopy.tasks.probe as probe

    real = probe.load_items
    monkeypatch.setattr(probe, "load_items", lambda which: ("Orléans", "Zürich") + real(which))
    ps = probe.build_probe(TOK, ProbeConfig(items="places"), 60, 0, 0)
    assert {item for item, _ in ps.dropped} == {"Orléans", "Zürich"}
    assert all("does not know" in reason for _, reason in ps.dropped)
    assert len(ps.attribution) == 60 and gold_is_uniform(ps.attribution, ps.config.labels)
    assert ps.to_json()["sizes"] == {"attribution": 60, "dev": 0, "test": 0}


def test_config_and_size_errors():
    with pytest.raises(ValueError, match="shots = 5 needs at least 6"):
        ProbeConfig(shots=5, counts=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="unknown probe format"):
        ProbeConfig(template="tab")
    with pytest.raises(ValueError, match="single digits"):
        ProbeConfig(counts=(1, 12))
    with pytest.raises(ValueError, match="run out for gold count 6"):
        build_probe(TOK, ProbeConfig(items="words"), 200, 30, 30)
    with pytest.raises(ValueError, match=r"has \[9\] vowels"):
        build_probe(TOK, ProbeConfig(items="words", counts=(1, 2, 3, 4, 9)), 5, 0, 0)


def test_outcomes_tell_copy_from_any_wrong_digit():
    ps = build_probe(TOK, ProbeConfig(), 6, 0, 0, seed=2)
    prompts = ps.attribution
    absent = [next(label for label in p.label_space if label not in p.demo_labels and label != p.answer)
              for p in prompts]
    preds = [prompts[0].answer, prompts[1].demo_labels[0], absent[2], "x", prompts[4].demo_labels[3], absent[5]]
    assert list(outcomes(prompts, preds)) == ["correct", "copy", "in_range", "other", "copy", "in_range"]
    rates = outcome_rates(prompts, preds)
    assert rates["copy"] == pytest.approx(2 / 6) and rates["in_range"] == pytest.approx(2 / 6)
    # four demo labels can be copied, one in-range label is absent: per label, 2/6/4 against 2/6/1
    assert rates["copy_per_label"] == pytest.approx(2 / 6 / 4) and rates["in_range_per_label"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="label_space"):
        outcomes(probe_splits(TOK, n_attr=2, n_dev=1)[0], ["1", "2"])


# ---------------------------------------------------------------- gold_in_demos for any task


@PROPERTY
@given(st.sampled_from(["sentiment_binary", "sentiment_five", "location_continent", "object_counting"]),
       st.integers(1, 6), st.integers(0, 10_000))
def test_no_gold_in_demos_switch(name, k, seed):
    ps = build_prompts(load_task(name), TOK, shots=k, n=25, seed=seed, gold_in_demos=False)
    assert len(ps) > 0
    for p in ps.prompts:
        assert p.answer not in p.demo_labels, (p.answer, p.demo_labels)
        assert len(p.demos) == k and p.query not in {x for x, _ in p.demos}


def test_default_keeps_gold_in_demos():
    """Without the switch a task's demos do carry the gold label (so the property above tests something)."""
    ps = build_prompts(load_task("sentiment_binary"), TOK, shots=4, n=40, seed=0)
    assert sum(p.answer in p.demo_labels for p in ps.prompts) > 20
    again = build_prompts(load_task("sentiment_binary"), TOK, shots=4, n=40, seed=0, gold_in_demos=True)
    assert again == ps


def test_generation_stopping_is_irrelevant_for_single_digit_answers(tiny):
    """Every answer and demo label is one token, so `predict` takes the next-token argmax: the separator
    it would stop generation at does not matter."""
    from mechcopy.evaluation import predict

    prompts = build_probe(tiny.tokenizer, ProbeConfig(template="comma"), 12, 0, 0).attribution
    assert predict(tiny, prompts, sep=", ") == predict(tiny, prompts, sep="\n") == predict(tiny, prompts, sep="->")


@pytest.mark.slow
def test_smollm2_tokenizer_makes_every_prompt_exact():
    """SmolLM2's tokenizer (" 3" is " " + "3"): both formats, every item set, nothing dropped; sentiment
    labels are one token with their leading space."""
    from transformers import AutoTokenizer

    from mechcopy.models import zoo

    tok = AutoTokenizer.from_pretrained(zoo.fetch("smollm2-135m"))
    for fmt in FORMATS:
        for items in ITEM_SETS:
            ps = build_probe(tok, ProbeConfig(items=items, template=fmt), 60, 30, 30)
            assert not ps.dropped and sum(len(getattr(ps, s)) for s in SPLITS) == 120
            for p in ps.attribution:
                assert p.text.endswith("-> ") and len(p.answer_ids) == 1
    for name, labels in (("sentiment_binary", ("positive", "negative")),
                         ("sentiment_five", ("terrible", "bad", "okay", "good", "great"))):
        assert all(len(tok(" " + label, add_special_tokens=False)["input_ids"]) == 1 for label in labels)
        ps = build_prompts(load_task(name), tok, shots=4, n=30, gold_in_demos=False)
        assert len(ps) == 30 and all(len(p.answer_ids) == 1 for p in ps.prompts)


def test_names_are_places_and_people():
    from mechcopy.tasks.probe import load_items

    assert set(load_items("names")) == set(load_items("places")) | set(load_items("people"))
    assert not set(load_items("names")) & set(load_items("words"))
