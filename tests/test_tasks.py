"""Tasks, user task files, token-exact prompt building and the copy probe (character tokenizer)."""

import json

import pytest

from mechcopy.models.tiny import char_tokenizer
from mechcopy.tasks import PROBE_NAME, Task, list_tasks, load_task, load_tasks, validate_task_json
from mechcopy.tasks.probe import WORDS, probe_prompts, probe_splits, vowel_count
from mechcopy.tasks.prompts import build_prompts, encode, make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def ids(tok, s):
    return tuple(tok(s, add_special_tokens=False)["input_ids"])


def test_builtin_tasks_load(tok):
    names = list_tasks()
    assert PROBE_NAME in names and "object_counting" in names
    for name in names:
        task = load_task(name)
        assert task.name == name and len(task) >= 5, name
        validate_task_json(task.to_json(), source=name)  # built-in data pass the user-file checks
    assert [t.name for t in load_tasks("all")] == names
    assert [t.name for t in load_tasks(" copy_probe , object_counting")] == [PROBE_NAME, "object_counting"]
    with pytest.raises(KeyError, match="unknown task 'nope'.*copy_probe"):
        load_task("nope")


def test_user_task_file(tmp_path):
    path = tmp_path / "capitals.json"
    path.write_text(json.dumps({"name": "caps", "pairs": [["France", "Paris"], ["Peru", "Lima"]]}))
    (task,) = load_tasks(str(path))
    assert task == Task("caps", (("France", "Paris"), ("Peru", "Lima")), "user")


@pytest.mark.parametrize("obj, message", [
    ([["a", "b"]], "top level must be a JSON object"),
    ({"pairs": [["a", "b"]]}, 'missing field "name"'),
    ({"name": "", "pairs": [["a", "b"]]}, '"name" must be a non-empty string'),
    ({"name": "t"}, 'missing field "pairs"'),
    ({"name": "t", "pairs": {"a": "b"}}, '"pairs" must be a list'),
    ({"name": "t", "pairs": [["a", "b"], ["c"]]}, r"pairs\[1\] must be a list of 2 strings"),
    ({"name": "t", "pairs": [["a", "b"], "cd"]}, r"pairs\[1\] must be a list of 2 strings"),
    ({"name": "t", "pairs": [["a", "b"], ["c", "d"], ["e", 3]]}, r"pairs\[2\] output must be a string"),
    ({"name": "t", "pairs": [["a", "b"], [" ", "d"]]}, r"pairs\[1\] input is empty"),
    ({"name": "t", "pairs": [["a", "b\nc"]]}, r"pairs\[0\] output contains a newline"),
    ({"name": "t", "pairs": [["a", "b"]], "kind": "magic"}, '"kind" must be one of'),
])
def test_bad_task_files_name_entry_and_field(tmp_path, obj, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=message) as err:
        load_task(str(path))
    assert str(path) in str(err.value)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{name: 1,")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_task(str(path))


def test_make_prompt_exact_tokens(tok):
    # The character tokenizer splits " slow" into " ", "s", ...: the space moves into the prompt.
    p = make_prompt([("hot", "cold"), ("up", "down")], ("fast", "slow"), tok, task="t")
    assert p.text == "hot -> cold\nup -> down\nfast -> "
    assert p.answer_ids == ids(tok, "slow")
    assert p.demo_label_ids == (ids(tok, "cold"), ids(tok, "down"))
    assert p.demo_labels == ("cold", "down") and p.query == "fast" and p.answer == "slow"
    full = encode(tok, p.text) + list(p.answer_ids)
    assert full == encode(tok, "hot -> cold\nup -> down\nfast -> slow")
    # custom template and separator; k = 0
    q = make_prompt([("a", "b")], ("c", "d"), tok, template="Q: {x} A: {y}.", sep=" | ")
    assert q.text == "Q: a A: b. | Q: c A: "
    assert make_prompt([], ("c", "d"), tok).text == "c -> "
    with pytest.raises(ValueError, match="template"):
        make_prompt([], ("c", "d"), tok, template="{y} <- {x}")


def test_prompt_tokens_equal_model_to_tokens(tiny):
    ps = build_prompts(load_task("antonyms"), tiny.tokenizer, shots=4, n=10)
    for p in ps.prompts:
        assert encode(tiny.tokenizer, p.text) == tiny.to_tokens(p.text)[0].tolist()


def test_build_prompts_demos_and_seed(tok):
    task = load_task("antonyms")
    a = build_prompts(task, tok, shots=4, n=30, seed=3)
    assert len(a) == 30 and a.task == "antonyms"
    assert a == build_prompts(task, tok, shots=4, n=30, seed=3)
    assert a.prompts != build_prompts(task, tok, shots=4, n=30, seed=4).prompts
    assert len({p.query for p in a.prompts}) == 30  # distinct queries
    for p in a.prompts:
        assert len(p.demos) == 4 and (p.query, p.answer) not in p.demos
        assert p.query not in {x for x, _ in p.demos}
        assert p.text.startswith("\n".join(f"{x} -> {y}" for x, y in p.demos))
    zero = build_prompts(task, tok, shots=0, n=5)
    assert all(p.text == f"{p.query} -> " and p.demos == () for p in zero.prompts)
    assert len(build_prompts(Task("small", (("a", "b"), ("c", "d"), ("e", "f"))), tok, shots=2, n=100)) == 3
    with pytest.raises(ValueError, match="at least 5"):
        build_prompts(Task("tiny", (("a", "b"), ("c", "d"))), tok, shots=4)


def test_build_prompts_drops_untokenizable_pairs(tok):
    # The character tokenizer knows only ASCII: accented pairs must be dropped and reported.
    pairs = [("cat", "chat"), ("coffee", "café"), ("dog", "chien"), ("tea", "thé"), ("bird", "oiseau"),
             ("milk", "lait"), ("bread", "pain"), ("water", "eau"), ("été", "summer")]
    ps = build_prompts(Task("en_fr_mini", tuple(pairs)), tok, shots=2, n=100, seed=0)
    assert {pair for pair, _ in ps.dropped} == {("coffee", "café"), ("tea", "thé"), ("été", "summer")}
    assert all("does not know" in reason for _, reason in ps.dropped)
    assert len(ps) == 6
    used = {x for p in ps.prompts for x, _ in p.demos} | {p.query for p in ps.prompts}
    assert not used & {"coffee", "tea", "été"}


def test_probe_gold_never_among_demo_labels(tok):
    for seed in range(60):
        ps = probe_prompts(tok, n=25, shots=4, seed=seed)
        assert len(ps) == 25 and not ps.dropped
        for p in ps.prompts:
            assert p.answer not in p.demo_labels
            assert p.answer_ids not in p.demo_label_ids
            assert len(p.answer) == 1 and p.answer.isdigit() and p.answer == str(vowel_count(p.query))
            assert all(y == str(vowel_count(x)) for x, y in p.demos)


def test_probe_splits_disjoint(tok):
    attr, dev = probe_splits(tok, n_attr=100, n_dev=50, seed=0)
    assert len(attr) == 100 and len(dev) == 50
    assert not {p.query for p in attr} & {p.query for p in dev}
    assert len(set(WORDS)) >= 150
    again = probe_splits(tok, n_attr=100, n_dev=50, seed=0)
    assert (attr, dev) == again
