"""The label-copy probe (generated closed-label tasks), its constructions and splits, and label swaps."""

import json
import random
from collections import Counter

import pytest

from mechcopy.models.tiny import char_tokenizer
from mechcopy.tasks import PROBE_NAME, list_tasks, load_task
from mechcopy.tasks.copy_probe import (CONSTRUCTIONS, PROBE_TASKS, SPLITS, SYMBOLS, CopyProbe, CopyProbeConfig,
                                       ProbeTaskSpec, build_copy_probe, draw_items)
from mechcopy.tasks.pairs import label_swap, label_swap_target, label_swaps, token_roles
from mechcopy.tasks.prompts import encode

SMALL = dict(n_attr=30, n_dev=24, n_test=24)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def probes(tok):
    return {c: build_copy_probe(tok, CopyProbeConfig(construction=c, **SMALL), seed=3) for c in CONSTRUCTIONS}


def test_rules_agree_with_draws():
    """Every drawn input's answer, computed by the task's rule (independently of the draw), is the label it
    was drawn for; inputs hold only digits, the symbols and single spaces, and have one length per task."""
    allowed = set("0123456789 ") | set(SYMBOLS)
    rng, lengths = random.Random(0), {}
    for spec in PROBE_TASKS.values():
        assert 3 <= len(spec.labels) <= 8 and len(set(spec.labels)) == len(spec.labels), spec.name
        for label in spec.labels:
            for _ in range(200):
                x = spec.draw(rng, label)
                assert spec.rule(x) == label, (spec.name, x, label)
                assert set(x) <= allowed and x == x.strip() and "  " not in x, (spec.name, x)
                lengths.setdefault(spec.name, set()).add(len(x))
    assert all(len(v) == 1 for v in lengths.values()), lengths  # one input length per task (label swaps)


def test_hand_examples():
    rule = {name: spec.rule for name, spec in PROBE_TASKS.items()}
    assert rule["last_digit"]("4817") == "7"
    assert rule["max_digit"]("3 8 5 0") == "8"
    assert rule["star_count"]("* # * * % * @") == "four"
    assert rule["distinct_symbols"]("# @ # % @ #") == "three"
    assert rule["odd_position"]("7 3 7 7") == "second"
    assert rule["repeated_symbol"]("# @ # %") == "#"


def _evaluation_tasks():
    """Every task the suite evaluates: the JSON tasks and the generators (object_counting); not the vowel probe."""
    return [load_task(name) for name in list_tasks() if name != PROBE_NAME]


def test_no_data_shared_with_evaluation_tasks(tok):
    """No probe input equals or contains (as a substring) any evaluation task's input, and no probe label
    set equals any evaluation task's label set: checked on the default probe's prompts (queries and
    demos, every construction) and on 50 fresh items per label of every task."""
    tasks = _evaluation_tasks()
    assert {"object_counting", "sentiment_five", "animal_class"} <= {t.name for t in tasks}
    eval_inputs = {x for t in tasks for x, _ in t.pairs}
    probe_inputs = set()
    for c in CONSTRUCTIONS:
        for p in build_copy_probe(tok, CopyProbeConfig(construction=c)).attribution:
            probe_inputs |= {p.query, *(x for x, _ in p.demos)}
    for name in PROBE_TASKS:
        probe_inputs |= {x for x, _ in draw_items(name, 50, random.Random(1))}
    assert len(probe_inputs) > 1500
    for x in probe_inputs:
        inside = {x[i:j] for i in range(len(x)) for j in range(i + 1, len(x) + 1)}  # x itself included
        assert not inside & eval_inputs, (x, inside & eval_inputs)
    eval_label_sets = {frozenset(y for _, y in t.pairs) for t in tasks}
    for spec in PROBE_TASKS.values():
        assert frozenset(spec.labels) not in eval_label_sets, spec.name


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_splits(probes, construction):
    """Sizes per task; query items (and demos) never cross splits; gold labels close to uniform; every prompt
    carries its task's label set; the gold is never a demo label except in the standard construction."""
    probe = probes[construction]
    for name in PROBE_TASKS:
        items = {}
        for split in SPLITS:
            prompts = probe.split(split, name)
            assert len(prompts) == probe.config.size(split)
            queries = [p.query for p in prompts]
            assert len(set(queries)) == len(queries)
            items[split] = set(queries) | {x for p in prompts for x, _ in p.demos}
            for p in prompts:
                assert p.label_space == PROBE_TASKS[name].labels and p.answer in p.label_space
                assert PROBE_TASKS[name].rule(p.query) == p.answer
                assert all(PROBE_TASKS[name].rule(x) == y for x, y in p.demos)
                assert len(p.demos) == probe.config.shots and p.query not in {x for x, _ in p.demos}
                if construction != "standard":
                    assert p.answer not in p.demo_labels
            counts = Counter(p.answer for p in prompts)
            assert max(counts.values()) <= -(-len(prompts) // len(p.label_space)) + 1, counts
        for a, b in (("attribution", "dev"), ("attribution", "test"), ("dev", "test")):
            assert not items[a] & items[b], (name, a, b)
    if construction == "standard":
        assert any(p.answer in p.demo_labels for p in probe.attribution)


def test_copy_control_balance(tok):
    """Copy-control: over a task's prompts, each label is among the demos about as often as it is absent,
    counted on the prompts where it is wrong (the copy effect's two conditions)."""
    probe = build_copy_probe(tok, CopyProbeConfig(construction="copy-control", n_attr=120, n_dev=0, n_test=0))
    for name, spec in PROBE_TASKS.items():
        prompts = probe.split("attribution", name)
        for y in spec.labels:
            wrong = [p for p in prompts if p.answer != y]
            present = sum(y in p.demo_labels for p in wrong)
            assert abs(present - (len(wrong) - present)) <= 0.2 * len(wrong), (name, y, present, len(wrong))


def test_seeds(tok, probes):
    """The same seed gives the same probe; the attribution seed redraws the attribution split alone; split
    sizes do not change the other splits' items."""
    config = CopyProbeConfig(**SMALL)
    assert build_copy_probe(tok, config, seed=3) == probes["no-gold"]
    other = build_copy_probe(tok, config, seed=3, attribution_seed=4)
    assert other.dev == probes["no-gold"].dev and other.test == probes["no-gold"].test
    assert other.attribution != probes["no-gold"].attribution
    for name in PROBE_TASKS:
        a = {p.query for p in other.split("attribution", name)}
        assert not a & {p.query for s in ("dev", "test") for p in other.split(s, name)}
    bigger = build_copy_probe(tok, CopyProbeConfig(**{**SMALL, "n_attr": 36}), seed=3)
    assert bigger.dev == probes["no-gold"].dev and bigger.test == probes["no-gold"].test
    assert build_copy_probe(tok, config, seed=5).test != probes["no-gold"].test


def test_json_round_trip(probes):
    for probe in probes.values():
        obj = json.loads(json.dumps(probe.to_json()))
        assert CopyProbe.from_json(obj) == probe
        assert obj["sizes"] == {"attribution": 30 * 6, "dev": 24 * 6, "test": 24 * 6}
    config = CopyProbeConfig(tasks=("max_digit", "odd_position"), construction="copy-control", shots=3)
    assert CopyProbeConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_refusals(tok, monkeypatch):
    with pytest.raises(ValueError, match="unknown copy-probe task 'nope'.*last_digit"):
        CopyProbeConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="unknown construction"):
        CopyProbeConfig(construction="random")
    with pytest.raises(ValueError, match="too few distinct inputs for label"):
        build_copy_probe(tok, CopyProbeConfig(tasks=("odd_position",), n_attr=1000))
    two = ProbeTaskSpec("two_labels", ("1", "2"), lambda rng, y: y * rng.randint(1, 9), lambda x: x[0], "")
    monkeypatch.setitem(PROBE_TASKS, "two_labels", two)
    with pytest.raises(ValueError, match="copy-control construction needs at least 3 labels"):
        CopyProbeConfig(tasks=("two_labels",), construction="copy-control")


# ---------------------------------------------------------------- label swaps


def _str_tokens(tok, text):
    return [tok.decode([i]) for i in encode(tok, text)]


def check_swap(tok, s):
    """The pair differs only inside the replaced demos' tokens (located independently, by token roles) and
    in its labels there; X is shown by the clean demos only, Z by the counterfactual's only."""
    clean, cf = s.clean, s.counterfactual
    a, b = encode(tok, clean.text), encode(tok, cf.text)
    assert len(a) == len(b)
    roles_a, roles_b = token_roles(_str_tokens(tok, clean.text), clean), token_roles(_str_tokens(tok, cf.text), cf)
    assert roles_a == roles_b and roles_a[-1] == "->q"
    demo_roles = {f"{r}{i + 1}" for i in s.replaced for r in ("x", "->", "y")}
    in_demos = {t for t, r in enumerate(roles_a) if r in demo_roles}
    differ = {t for t, (u, v) in enumerate(zip(a, b)) if u != v}
    assert differ and differ <= in_demos
    assert {t for t, r in enumerate(roles_a) if r in {f"y{i + 1}" for i in s.replaced}} <= differ
    assert in_demos == {t for lo, hi in s.spans for t in range(lo, hi)}
    assert s.x in clean.demo_labels and s.x not in cf.demo_labels
    assert s.z in cf.demo_labels and s.z not in clean.demo_labels
    assert s.z != clean.answer and s.x != clean.answer
    assert (cf.query, cf.answer, cf.answer_ids) == (clean.query, clean.answer, clean.answer_ids)
    kept = [i for i in range(len(clean.demos)) if i not in s.replaced]
    assert [clean.demos[i] for i in kept] == [cf.demos[i] for i in kept]
    assert all(cf.demo_labels[i] == s.z for i in s.replaced)
    assert (s.x_id,) == clean.demo_label_ids[s.replaced[0]] and (s.gold_id,) == clean.answer_ids


def test_label_swaps_align(tok, probes):
    """Every prompt of a task with one-character labels gets an aligned swap (the character tokenizer
    spells word labels out, and the target needs one-token labels: those prompts are dropped, saying so,
    as are no-gold prompts whose demos show every wrong label)."""
    one_char = [name for name, spec in PROBE_TASKS.items() if all(len(y) == 1 for y in spec.labels)]
    assert len(one_char) == 3
    for construction in ("no-gold", "copy-control"):
        prompts = probes[construction].attribution
        swaps, dropped = label_swaps(prompts, tok, seed=0)
        assert {s.clean.task for s in swaps} == set(one_char)
        assert len(swaps) == sum(p.task in one_char for p in prompts), dropped[:5]
        assert len(dropped) == len(prompts) - len(swaps)
        assert all("needs one-token labels" in d or "no absent label" in d for d in dropped), dropped
        for s in swaps:
            check_swap(tok, s)
        assert any(len(s.replaced) > 1 for s in swaps) or construction == "no-gold"


def test_label_swap_chosen_x_and_refusals(tok, probes):
    p = next(p for p in probes["no-gold"].split("attribution", "max_digit") if len(set(p.demo_labels)) < 5)
    x = p.demo_labels[0]
    absent = sorted(set(p.label_space) - set(p.demo_labels) - {p.answer})
    pool = [pair for q in probes["no-gold"].split("attribution", "max_digit") for pair in q.demos]
    s = label_swap(p, x, absent[0], pool, tok, random.Random(0))
    check_swap(tok, s)
    assert s.x == x and s.z == absent[0] and s.replaced == tuple(i for i, y in enumerate(p.demo_labels) if y == x)
    (t,), _ = label_swaps([p], tok, choose_x=lambda q: q.demo_labels[0], candidates={"max_digit": pool})
    assert t.x == x
    with pytest.raises(ValueError, match="must be a demo label other than the gold"):
        label_swap(p, p.answer, absent[0], pool, tok, random.Random(0))
    with pytest.raises(ValueError, match="must be absent from the demos"):
        label_swap(p, x, p.demo_labels[-1], pool, tok, random.Random(0))
    with pytest.raises(ValueError, match="no '.*' demo of the token length"):
        label_swap(p, x, absent[0], [], tok, random.Random(0))
    s2 = label_swap(p, x, absent[0], pool, tok, random.Random(0))
    assert s2 == s and type(s).from_json(json.loads(json.dumps(s.to_json()))) == s


def test_label_swap_target_by_hand(tok, probes):
    import torch

    swaps, _ = label_swaps(probes["no-gold"].dev[:5], tok)
    logits = torch.randn(len(swaps), len(tok))
    want = [float(logits[i, s.x_id] - logits[i, s.gold_id]) for i, s in enumerate(swaps)]
    assert label_swap_target(logits, swaps).tolist() == pytest.approx(want)


# ---------------------------------------------------------------- the zoo tokenizers


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma-3-270m"])
def test_zoo_tokenizers(model):
    """On both zoo tokenizers every construction builds the default splits with nothing dropped, every
    answer and demo label one token; every copy-control prompt has an aligned label swap, and a no-gold
    prompt lacks one only where its demos show every wrong label."""
    from transformers import AutoTokenizer

    from mechcopy.models import zoo

    tok = AutoTokenizer.from_pretrained(zoo.fetch(model))
    for c in CONSTRUCTIONS:
        probe = build_copy_probe(tok, CopyProbeConfig(construction=c))
        assert not probe.dropped, probe.dropped[:3]
        for p in probe.attribution + probe.dev + probe.test:
            assert len(p.answer_ids) == 1 and tok.decode(p.answer_ids).strip() == p.answer
            assert all(len(ids) == 1 for ids in p.demo_label_ids)
        if c != "standard":
            swaps, dropped = label_swaps(probe.attribution, tok)
            if c == "copy-control":  # a label is always absent
                assert not dropped, dropped[:5]
            assert all("no absent label" in d for d in dropped), dropped[:5]
            assert {s.clean.task for s in swaps} == set(probe.config.tasks)
            for s in swaps:
                check_swap(tok, s)


def test_small_splits_build(tok):
    """Below shots x labels prompts per split, every construction still finds its demos (at least `shots`
    items per label are drawn) and the gold labels stay close to uniform."""
    for c in CONSTRUCTIONS:
        probe = build_copy_probe(tok, CopyProbeConfig(construction=c, n_attr=5, n_dev=2, n_test=1))
        assert [len(probe.split(s, t)) for t in PROBE_TASKS for s in SPLITS] == [5, 2, 1] * len(PROBE_TASKS)
        for t in PROBE_TASKS:
            assert max(Counter(p.answer for p in probe.split("attribution", t)).values()) <= 3
