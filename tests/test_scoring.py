"""Label scoring and calibrated readouts: scores equal full-sequence log-probabilities computed
directly with the model, on a tiny transformer and a tiny Mamba, labels of different token lengths,
under pruning hooks and forked conditions; the calibrations equal a hand computation in numpy."""

import json

import numpy as np
import pytest
import torch

from mechcopy.arch import arch_of
from mechcopy.models.tiny import tiny_transformer
from mechcopy.components import Components
from mechcopy.conditions import UNPRUNED, Condition
from mechcopy.fingerprint import model_fingerprint
from mechcopy.pruning import pruning_hooks
from mechcopy.scoring import (CONTENT_FREE, LabelScores, domain_queries, label_ids, score_labels,
                              score_labels_conditions, with_query)
from mechcopy.tasks import MAX_LABELS, Task, validate_task_json
from mechcopy.tasks.prompts import build_prompts, encode

pytestmark = pytest.mark.usefixtures("one_thread")

#: labels of 2, 3 and 5 characters (the character tokenizer: one token each)
LABELS = ("no", "yes", "maybe")
WORDS = ("cat", "moon", "sky", "river", "stone", "apple", "tree", "house", "lamp", "road", "bird", "fish")


def label_task() -> Task:
    return Task("answers", tuple((w, LABELS[i % 3]) for i, w in enumerate(WORDS)))


@pytest.fixture(scope="module", params=["transformer", "mamba"])
def model(request):
    from mechcopy.models.mamba import tiny_mamba

    if request.param == "transformer":
        return tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=2)
    return tiny_mamba(n_layers=3, d_model=32, seed=2)


def direct(model, text: str, label: str, hooks=()) -> float:
    """log p(label | text) from one full-sequence forward pass of text + label (the model's own
    tokens for the text, BOS or not; the character tokenizer makes each label character one token)."""
    tok = model.tokenizer
    prompt = model.to_tokens(text)[0].tolist()
    label_tokens = [tok.convert_tokens_to_ids(c) for c in label]
    tokens = torch.tensor([prompt + label_tokens])
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        logp = torch.log_softmax(model(tokens).float(), -1)[0]
    return float(sum(logp[len(prompt) - 1 + t, x] for t, x in enumerate(label_tokens)))


def test_label_ids_follow_the_prompt(model):
    tok = model.tokenizer
    p = build_prompts(label_task(), tok, shots=3, n=1)[0]
    assert p.text.endswith("-> ")           # the char tokenizer's " " moved into the prompt
    ids = label_ids(tok, p, LABELS)
    assert [len(x) for x in ids] == [2, 3, 5]
    for y, x in zip(LABELS, ids):
        assert encode(tok, p.text + y) == encode(tok, p.text) + list(x)
    assert ids[LABELS.index(p.answer)] == p.answer_ids


def test_scores_equal_full_sequence_log_probs(model):
    prompts = build_prompts(label_task(), model.tokenizer, shots=3, n=8, seed=1).prompts
    assert len({len(p.text) for p in prompts}) > 1              # left padding is exercised
    scores = score_labels(model, prompts, LABELS, batch_size=3)  # several batches and chunks
    want = np.array([[direct(model, p.text, y) for y in LABELS] for p in prompts])
    np.testing.assert_allclose(scores.logprobs, want, atol=1e-4)
    assert scores.predict() == [LABELS[j] for j in want.argmax(1)]


def test_scores_under_pruning_and_one_pass_conditions(model):
    arch, fp = arch_of(model), model_fingerprint(model)
    width = arch.neurons_per_layer(model)
    sets = {"unpruned": None, "late": Components(tuple((2, i) for i in range(0, width, 2)), fp),
            "mid": Components(tuple((l, i) for l in (1, 2) for i in range(1, width, 3)), fp)}
    conditions = [UNPRUNED] + [Condition(name, components=ns) for name, ns in sets.items() if ns is not None]
    prompts = build_prompts(label_task(), model.tokenizer, shots=3, n=6, seed=2).prompts
    one_pass = score_labels_conditions(model, prompts, LABELS, conditions, references={"contextual": CONTENT_FREE},
                                       batch_size=8)
    for name, ns in sets.items():
        hooks = [] if ns is None else pruning_hooks(model, ns)
        want = np.array([[direct(model, p.text, y, hooks) for y in LABELS] for p in prompts])
        np.testing.assert_allclose(one_pass[name].logprobs, want, atol=1e-4, err_msg=name)
        alone = score_labels(model, prompts, LABELS, fwd_hooks=hooks, references={"contextual": CONTENT_FREE})
        np.testing.assert_allclose(one_pass[name].reference["contextual"], alone.reference["contextual"], atol=1e-4)
    assert not np.allclose(one_pass["unpruned"].logprobs, one_pass["late"].logprobs)


def test_reference_queries_share_the_prefix_exactly(model):
    tok = model.tokenizer
    task = label_task()
    prompts = build_prompts(task, tok, shots=3, n=5, seed=3).prompts
    queries = {"contextual": CONTENT_FREE, "domain": domain_queries([x for x, _ in task.pairs], n=2, seed=0)}
    scores = score_labels(model, prompts, LABELS, references=queries, batch_size=4)
    for kind, qs in queries.items():
        assert scores.reference[kind].shape == (len(prompts), len(qs), len(LABELS))
        for i, p in enumerate(prompts):
            for v, q in enumerate(qs):
                ref = with_query(p, q, tok)
                assert ref.demos == p.demos and ref.query == q
                want = [direct(model, ref.text, y) for y in LABELS]
                np.testing.assert_allclose(scores.reference[kind][i, v], want, atol=1e-4)
    np.testing.assert_allclose(scores.logprobs, score_labels(model, prompts, LABELS).logprobs, atol=1e-5)


def test_with_query_refuses_another_template(tiny):
    p = build_prompts(label_task(), tiny.tokenizer, shots=2, n=1, template="{x} = {y}")[0]
    with pytest.raises(ValueError, match="not built with template"):
        with_query(p, "N/A", tiny.tokenizer)
    assert with_query(p, "N/A", tiny.tokenizer, template="{x} = {y}").text.endswith("N/A = ")


def test_with_query_keeps_the_prompts_separator(tiny):
    """A prompt built with another separator carries it (`ICLPrompt.sep`): its reference queries are built
    with it, so calibration needs no separator passed again (refused as 'not built with' before)."""
    p = build_prompts(label_task(), tiny.tokenizer, shots=2, n=1, sep=" | ")[0]
    q = with_query(p, "N/A", tiny.tokenizer)
    demos = p.text[:p.text.rindex(p.query)]                   # the demos and the separators after them
    assert q.sep == " | " and demos.endswith(" | ") and q.text.startswith(demos + "N/A ->")
    with pytest.raises(ValueError, match="not built with template"):
        with_query(p, "N/A", tiny.tokenizer, sep="\n")


def test_domain_queries_are_seeded_task_words():
    inputs = ["red apple pie", "blue sky", "green tree house"]
    qs = domain_queries(inputs, n=5, seed=3)
    assert qs == domain_queries(inputs, n=5, seed=3) and qs != domain_queries(inputs, n=5, seed=4)
    words = {w for x in inputs for w in x.split()}
    assert all(len(q.split()) == 3 and set(q.split()) <= words for q in qs)   # 8 words / 3 inputs -> 3
    assert all(len(q.split()) == 64 for q in domain_queries(inputs, n=2, n_words=64))


def test_open_tasks_are_refused_and_files_may_say_otherwise():
    many = [(f"w{i}", f"label{i}") for i in range(MAX_LABELS + 1)]
    assert Task("few", tuple(many[:MAX_LABELS])).label_set() == tuple(sorted(y for _, y in many[:MAX_LABELS]))
    with pytest.raises(ValueError, match=r"task 'many' is open.*13 distinct answers \(more than 12\)"):
        Task("many", tuple(many)).require_labels()
    as_file = {"name": "many", "pairs": [list(p) for p in many]}
    assert validate_task_json({**as_file, "closed": True}).label_set() is not None
    labels = [y for _, y in many] + ["spare"]
    assert validate_task_json({**as_file, "labels": labels}).label_set() == tuple(labels)
    refused = validate_task_json({"name": "few", "pairs": [["a", "x"], ["b", "y"]], "closed": False})
    with pytest.raises(ValueError, match='"closed": false'):
        refused.require_labels()
    assert refused.to_json()["closed"] is False and "labels" not in Task("t", (("a", "b"),)).to_json()
    for bad, msg in [({"labels": ["x"]}, "not in"), ({"labels": ["x", "x", "y"]}, "repeats"),
                     ({"labels": ["x", "y"], "closed": False}, "contradicts"), ({"closed": "no"}, "true or false"),
                     ({"labels": "x,y"}, "list of non-empty")]:
        with pytest.raises(ValueError, match=msg):
            validate_task_json({"name": "t", "pairs": [["a", "x"], ["b", "y"]], **bad})


def test_labels_must_cover_the_answers(tiny):
    prompts = build_prompts(label_task(), tiny.tokenizer, shots=2, n=3).prompts
    with pytest.raises(ValueError, match="not among the labels"):
        score_labels(tiny, prompts, ("no", "yes"))


# ---------------------------------------------------------------- readouts by hand


def softmax_rows(x):
    out = []
    for row in x:
        e = [np.exp(v - max(row)) for v in row]
        out.append([v / sum(e) for v in e])
    return np.array(out)


STORED = {"labels": ["neg", "pos", "mid"],
          "logprobs": [[-1.0, -2.0, -3.0], [-0.5, -0.7, -4.0], [-2.2, -0.1, -1.0], [-3.0, -3.1, -0.2]],
          "reference": {"contextual": [[[-0.2, -2.5, -3.0], [-0.4, -1.9, -2.0], [-1.0, -1.5, -3.5]]] * 2
                                      + [[[-1.0, -1.0, -1.0], [-2.0, -0.5, -2.5], [-0.3, -2.0, -2.0]]] * 2},
          "queries": {"contextual": ["N/A", "", "[MASK]"]}}


def test_contextual_calibration_by_hand():
    scores = LabelScores.from_json(STORED)
    p = softmax_rows(STORED["logprobs"])
    want = []
    for i in range(4):
        refs = softmax_rows(STORED["reference"]["contextual"][i])
        mean = [sum(refs[v][j] for v in range(3)) / 3 for j in range(3)]
        w = [p[i][j] / mean[j] for j in range(3)]
        want.append([x / sum(w) for x in w])
    np.testing.assert_allclose(scores.weights("contextual"), want, rtol=1e-12)
    assert scores.predict("labels") == ["neg", "neg", "pos", "mid"]
    assert scores.predict("contextual") == [STORED["labels"][int(np.argmax(w))] for w in want]
    assert scores.predict("contextual") != scores.predict("labels")        # the example moves something
    assert LabelScores.from_json(json.loads(json.dumps(scores.to_json()))).to_json() == scores.to_json()


def test_batch_calibration_by_hand():
    scores = LabelScores.from_json(STORED)
    p = softmax_rows(STORED["logprobs"])
    mean = [sum(p[i][j] for i in range(4)) / 4 for j in range(3)]
    want = [[p[i][j] - mean[j] for j in range(3)] for i in range(4)]
    np.testing.assert_allclose(scores.weights("batch"), want, rtol=1e-12)
    assert scores.predict("batch") == [STORED["labels"][int(np.argmax(w))] for w in want]
    with pytest.raises(ValueError, match="domain calibration needs"):
        scores.weights("domain")
    with pytest.raises(ValueError, match="unknown readout"):
        scores.weights("platt")


@pytest.mark.slow
def test_smollm2_label_scores_are_exact(smollm2):
    """SmolLM2 splits " 3" into " " and "3" (the prompt then ends with " ") and keeps words' leading
    space (" positive"): label tokens follow the prompt exactly, and the scores equal a direct pass."""
    from mechcopy.tasks import load_task

    tok = smollm2.tokenizer
    for name in ("object_counting", "sentiment_binary", "location_continent"):
        task = load_task(name)
        labels = task.require_labels()
        prompts = build_prompts(task, tok, shots=4, n=3, seed=0, gold_in_demos=False).prompts
        scores = score_labels(smollm2, prompts, labels, references={"contextual": CONTENT_FREE})
        for i, p in enumerate(prompts):
            ids = label_ids(tok, p, labels)
            assert ids[labels.index(p.answer)] == p.answer_ids
            for j, y in enumerate(labels):
                full = smollm2.to_tokens(p.text)[0].tolist() + list(ids[j])
                with torch.no_grad():
                    logp = torch.log_softmax(smollm2(torch.tensor([full])).float(), -1)[0]
                start = len(full) - len(ids[j])
                want = float(sum(logp[start - 1 + t, x] for t, x in enumerate(ids[j])))
                assert scores.logprobs[i, j] == pytest.approx(want, abs=2e-3), (name, i, y)
        if name == "object_counting":
            assert all(p.text.endswith("-> ") for p in prompts)
