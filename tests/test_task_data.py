"""The built-in task data: well formed, no duplicates, algorithmic tasks recomputed, counting generator checked,
sentiment labels balanced, the closed-label tasks' label sets and counts, the balanced probe's item pool checked."""

import json
import string
from pathlib import Path

import pytest

import mechcopy

DATA = Path(mechcopy.__file__).parent / "tasks" / "data"
KINDS = {"algorithmic", "linguistic", "translation", "knowledge", "sentiment"}
EXPECTED = {
    "next_letter": "algorithmic", "prev_letter": "algorithmic", "list_first": "algorithmic",
    "list_last": "algorithmic", "to_upper": "algorithmic", "to_lower": "algorithmic",
    "antonyms": "linguistic", "present_past": "linguistic", "present_gerund": "linguistic",
    "plural_singular": "linguistic",
    "en_fr": "translation", "fr_en": "translation", "en_es": "translation", "es_en": "translation",
    "country_capital": "knowledge", "person_language": "knowledge", "location_continent": "knowledge",
    "location_religion": "knowledge",
    "sentiment_binary": "sentiment", "sentiment_five": "sentiment",
    "animal_class": "knowledge", "word_language": "linguistic", "chemical_state": "knowledge",
    "food_group": "knowledge", "object_color": "knowledge",
}
FILES = sorted(f for f in DATA.glob("*.json") if f.stem != "probe_items")  # the probe's item pool is no task
#: the closed-label tasks written for the copy-mechanism study: (labels, fewest pairs, fewest pairs per label)
CLOSED_LABEL = {
    "animal_class": (("mammal", "bird", "fish", "reptile", "insect"), 120, 15),
    "word_language": (("English", "French", "Spanish", "German", "Italian"), 125, 25),
    "chemical_state": (("solid", "liquid", "gas"), 100, 20),
    "food_group": (("fruit", "vegetable", "meat", "dairy", "grain"), 110, 15),
    "object_color": (("red", "yellow", "green", "white", "black", "orange", "brown", "blue"), 100, 8),
}
#: the only inputs of those tasks that are not lower case
PROPER_NOUNS = {"Komodo dragon", "Gila monster", "Mars", "Neptune", "Uranus"}
SENTIMENT_LABELS = {"sentiment_binary": ("positive", "negative"),
                    "sentiment_five": ("terrible", "bad", "okay", "good", "great")}


def _load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


def _pairs(name: str) -> list[tuple[str, str]]:
    return [tuple(p) for p in _load(name)["pairs"]]


def test_every_expected_task_has_a_file():
    assert {f.stem for f in FILES} >= set(EXPECTED), sorted(set(EXPECTED) - {f.stem for f in FILES})


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_file_well_formed(path):
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert set(doc) == {"name", "kind", "description", "pairs"}
    assert doc["name"] == path.stem
    assert doc["kind"] in KINDS
    assert EXPECTED.get(doc["name"], doc["kind"]) == doc["kind"]
    assert isinstance(doc["description"], str) and doc["description"].strip()
    pairs = doc["pairs"]
    # at least 100 pairs, or the description states the honest smaller count
    assert len(pairs) >= 100 or f"{len(pairs)} pairs" in doc["description"], (len(pairs), doc["description"])
    inputs = [p[0] for p in pairs]
    assert len(set(inputs)) == len(inputs), [x for x in set(inputs) if inputs.count(x) > 1]
    for p in pairs:
        assert isinstance(p, list) and len(p) == 2, p
        for s in p:
            assert isinstance(s, str) and s, p
            assert s == s.strip(), f"leading/trailing space in {p}"
            assert "\n" not in s and "\r" not in s and "->" not in s, p


def test_letters():
    for name, step in (("next_letter", 1), ("prev_letter", -1)):
        pairs = _pairs(name)
        assert len(pairs) == 50
        for x, y in pairs:
            assert len(x) == 1 and x in string.ascii_letters and y == chr(ord(x) + step)
            assert y.isalpha() and y.islower() == x.islower()


def test_lists_and_case():
    for name, pick in (("list_first", 0), ("list_last", -1)):
        for x, y in _pairs(name):
            items = x.split(", ")
            assert 3 <= len(items) <= 5 and len(set(items)) == len(items), x
            assert all(i.isalpha() and i.islower() for i in items), x
            assert y == items[pick]
    for x, y in _pairs("to_upper"):
        assert x.isalpha() and x.islower() and y == x.upper()
    for x, y in _pairs("to_lower"):
        assert x.isalpha() and x.isupper() and y == x.lower()


def test_gerunds_end_in_ing_and_plurals_differ():
    for x, y in _pairs("present_gerund"):
        assert y.endswith("ing") and y[0] == x[0], (x, y)
    for x, y in _pairs("plural_singular"):
        assert x != y, (x, y)


def test_translation_directions_agree():
    for a, b in (("en_fr", "fr_en"), ("en_es", "es_en")):
        forward = dict(_pairs(a))
        for x, y in _pairs(b):  # x foreign, y English
            if y in forward:
                assert forward[y] == x, (a, y, forward[y], x)


def test_knowledge_labels_come_from_small_sets():
    continents = {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    assert {y for _, y in _pairs("location_continent")} <= continents
    religions = {y for _, y in _pairs("location_religion")}
    assert religions <= {"Islam", "Christianity", "Hinduism", "Buddhism", "Judaism", "Sikhism", "Shinto",
                         "Jainism", "Taoism", "Zoroastrianism"}, religions
    assert len({y for _, y in _pairs("country_capital")}) == len(_pairs("country_capital"))


def test_object_counting():
    from mechcopy.tasks.generators import GENERATORS, OBJECTS, object_counting

    assert GENERATORS["object_counting"] is object_counting
    task = object_counting(n=200, seed=0)
    assert task.name == "object_counting" and task.kind == "counting" and len(task.pairs) == 200
    inputs = [x for x, _ in task.pairs]
    assert len(set(inputs)) == len(inputs)
    for x, y in task.pairs:
        items = x.split(", ")
        assert y == str(len(items)) and all(i in OBJECTS for i in items)
        assert 1 <= len(items) <= 9
    assert {y for _, y in task.pairs} == {str(c) for c in range(1, 10)}
    assert object_counting(n=200, seed=0) == task
    assert object_counting(n=200, seed=1).pairs != task.pairs
    small = object_counting(n=50, seed=3, max_count=4, min_count=2)
    assert {y for _, y in small.pairs} <= {"2", "3", "4"}
    with pytest.raises(ValueError, match="max_count"):
        object_counting(max_count=10)


def test_every_file_loads_through_the_loader():
    from mechcopy.tasks import list_tasks, load_task
    from mechcopy.tasks.generators import object_counting

    names = set(list_tasks())
    assert set(EXPECTED) | {"object_counting"} <= names
    for f in FILES:
        task = load_task(f.stem)
        assert task.kind == EXPECTED.get(f.stem, task.kind) and task.pairs == tuple(_pairs(f.stem))
    assert load_task("object_counting") == object_counting()


def test_sentiment_labels_balanced_and_inputs_distinct():
    inputs = {}
    for name, labels in SENTIMENT_LABELS.items():
        pairs = _pairs(name)
        counts = {label: sum(y == label for _, y in pairs) for label in labels}
        assert set(y for _, y in pairs) == set(labels), name
        assert max(counts.values()) == min(counts.values()), counts
        lowered = [x.lower() for x, _ in pairs]
        assert len(set(lowered)) == len(lowered), name
        inputs[name] = set(lowered)
    assert len(_pairs("sentiment_binary")) == 246 and len(_pairs("sentiment_five")) == 260
    assert not inputs["sentiment_binary"] & inputs["sentiment_five"]


def test_closed_label_tasks():
    """Every label used, often enough; at most 12 labels (closed-label); inputs lower case unless proper nouns,
    none containing its own label, and no input in two of these tasks (case-insensitive)."""
    owner = {}
    for name, (labels, min_pairs, min_per_label) in CLOSED_LABEL.items():
        pairs = _pairs(name)
        counts = {label: sum(y == label for _, y in pairs) for label in labels}
        assert {y for _, y in pairs} == set(labels) and 3 <= len(labels) <= 12, name
        assert len(pairs) >= min_pairs and min(counts.values()) >= min_per_label, (name, len(pairs), counts)
        assert f"{len(pairs)} pairs" in _load(name)["description"], name
        for x, y in pairs:
            assert x == x.lower() or x in PROPER_NOUNS, (name, x)
            assert y.lower() not in x.lower(), (name, x, y)
            assert owner.setdefault(x.lower(), name) == name, f"{x!r} is in {owner[x.lower()]} and {name}"


def test_word_language_agrees_with_the_translation_tasks():
    """A word the translation tasks give as English, French or Spanish is not labelled another language."""
    words = {
        "English": {x for n in ("en_fr", "en_es") for x, _ in _pairs(n)} | {y for n in ("fr_en", "es_en") for _, y in _pairs(n)},
        "French": {y for _, y in _pairs("en_fr")} | {x for x, _ in _pairs("fr_en")},
        "Spanish": {y for _, y in _pairs("en_es")} | {x for x, _ in _pairs("es_en")},
    }
    assert words["French"] & words["Spanish"]  # the check can fail: e.g. both give "dormir"
    for x, y in _pairs("word_language"):
        assert not [lang for lang, known in words.items() if lang != y and x in known], (x, y)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma-3-270m"])
def test_closed_label_tasks_make_exact_prompts(model):
    """On both zoo tokenizers every pair of the closed-label tasks is usable, and 100 prompts are built with and
    without the query's label among the demos; every answer is one token that decodes to the label."""
    from transformers import AutoTokenizer

    from mechcopy.models import zoo
    from mechcopy.tasks import load_task
    from mechcopy.tasks.prompts import build_prompts

    tok = AutoTokenizer.from_pretrained(zoo.fetch(model))
    for name in CLOSED_LABEL:
        task = load_task(name)
        for gold_in_demos in (True, False):
            ps = build_prompts(task, tok, shots=4, n=100, seed=0, gold_in_demos=gold_in_demos)
            assert len(ps) == 100 and not ps.dropped, (name, gold_in_demos, ps.dropped[:3])
            for p in ps.prompts:
                assert len(p.answer_ids) == 1 and tok.decode(p.answer_ids).strip() == p.answer
                assert gold_in_demos or p.answer not in p.demo_labels


def test_probe_items_pool():
    from mechcopy.tasks import list_tasks
    from mechcopy.tasks.probe import load_items, vowel_count

    doc = json.loads((DATA / "probe_items.json").read_text(encoding="utf-8"))
    assert set(doc) == {"places", "people", "words"}
    owner = {}
    for key, items in doc.items():
        assert len(set(items)) == len(items), key
        for x in items:
            assert x == x.strip() and all(ch.isascii() and (ch.isalpha() or ch == " ") for ch in x), x
            assert owner.setdefault(x.lower(), key) == key, f"{x!r} is in {owner[x.lower()]} and {key}"
    mixed = load_items("mixed")
    assert len(mixed) == sum(map(len, doc.values()))
    per_count = {c: sum(vowel_count(x) == c for x in mixed) for c in range(1, 7)}
    assert min(per_count.values()) >= 110, per_count
    assert vowel_count("New York") == 2 and vowel_count("Lyon") == 1 and vowel_count("AEIOUy") == 5
    assert "probe_items" not in list_tasks()
