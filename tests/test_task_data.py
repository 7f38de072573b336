"""The built-in task data: well formed, no duplicates, algorithmic tasks recomputed, counting generator checked,
sentiment labels balanced, the balanced probe's item pool checked."""

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
}
FILES = sorted(f for f in DATA.glob("*.json") if f.stem != "probe_items")  # the probe's item pool is no task
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
