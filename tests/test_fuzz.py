"""Hostile inputs, generated: task files, neuron files, configs and command-line flags (issue 28).

The property, for every generated input: it is accepted, or refused with one of the project's own
errors (`mechcopy.errors.own_error`: a ValueError, TypeError, IndexError, FileNotFoundError or
UnknownName raised by mechcopy's own code, the innermost frame of its traceback in a mechcopy module)
whose message names the input at fault: the file, the field or flag, or the task; or an operating
system error on a path it names (a file name too long), which `main` prints as one line with the
path. Nothing else may escape: no RecursionError, KeyError, AttributeError, OverflowError, no error raised inside torch,
numpy, json or argparse's callers, and on the command line no "internal error" or "unexpected" line.
No real model is loaded: commands stop where the model would load (`ModelReached`).

Each test runs `MECHCOPY_FUZZ_EXAMPLES` inputs (default 30, so the suite stays quick); the long run
of the issue's closing note is `MECHCOPY_FUZZ_EXAMPLES=1000 pytest tests/test_fuzz.py` (under the
CPU lock), which prints the number of inputs each test ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("MECHCOPY_FUZZ_EXAMPLES", "30"))
# the refusals users get: annotations unchecked at run time, as outside the tests (conftest.annotations_unchecked)
pytestmark = pytest.mark.usefixtures("annotations_unchecked")

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES < 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
COUNTS: dict[str, int] = {}


class ModelReached(BaseException):
    """The command got as far as loading its model (or training): every check before it passed."""


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\ngenerated inputs per test:", ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


def assert_own(e: BaseException, *names) -> None:
    """`e` is the project's own error and its message names one of `names` (the input at fault). (A
    message may hold a newline where the input does: the command line prints it as one line.)"""
    from mechcopy.errors import own_error

    text = str(e)
    if isinstance(e, OSError) and e.errno is not None and e.filename is not None:
        text = str(e.filename)   # the system's own error on a path (a name too long): `main` prints it with the path
    else:
        assert own_error(e), f"not the project's own error: {type(e).__name__}: {text}"
    named = [str(n) for n in names if n is not None and str(n).strip()]
    assert any(n in text for n in named), f"{type(e).__name__}: {text!r} names none of {named}"


# ------------------------------------------------------------------------------------------- strategies

HOSTILE_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "a\nb", "pooled", "all", "copy_probe", "antonyms", "\u00e9\u00e8", "\x00", "-1",
                     "nan", "1e999", "a,b", "../x", "\ufeff", "\U0001f600"]),
)
NUMBERS = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, 1, 2, -1, 2**63 - 1, 2**63, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, HOSTILE_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(HOSTILE_TEXT, inner, max_size=4)), max_leaves=12)
FILE_NAMES = st.text(alphabet=string.ascii_letters + string.digits + ",. -_\u00e9", min_size=1, max_size=12).filter(
    lambda s: s.strip(" .") and s not in (".", ".."))


@st.composite
def task_objects(draw):
    """A task file's object: half of them valid, the others with hostile parts."""
    words = draw(st.lists(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=4), min_size=2, max_size=14,
                          unique=True))
    obj = {"name": draw(st.text(alphabet=string.ascii_lowercase + "_ ,", min_size=1, max_size=8)),
           "pairs": [[w, w.upper()] for w in words]}
    if draw(st.booleans()):
        return obj
    pair = st.one_of(st.tuples(HOSTILE_TEXT, HOSTILE_TEXT).map(list), st.lists(JSON_SCALARS, max_size=3),
                     JSON_SCALARS)
    if draw(st.booleans()):
        obj["name"] = draw(st.one_of(HOSTILE_TEXT, JSON_SCALARS))
    if draw(st.booleans()):
        obj["pairs"] = draw(st.one_of(st.lists(pair, max_size=6), JSON_SCALARS,
                                      st.just(obj["pairs"] + draw(st.lists(pair, max_size=2)))))
    if draw(st.booleans()):
        obj["kind"] = draw(st.one_of(st.sampled_from(["user", "probe", "linguistic", "nope"]), JSON_SCALARS))
    if draw(st.booleans()):
        obj.update(draw(st.dictionaries(HOSTILE_TEXT, JSON_VALUES, max_size=2)))
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=1)):
        del obj[key]
    return obj


@st.composite
def task_texts(draw):
    """The text of a task file: its JSON, or that JSON made hostile (duplicate keys, deep nesting, torn,
    not UTF-8, a byte-order mark, NaN constants), or any JSON value."""
    obj = draw(task_objects())
    text = json.dumps(obj, allow_nan=True)
    how = draw(st.sampled_from(["plain"] * 6 + ["duplicate", "deep", "torn", "bytes", "bom", "value", "empty"]))
    if how == "duplicate" and obj:
        key = draw(st.sampled_from(sorted(obj)))
        text = text[:-1] + ("," if len(obj) else "") + json.dumps(key) + ": " + json.dumps(obj[key]) + "}"
    elif how == "deep":
        depth = draw(st.sampled_from([50, 900, 5_000, 100_000]))
        text = draw(st.sampled_from(["[", '{"a":'])) * depth
    elif how == "torn":
        text = text[:draw(st.integers(0, max(0, len(text) - 1)))]
    elif how == "bytes":
        return draw(st.binary(max_size=40))
    elif how == "bom":
        text = "\ufeff" + text
    elif how == "value":
        text = json.dumps(draw(JSON_VALUES), allow_nan=True)
    elif how == "empty":
        text = ""
    return text


# ------------------------------------------------------------------------------------------- task files


@FUZZ
@given(name=FILE_NAMES, content=task_texts(), shots=NUMBERS, n=NUMBERS, seed=NUMBERS, as_list=st.booleans())
def test_hostile_task_files(tmp_path_factory, name, content, shots, n, seed, as_list):
    """A generated task file, loaded as the command line loads it (a comma list) or as a list, then
    checked against shots and built into prompts: own errors only, naming the file, task or argument."""
    from mechcopy.models.tiny import char_tokenizer
    from mechcopy.tasks import check_shots, load_tasks
    from mechcopy.tasks.prompts import build_prompts

    _count("task files")
    folder = tmp_path_factory.mktemp("tasks")
    path = folder / (name if name.endswith(".json") else name + ".json")
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        tasks = load_tasks([str(path)] if as_list else str(path))
    except Exception as e:  # noqa: BLE001
        assert_own(e, path, path.name, *str(path).split(","))
        return
    _count("task files loaded")
    task = tasks[0]
    try:
        check_shots(tasks, shots)
    except Exception as e:  # noqa: BLE001
        assert_own(e, "shots", task.name)
    try:
        build_prompts(task, char_tokenizer(), shots, n, seed)
    except Exception as e:  # noqa: BLE001
        assert_own(e, "shots", "n", "seed", task.name)


# ------------------------------------------------------------------------------------------- neuron files


@st.composite
def neuron_objects(draw):
    from test_hostile import _fingerprint

    fp = _fingerprint()
    model = dict(fp)
    for key in draw(st.lists(st.sampled_from(sorted(fp)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del model[key]
        else:
            model[key] = draw(JSON_SCALARS)
    index = st.one_of(st.integers(-3, 70), NUMBERS, JSON_SCALARS)
    neurons = draw(st.one_of(st.lists(st.tuples(index, index).map(list), max_size=5),
                             st.lists(st.lists(index, max_size=3), max_size=3), JSON_VALUES))
    meta = draw(st.one_of(st.just({}), st.fixed_dictionaries({}, optional={
        "k": st.one_of(st.just(0), NUMBERS), "why": HOSTILE_TEXT,
        "scores_path": st.one_of(HOSTILE_TEXT, st.just("/dev/null"), st.just("x.scores.safetensors"))}), JSON_VALUES))
    obj = {"model": draw(st.one_of(st.just(model), JSON_VALUES)), "neurons": neurons, "meta": meta}
    for key in draw(st.lists(st.sampled_from(["model", "neurons", "meta"]), max_size=1)):
        del obj[key]
    return obj


@FUZZ
@given(obj=neuron_objects())
def test_hostile_neuron_files(tmp_path_factory, tiny, obj):
    """A generated neuron file (valid JSON), loaded, checked against the tiny model it names and made
    into pruning hooks: own errors only, naming the file or the neuron."""
    from mechcopy.neurons import NeuronSet
    from mechcopy.pruning import pruning_hooks

    _count("neuron files")
    path = tmp_path_factory.mktemp("neurons") / "n.json"
    path.write_text(json.dumps(obj, allow_nan=True))
    try:
        ns = NeuronSet.load(path)
        ns.check(tiny)
        pruning_hooks(tiny, ns)
    except Exception as e:  # noqa: BLE001
        assert_own(e, path, "neuron")


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")   # the 100 kB inputs' repr
@FUZZ
@given(text=st.one_of(st.sampled_from(["[" * 100_000, '{"model":' * 5_000]), st.binary(max_size=30).map(
    lambda b: b.decode("latin-1"))))
def test_hostile_neuron_file_text(tmp_path_factory, text):
    """Neuron files that are not JSON objects: deep nesting must be one line too (a RecursionError on main)."""
    from mechcopy.neurons import NeuronSet

    _count("neuron file texts")
    path = tmp_path_factory.mktemp("neurons") / "n.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        NeuronSet.load(path)
    except Exception as e:  # noqa: BLE001
        assert_own(e, path)


# ------------------------------------------------------------------------------------------- what find and evaluate read back


@st.composite
def score_files(draw):
    """The bytes of a copy-score file: safetensors holding hostile tensors and headers, or any bytes."""
    import safetensors.torch

    from test_hostile import _fingerprint

    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=64))
    shape = draw(st.sampled_from([(2, 64), (2, 64), (2, 4), (3, 64), (64,), (0, 64), (2, 64, 1)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64, torch.bool]))
    values = torch.rand(shape).to(dtype) if dtype != torch.bool else torch.ones(shape, dtype=torch.bool)
    if dtype.is_floating_point and values.numel() and draw(st.booleans()):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38]))
    meta = draw(st.one_of(st.fixed_dictionaries({"model": st.just(_fingerprint())}, optional={
        "kind": st.one_of(st.sampled_from(["neuron", "head", "nope"]), JSON_SCALARS),
        "allowed_layers": st.one_of(st.none(), st.lists(st.one_of(st.integers(-2, 4), JSON_SCALARS), max_size=3)),
        "run": HOSTILE_TEXT}), JSON_VALUES))
    header = {"mechcopy": json.dumps(meta, allow_nan=True)} if draw(st.integers(0, 6)) else {}
    name = draw(st.sampled_from(["scores", "scores", "values"]))
    return safetensors.torch.save({name: values.contiguous()}, metadata=header)


@FUZZ
@given(data=score_files(), k=st.one_of(st.integers(-2, 200), NUMBERS))
def test_hostile_copy_score_files(tmp_path_factory, data, k):
    """A generated copy-score file, read as the bottom baseline reads it (beside a neuron file, checked
    against the file's fingerprint), then selected from: own errors only, naming the file or k."""
    from test_hostile import _fingerprint

    from mechcopy.attribution import CopyScores
    from mechcopy.components import Components
    from mechcopy.conditions import find_scores
    from mechcopy.selection import bottom_set, select

    _count("copy-score files")
    folder = tmp_path_factory.mktemp("scores")
    (folder / "n.scores.safetensors").write_bytes(data)
    neurons = Components(((0, 1),), _fingerprint(), {"scores_path": str(folder / "n.scores.safetensors")},
                         folder / "n.json")
    try:
        scores = find_scores(neurons)
    except Exception as e:  # noqa: BLE001
        assert_own(e, "n.scores.safetensors")
        return
    assert isinstance(scores, CopyScores) and bool(torch.isfinite(scores.scores).all())
    _count("copy-score files read")
    for pick in (lambda: select(scores, "global", k=k), lambda: bottom_set(scores, k)):
        try:
            pick()
        except Exception as e:  # noqa: BLE001
            assert_own(e, "k", "top-k", "bottom-k")


@st.composite
def journal_texts(draw, keys):
    """A journal: lines of this run (right or edited digests, null or odd rows), of other settings,
    cut short, or not JSON at all."""
    from mechcopy.suite import _digest

    lines = []
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.one_of(st.sampled_from(keys), HOSTILE_TEXT, JSON_SCALARS))
        row = draw(st.one_of(st.just({"accuracy": 0.5, "correct": [True, False]}), JSON_VALUES))
        digest = _digest(key, row) if isinstance(key, str) and draw(st.booleans()) else draw(HOSTILE_TEXT)
        entry = draw(st.one_of(st.just({"key": key, "row": row, "digest": digest}), JSON_VALUES))
        line = json.dumps(entry, allow_nan=True)
        how = draw(st.sampled_from(["plain"] * 4 + ["torn", "garbage", "empty"]))
        lines.append(line[:len(line) // 2] if how == "torn" else draw(HOSTILE_TEXT) if how == "garbage" else
                     "" if how == "empty" else line)
    return "\n".join(lines)


JOURNAL_KEYS = {("t", "unpruned"): "k" * 24, ("t", "pruned"): "p" * 24}


@FUZZ
@given(text=journal_texts(list(JOURNAL_KEYS.values())))
def test_hostile_journals(tmp_path_factory, text):
    """A generated evaluation journal never stops a run: the rows it returns are this run's, untouched
    since they were written (their digest holds), and every other line is said or kept."""
    from mechcopy.suite import ResultRow, _digest, read_journal

    _count("journals")
    path = tmp_path_factory.mktemp("journal") / "r.partial.jsonl"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.redirect_stderr(io.StringIO()):
        rows = read_journal(path, JOURNAL_KEYS)
    assert set(rows) <= set(JOURNAL_KEYS.values())
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    for key, row in rows.items():
        assert isinstance(row, ResultRow) and any(e.get("key") == key and e.get("digest") == _digest(key, e["row"])
                                                  and ResultRow.from_json(e["row"]) == row for e in kept)


@FUZZ
@given(data=st.one_of(st.binary(max_size=64), score_files()), n=st.integers(1, 4))
def test_hostile_find_checkpoints(tmp_path_factory, tiny, data, n):
    """Whatever lies where find keeps its checkpoint, find starts over (and says so) or resumes; it never
    stops on it."""
    from mechcopy.find import FindConfig, load_checkpoint

    _count("find checkpoints")
    path = tmp_path_factory.mktemp("checkpoint") / "n.partial.safetensors"
    path.write_bytes(data)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        done = load_checkpoint(path, {"format": 2, "steps": 2}, n)
    assert done is None and "n.partial.safetensors" in err.getvalue()


# ------------------------------------------------------------------------------------------- configs


def _field_values(hint: str):
    """Values for a config field of type `hint` (as written in the class): right-typed but hostile,
    and now and then any JSON value."""
    if "tuple" in hint:
        typed = st.one_of(st.none(), st.lists(NUMBERS, max_size=4).map(tuple), st.lists(HOSTILE_TEXT, max_size=2))
    elif "dict" in hint:
        typed = st.dictionaries(st.sampled_from(["n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_state",
                                                 "d_conv", "expand", "gated", "nope"]), NUMBERS, max_size=3)
    elif "str" in hint:
        typed = st.one_of(HOSTILE_TEXT, st.sampled_from(["/dev/null", ".", "missing.txt"]))
    else:
        typed = NUMBERS
    return st.one_of(typed, typed, typed, JSON_VALUES)


def _configs():
    from mechcopy.find import FindConfig
    from mechcopy.organisms.train import TrainConfig
    from mechcopy.reproduce import ReproduceConfig
    from mechcopy.task_vectors import TaskVectorConfig
    from mechcopy.tasks.probe import ProbeConfig

    return [FindConfig, ReproduceConfig, TaskVectorConfig, TrainConfig, ProbeConfig]


@st.composite
def config_kwargs(draw, cls):
    from dataclasses import fields

    chosen = draw(st.lists(st.sampled_from([f for f in fields(cls)]), min_size=1, max_size=3, unique_by=lambda f: f.name))
    return {f.name: draw(_field_values(str(f.type))) for f in chosen}


@pytest.mark.parametrize("cls", _configs(), ids=lambda c: c.__name__)
def test_hostile_configs(cls):
    """A config built from generated field values: accepted, or an own error naming one of the fields given."""

    @FUZZ
    @given(kwargs=config_kwargs(cls))
    def check(kwargs):
        _count(f"{cls.__name__}")
        try:
            cls(**kwargs)
        except Exception as e:  # noqa: BLE001
            assert_own(e, *kwargs, *(k.replace("_", " ") for k in kwargs), "text file")

    check()


def test_find_config_wrong_types():
    from mechcopy.find import FindConfig

    with pytest.raises((TypeError, ValueError)) as info:
        FindConfig(ks=5)
    assert_own(info.value, "ks")


# ------------------------------------------------------------------------------------------- the command line


def _parsers():
    from mechcopy.commands import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    return {name: p for name, p in sub.items() if name != "models"}   # `models fetch` would download


FLAG_VALUES = st.one_of(
    NUMBERS.map(lambda v: repr(v) if isinstance(v, float) else str(v)),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-0", "0x10", "1_000", "", " ", "5,0", "1,,2", "2.5",
                     "all", "t.json", "a,b.json", "pooled.json", "deep.json", "dupkeys.json", "T.json", "missing.json",
                     "N.json", "neg.json", "/dev/null", "folder", "fold.json", "one_word.txt", "listcfg", "to_upper",
                     "antonyms,antonyms", "copy_probe", "o.json", "r.partial.jsonl", "N.scores.safetensors",
                     "{pkg}/tasks/data/new.json", "new/sub/o.json", "t.json/x.json", "{\"d_model\": 0}",
                     "{\"n_heads\": 5, \"d_model\": 96}", "[]", "{}", "cpu", "cuda", "tpu", "bfloat16"]),
    HOSTILE_TEXT,
)


#: values that pass a flag's own checks (the rest of the inputs then get to the later checks)
VALID = {"tasks": ["to_upper", "t.json", "to_upper,t.json", "a,b.json"], "task": ["to_upper", "t.json"],
         "other_task": ["antonyms", "t.json"], "prune": ["N.json", "k0.json"], "neurons": ["N.json", "k0.json"],
         "out": ["o.json", "new/o2.json", "run"], "model": ["tiny", "smollm2-135m"], "text": ["text.txt"],
         "model_kwargs": ['{"d_model": 32, "n_heads": 2}', "{}"], "ks": ["2,4"], "layers": ["0,1"],
         "seed": ["0", "1"], "threads": ["1"], "device": ["cpu"], "lr": ["0.001"], "max_minutes": ["1"]}


@st.composite
def argvs(draw):
    parsers = _parsers()
    command = draw(st.sampled_from(sorted(parsers)))
    options = [a for a in parsers[command]._actions if a.option_strings and a.dest not in ("help", "debug")]
    argv = [command]
    chosen = draw(st.lists(st.sampled_from(options), max_size=5, unique_by=lambda a: a.dest))
    if draw(st.integers(0, 3)):      # mostly with the required flags, so that the later checks are reached
        chosen += [a for a in options if a.required and a not in chosen]
    for action in chosen:
        flag = action.option_strings[0]
        if action.nargs == 0:                       # --force, --no-gold-in-demos, ...
            argv.append(draw(st.sampled_from(action.option_strings)))
        else:
            valid = st.sampled_from(list(action.choices) if action.choices else VALID.get(action.dest, ["2"]))
            argv.append(f"{flag}={draw(FLAG_VALUES if draw(st.integers(0, 5)) == 0 else valid)}")
    return argv


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    from test_hostile import make_more

    folder = tmp_path_factory.mktemp("cli")
    make_more(folder)
    return folder


@FUZZ
@given(argv=argvs())
def test_hostile_command_lines(argv, cli_folder, monkeypatch, tiny):
    """A generated command line stops where its model would load, or is refused with one line; with
    --debug, the error is the project's own and names a flag or the input given."""
    import mechcopy.commands.train_organism
    import mechcopy.models
    import mechcopy.organisms.train
    from mechcopy.commands import main
    from mechcopy.models import zoo

    _count("command lines")
    pkg = str(Path(__import__("mechcopy").__file__).resolve().parent)
    argv = [a.replace("{pkg}", pkg) for a in argv]

    def stop(*a, **k):
        raise ModelReached

    monkeypatch.setattr(mechcopy.models, "load_model", stop)
    monkeypatch.setattr(mechcopy.organisms.train, "train_organism", stop)
    monkeypatch.setattr(mechcopy.commands.train_organism, "train_organism", stop)   # imported by name there
    monkeypatch.setenv(zoo.CACHE_ENV, str(cli_folder / "cache"))
    monkeypatch.chdir(cli_folder)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except ModelReached:
            _count("command lines reaching the model")
            return
    text = err.getvalue()
    assert code in (0, 2), (argv, code, text)
    _count(f"command lines refused" if code == 2 else "command lines run")
    if os.environ.get("MECHCOPY_FUZZ_SHOW"):
        print(argv, text.strip()[-150:])
    if code == 2:
        line = text.strip().splitlines()[-1]
        assert len(text.strip().splitlines()) == 1 and "internal error" not in line and "unexpected" not in line, \
            (argv, text)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv + ["--debug"])
            except ModelReached:
                raise AssertionError(f"{argv}: refused without --debug, ran with it")
            except Exception as e:  # noqa: BLE001
                given = [a.split("=", 1)[1] for a in argv[1:] if "=" in a]
                flags = [a.split("=", 1)[0] for a in argv[1:]]
                assert_own(e, *given, *flags, *(f.lstrip("-").replace("-", "_") for f in flags), "task", "--")
