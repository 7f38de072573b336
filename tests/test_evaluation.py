"""The evaluator: forced models with hand-computable answers, batching, CIs, perplexity, the CLI."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mechcopy import batching, evaluation
from mechcopy.arch import arch_of
from mechcopy.comparisons import compare_rows, comparisons_table
from mechcopy.conditions import UNPRUNED, Condition, standard_conditions
from mechcopy.evaluation import (TaskResult, evaluate, evaluate_conditions, perplexity, predict, predict_conditions,
                                 summarize, _steps)
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.pruning import component_means, condition_hooks, grouped_hooks, pruning_hooks
from mechcopy.suite import ResultRow, run_evaluation
from mechcopy.stats import bootstrap_ci
from mechcopy.models.tiny import tiny_transformer
from mechcopy.tasks import Task, load_task
from mechcopy.tasks.outcomes import classify
from mechcopy.tasks.probe import probe_prompts
from mechcopy.tasks.prompts import build_prompts, encode, make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bigram():
    """A model whose next token depends only on the current token, through W_E and W_U, once the
    blocks are silenced by hooks: `forced(table)` returns the hooks and sets the bigram table."""
    model = tiny_transformer(n_layers=1, d_model=128, n_heads=4, d_mlp=16, seed=1)
    d_vocab = model.cfg.d_vocab
    assert d_vocab <= model.cfg.d_model
    with torch.no_grad():
        model.embed.W_E.zero_()
        model.embed.W_E[torch.arange(d_vocab), torch.arange(d_vocab)] = 1.0
        model.ln_final.w.fill_(1.0)
    silence = [(f"blocks.0.hook_{part}_out", lambda act, hook: torch.zeros_like(act)) for part in ("attn", "mlp")]
    tok = model.tokenizer

    def forced(table: dict[str, str]):
        with torch.no_grad():
            model.unembed.W_U.zero_()
            model.unembed.b_U.zero_()
            for a, b in table.items():
                (ia,), (ib,) = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
                model.unembed.W_U[ia, ib] = 1.0
        return silence

    return model, forced


def digit_prompts(tok):
    """Prompts whose demo labels include "7" and whose gold answers are never "7"."""
    demos = [("apple", "7"), ("river", "5"), ("stone", "7")]
    return [make_prompt(demos, (q, a), tok, task="digits") for q, a in [("cat", "3"), ("moon", "3"), ("sky", "3")]]


def test_forced_copy_gives_copy_rate_one(bigram):
    model, forced = bigram
    prompts = digit_prompts(model.tokenizer)
    assert all(p.text.endswith("-> ") and len(p.answer_ids) == 1 for p in prompts)
    r = evaluate(model, prompts, fwd_hooks=forced({" ": "7"}), condition="forced-copy")
    assert (r.accuracy, r.copy_rate, r.copy_share_of_errors, r.other_rate) == (0.0, 1.0, 1.0, 0.0)
    assert r.predictions == ("7",) * 3 and r.condition == "forced-copy" and r.n == 3 and r.task == "digits"
    r = evaluate(model, prompts, fwd_hooks=forced({" ": "3"}))
    assert (r.accuracy, r.copy_rate, r.copy_share_of_errors, r.other_rate) == (1.0, 0.0, 0.0, 0.0)
    r = evaluate(model, prompts, fwd_hooks=forced({" ": "9"}))
    assert (r.accuracy, r.copy_rate, r.other_rate) == (0.0, 0.0, 1.0)
    # the hooks are applied: without them the blocks speak and the forcing no longer decides alone
    hooks = forced({" ": "7"})
    tokens = model.to_tokens(prompts[0].text)
    with model.hooks(fwd_hooks=hooks):
        forced_logits = arch_of(model).last_logits(model, tokens)
    assert not torch.allclose(forced_logits, arch_of(model).last_logits(model, tokens))


def test_multi_token_answers_by_greedy_generation(bigram):
    model, forced = bigram
    tok = model.tokenizer
    p = make_prompt([("hot", "cold"), ("up", "down")], ("fast", "slow"), tok, task="antonyms")
    assert len(p.answer_ids) == 4 and p.text.endswith("-> ")
    chain = lambda word, then="\n": {a: b for a, b in zip(" " + word, word + then)}
    assert predict(model, [p], fwd_hooks=forced(chain("slow"))) == ["slow"]
    r = evaluate(model, [p], fwd_hooks=forced(chain("down")))
    assert r.predictions == ("down",) and r.copy_rate == 1.0
    # generation stops at the separator even if the model would go on
    assert predict(model, [p], fwd_hooks=forced({**chain("slo"), "\n": "x", "x": "y"})) == ["slo"]
    # ... and at the budget: the longest of answer and demo labels + 2 tokens
    assert predict(model, [p], fwd_hooks=forced({" ": "z", "z": "z"})) == ["z" * _steps(p)]
    assert _steps(p) == 4 + 2


def test_batches_equal_single_runs(tiny):
    short = Task("short", (("a", "bc"), ("b", "cde"), ("c", "d"), ("d", "ef"), ("e", "fgh"), ("f", "g")))
    prompts = list(probe_prompts(tiny.tokenizer, n=16, shots=3, seed=1)) + list(
        build_prompts(short, tiny.tokenizer, shots=2, n=6, seed=0))
    assert len({len(tiny.to_tokens(p.text)[0]) for p in prompts}) > 3  # several lengths
    batched = predict(tiny, prompts, batch_size=32)
    assert batched == predict(tiny, prompts, batch_size=1)
    assert any(len(p) > 1 for p in batched)  # generation really ran
    tokens = torch.stack([tiny.to_tokens(p.text)[0] for p in prompts[:1]] * 2)
    assert torch.allclose(arch_of(tiny).last_logits(tiny, tokens), tiny(tokens)[:, -1], atol=1e-5)


def _mixed_prompts(tok):
    """Prompts of several token lengths, with single-token answers (probe) and generated ones."""
    short = Task("short", (("a", "bc"), ("b", "cde"), ("c", "d"), ("d", "ef"), ("e", "fgh"), ("f", "g"), ("g", "hi")))
    return list(probe_prompts(tok, n=10, shots=3, seed=1)) + list(build_prompts(short, tok, shots=2, n=7, seed=0)) + list(
        build_prompts(short, tok, shots=3, n=5, seed=1))


@pytest.fixture(scope="module", params=["transformer", "mamba"])
def model(request):
    from mechcopy.models.mamba import tiny_mamba

    if request.param == "transformer":
        return tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=2)
    return tiny_mamba(n_layers=3, d_model=32, seed=2)


@pytest.mark.parametrize("max_padding", [1.0, batching.MAX_PADDING])
def test_padded_batches_equal_unpadded_runs(model, max_padding, monkeypatch):
    """Left-padded batches of mixed lengths answer as equal-length batches and single prompts do."""
    monkeypatch.setattr(batching, "MAX_PADDING", max_padding)
    prompts = _mixed_prompts(model.tokenizer)
    ids = [model.to_tokens(p.text)[0] for p in prompts]
    assert len({len(i) for i in ids}) > 4 and {_steps(p) == 1 for p in prompts} == {True, False}
    batches = batching.token_batches(ids, [_steps(p) for p in prompts], 32, pad=True)
    assert any(len({len(ids[i]) for i in b}) > 1 for b in batches)  # some batches really pad
    padded = predict(model, prompts, batch_size=32)
    assert padded == predict(model, prompts, batch_size=32, pad=False) == predict(model, prompts, batch_size=1)
    assert any(len(p) > 1 for p in padded)  # generation really ran


def _conditions(model, spec: dict) -> list[Condition]:
    """Conditions ablating half the neurons of each listed layer (a different half per condition), each
    zeroed or mean-ablated (means over other prompts), at every position or the last."""
    arch, fp = arch_of(model), model_fingerprint(model)
    width = arch.neurons_per_layer(model)
    refs = list(probe_prompts(model.tokenizer, n=6, shots=2, seed=7))
    means = {p: component_means(model, refs, positions=p, reference="6 probe prompts") for p in ("all", "last")}
    out = []
    for g, (name, (layers, ablation, positions)) in enumerate(spec.items()):
        if layers is None:
            out.append(Condition(name))
            continue
        comps = NeuronSet(tuple((l, i) for l in layers for i in range(g % 2, width, 2)), fp)
        out.append(Condition(name, components=comps, ablation=ablation, positions=positions,
                             means=means[positions] if ablation == "mean" else None))
    return out


@pytest.mark.parametrize("spec", [
    {"unpruned": (None, "zero", "all"), "early": ([0], "zero", "all"), "late": ([2], "zero", "all"),
     "both": ([1, 2], "zero", "all")},                                                     # fork before block 0
    {"late": ([2], "zero", "all"), "unpruned": (None, "zero", "all"), "mid": ([1, 2], "zero", "all")},   # block 1
    {"unpruned": (None, "zero", "all"), "mean": ([0, 2], "mean", "all"), "zero": ([0, 2], "zero", "all"),
     "mean-last": ([1], "mean", "last"), "zero-last": ([1, 2], "zero", "last")},   # mean ablation, last position
])
def test_one_pass_equals_separate_conditions(model, spec):
    """Every condition (zero or mean ablation, every position or the last) in one forked pass answers
    as its own run with its own hooks, on a transformer and on Mamba."""
    prompts = _mixed_prompts(model.tokenizer)
    conds = _conditions(model, spec)
    one_pass = predict_conditions(model, prompts, conds, batch_size=24)  # several batches
    for c in conds:
        assert one_pass[c.label] == predict(model, prompts, fwd_hooks=condition_hooks(model, c), pad=False), c.label
    assert len({tuple(p) for p in one_pass.values()}) == len(conds)  # every condition changes answers
    unpruned = predict_conditions(model, prompts, [Condition("a"), Condition("b")])  # nothing ablated: no fork
    assert unpruned["a"] == unpruned["b"] == one_pass["unpruned"]
    results = evaluate_conditions(model, prompts, conds, batch_size=24)
    assert list(results) == [c.label for c in conds] and all(r.condition == name for name, r in results.items())
    assert all(r.predictions == tuple(one_pass[name]) for name, r in results.items())
    with pytest.raises(ValueError, match="distinct labels"):
        predict_conditions(model, prompts, [Condition("a"), Condition("a")])


ANSWERS = ("no", "yes", "maybe")


def answer_task() -> Task:
    words = ("cat", "moon", "sky", "river", "stone", "apple", "tree", "house", "lamp", "road", "bird", "fish",
             "rain", "sand", "wolf")
    return Task("answers", tuple((w, ANSWERS[i % 3]) for i, w in enumerate(words)))


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_label_readouts_in_one_call_equal_separate_scoring(arch):
    """Label-scored conditions (plain, calibrated, pruned and both) and generated ones in one call answer as
    separate `score_labels` runs under each condition's hooks read by its calibration, and as `predict`."""
    from mechcopy.conditions import LABELS, Readout, calibrated_conditions, read_by
    from mechcopy.models.mamba import tiny_mamba
    from mechcopy.scoring import CONTENT_FREE, domain_queries, reference_queries, score_labels

    model = tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=2) if arch == "transformer" else \
        tiny_mamba(n_layers=3, d_model=32, seed=2)
    task = answer_task()
    labels = task.require_labels()
    prompts = build_prompts(task, model.tokenizer, shots=3, n=10, seed=1).prompts
    width = arch_of(model).neurons_per_layer(model)
    comps = NeuronSet(tuple((l, i) for l in (1, 2) for i in range(0, width, 3)), model_fingerprint(model))
    base = read_by([UNPRUNED, Condition("pruned", "pruned", comps)], LABELS)
    calibrated = calibrated_conditions(base, ["contextual", "batch", "domain"])
    assert [c.label for c in calibrated] == ["contextual", "pruned+contextual", "batch", "pruned+batch", "domain",
                                             "pruned+domain"]
    assert calibrated[0].versus == ("pruned",) and calibrated[1].versus == ("pruned", "contextual")
    assert calibrated[1].components == comps and calibrated[1].family == "pruned+contextual"
    conditions = [Condition("generated"), *base, *calibrated]
    refs = reference_queries(["contextual", "domain"], [x for x, _ in task.pairs], seed=0)
    assert refs == {"contextual": CONTENT_FREE, "domain": domain_queries([x for x, _ in task.pairs], seed=0)}
    got = predict_conditions(model, prompts, conditions, batch_size=12, labels=labels, references=refs)
    assert got["generated"] == predict(model, prompts)
    for c in [*base, *calibrated]:
        scores = score_labels(model, prompts, labels, fwd_hooks=condition_hooks(model, c), references=refs)
        assert got[c.label] == scores.predict(c.readout.calibration or "labels"), c.label
    assert got["pruned+contextual"] != got["contextual"] and got["contextual"] != got["unpruned"]  # both matter
    results = evaluate_conditions(model, prompts, conditions, batch_size=12, labels=labels, references=refs)
    assert all(r.predictions == tuple(got[name]) for name, r in results.items())
    with pytest.raises(ValueError, match="label set"):
        predict_conditions(model, prompts, base)
    with pytest.raises(ValueError, match="domain calibration needs its reference queries"):
        predict_conditions(model, prompts, calibrated, labels=labels)
    with pytest.raises(ValueError, match="needs scoring='labels'"):
        Readout("generate", "contextual")
    with pytest.raises(ValueError, match="unknown calibration"):
        calibrated_conditions(base, ["platt"])
    again = Condition.from_json(json.loads(json.dumps(calibrated[1].to_json())))
    assert again == calibrated[1] and again.describe()["readout"] == {"scoring": "labels", "calibration": "contextual"}


def test_rows_carry_the_copy_effect_beside_the_copy_rate(tiny):
    """A closed-label task's rows carry the copy effect and demo share of their predictions (equal to
    `copy_effect` on them); an open task's say why they have none; the pooled part is computed apart."""
    from mechcopy.copy_effect import copy_effect, demo_share
    from mechcopy.suite import build_prompt_sets, copy_effects

    closed = answer_task()
    open_task = Task("open", tuple((w, w[::-1]) for w in ("ab", "cd", "ef", "gh", "ij", "kl")), closed=False)
    rows, _ = run_evaluation(tiny, [closed, open_task], shots=3, n=8, conditions=[UNPRUNED], progress=False,
                             copy_control=False)
    sets = build_prompt_sets(tiny, [closed, open_task], shots=3, n=8)
    row, open_row = rows
    prompts = sets["answers"].prompts
    predictions = row.result.predictions
    assert row.result.copy_effect == copy_effect(prompts, predictions, closed.label_set(), "answers").to_json()
    assert row.result.demo_share == demo_share(prompts, predictions, closed.label_set(), "answers").to_json()
    assert open_row.result.copy_effect["effect"] is None and "open task" in open_row.result.copy_effect["reason"]
    part = copy_effects(rows, sets, [closed, open_task])
    assert set(part) == {"unpruned"} and set(part["unpruned"]) == {"pooled", "task_level", "tasks"}
    assert "copy_effect" not in {k for r in rows for k in r.to_json() if k.startswith("pooled")}


def test_task_result_outcomes_agree_with_classify(tiny):
    prompts = _mixed_prompts(tiny.tokenizer)
    r = evaluate(tiny, prompts)
    correct, copy = classify(prompts, r.predictions)
    assert r.correct == tuple(correct) and r.copy == tuple(copy) and len(r.correct) == r.n
    assert r.accuracy == np.mean(r.correct) and r.copy_rate == np.mean(r.copy)
    row = json.loads(json.dumps(r.to_json()))
    assert row["correct"] == list(correct) and row["copy"] == list(copy)


def test_summarize_by_hand_and_intervals():
    demos = (("a", "1"), ("b", "2"))
    from mechcopy.tasks.prompts import ICLPrompt

    def prompt(ans):
        return ICLPrompt("t", "", "q", ans, (0,), demos, ("1", "2"), ((1,), (2,)))

    prompts = [prompt("3")] * 8
    preds = ["3", "3", "1", "2", " 2", "9", "x", "3 "]
    r = summarize(prompts, preds, seed=0)
    assert r.accuracy == 3 / 8 and r.copy_rate == 3 / 8 and r.other_rate == 2 / 8
    assert r.correct == (True, True, False, False, False, False, False, True)
    assert r.copy == (False, False, True, True, True, False, False, False)
    assert r.copy_share_of_errors == 3 / 5
    assert r.accuracy_ci[0] <= r.accuracy <= r.accuracy_ci[1]
    assert r.copy_rate_ci[0] <= r.copy_rate <= r.copy_rate_ci[1]
    assert json.loads(json.dumps(r.to_json()))["accuracy_ci"] == list(r.accuracy_ci)
    # intervals contain the estimate, are seeded, and shrink with n
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        x = rng.random(n) < 0.3
        lo, hi = bootstrap_ci(x, seed=1)[0]
        assert lo <= x.mean() <= hi
        assert (lo, hi) == tuple(bootstrap_ci(x, seed=1)[0])
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert abs(widths[2] - 2 * 1.96 * math.sqrt(0.3 * 0.7 / 2000)) < 0.01  # matches the normal approximation


def test_perplexity_matches_naive(tiny):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ppl = perplexity(tiny, text, n_tokens=40, window=16)
    tok_ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"][:40]
    bos = tiny.tokenizer.bos_token_id
    nll = []
    with torch.no_grad():
        for s in range(0, 40, 16):
            window = [bos] + tok_ids[s:s + 16]
            for t in range(1, len(window)):
                logits = tiny(torch.tensor([window[:t]]))[0, -1]
                nll.append(-torch.log_softmax(logits, -1)[window[t]].item())
    assert ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    # hooks compose: zeroing every MLP neuron changes the perplexity
    hooks = [("blocks.0.mlp.hook_post", lambda a, hook: a * 0)]
    assert perplexity(tiny, text, hooks, n_tokens=40, window=16) != pytest.approx(ppl, rel=1e-6)
    assert perplexity(tiny, n_tokens=64, window=32) > 1  # default text: the stdlib's pydoc topics


def test_evaluate_cli(tiny, tmp_path, monkeypatch):
    import mechcopy
    from mechcopy.commands import main

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: tiny)
    task_file = tmp_path / "t.json"
    pairs = [[w, w.upper()] for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    task_file.write_text(json.dumps({"name": "upper", "pairs": pairs}))
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", "tiny", "--tasks", f"{task_file}", "--shots", "2", "--n", "5",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == model_fingerprint(tiny)
    assert data["settings"]["shots"] == 2 and data["settings"]["seed"] == 0
    (row,) = data["results"]
    for key in ("task", "condition", "accuracy", "copy_rate", "n", "accuracy_ci", "copy_rate_ci", "correct", "copy"):
        assert key in row
    assert row["task"] == "upper" and row["condition"] == "unpruned" and row["n"] == 5

    # --prune asks mechcopy.conditions.standard_conditions for the extra conditions
    neurons = tmp_path / "n.json"
    NeuronSet(((0, 1), (1, 2)), model_fingerprint(tiny)).save(neurons)
    calls = []

    def fake_conditions(model, ns, n_random, seed, scores=None, **kw):
        calls.append((len(ns), n_random, seed))
        return [Condition("pruned", "pruned", ns), Condition("random-0", "random", NeuronSet(((1, 5),), ns.model), seed=0)]

    import mechcopy.commands.evaluate

    monkeypatch.setattr(mechcopy.commands.evaluate, "standard_conditions", fake_conditions)
    assert main(["evaluate", "--model", "tiny", "--tasks", f"{task_file}", "--shots", "2", "--n", "5",
                 "--prune", str(neurons), "--n-random", "1", "--out", str(out), "--force"]) == 0
    assert calls == [(2, 1, 0)]
    data = json.loads(out.read_text())
    assert [r["condition"] for r in data["results"]] == ["unpruned", "pruned", "random-0"]
    assert [r["spec"]["family"] for r in data["results"]] == ["unpruned", "pruned", "random"]
    # paired comparisons for each task and pooled, with the fields a reader needs
    assert set(data["comparisons"]) == {"upper", "pooled"}
    for c in data["comparisons"]["pooled"] + data["comparisons"]["upper"]:
        assert {"condition", "baseline", "metric", "diff", "ci", "p_value", "mde", "n"} <= set(c)
    assert {(c["condition"], c["baseline"]) for c in data["comparisons"]["pooled"]} == {
        ("pruned", "unpruned"), ("random", "unpruned"), ("pruned", "random")}
    assert [(t["condition"], t["baseline"], t["metric"]) for t in data["task_level"]] == [
        (c["condition"], c["baseline"], c["metric"]) for c in data["comparisons"]["pooled"]]


def test_evaluate_cli_label_scoring_and_calibration(tiny, tmp_path, monkeypatch, capsys):
    """--scoring labels --calibrate: every condition label-scored, the calibrations alone and with pruning,
    each compared with unpruned and with pruning; task-level figures beside the pooled ones; the copy
    effect's pooled part apart from the rows; open tasks and --calibrate without labels refused first."""
    import mechcopy
    from mechcopy.commands import main

    loads = []
    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: loads.append(name) or tiny)
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps(answer_task().to_json()))
    neurons = tmp_path / "n.json"
    NeuronSet(((0, 1), (1, 2), (1, 7)), model_fingerprint(tiny)).save(neurons)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", "tiny", "--tasks", f"{task_file}", "--shots", "3", "--n", "9", "--prune",
                 str(neurons), "--n-random", "2", "--scoring", "labels", "--calibrate", "contextual,batch",
                 "--random-match", "size", "--copy-control", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["scoring"] == "labels" and data["settings"]["calibrate"] == ["contextual", "batch"]
    assert data["settings"]["random_match"] == "size" and data["settings"]["sizes"]["n_prompts"] == 9
    rows = {r["condition"]: r for r in data["results"]}
    assert list(rows) == ["unpruned", "pruned", "random-0", "random-1", "contextual", "pruned+contextual", "batch",
                          "pruned+batch"]
    assert {r["spec"]["readout"]["scoring"] for r in rows.values()} == {"labels"}
    assert rows["pruned+batch"]["spec"]["readout"]["calibration"] == "batch"
    assert all(set(r["predictions"]) <= set(ANSWERS) for r in rows.values())
    assert all(r["copy_effect"]["task"] == "answers" for r in rows.values())
    pairs = {(c["condition"], c["baseline"]) for c in data["comparisons"]["pooled"] if c["metric"] == "accuracy"}
    for x in ("contextual", "batch"):
        assert {(x, "unpruned"), (x, "pruned"), (f"pruned+{x}", "pruned"), (f"pruned+{x}", x),
                (f"pruned+{x}", "unpruned")} <= pairs
    assert len(data["task_level"]) == len(data["comparisons"]["pooled"])
    assert set(data["copy_effect"]) == set(rows) and "pooled" in data["copy_effect"]["batch"]
    assert loads == ["tiny"]
    for extra, msg in [(["--calibrate", "batch"], "add --scoring labels"), (["--scoring", "labels"], "is open"),
                       (["--copy-control"], "is open")]:
        task_file.write_text(json.dumps({**answer_task().to_json(), "closed": False}) if "is open" in msg
                             else json.dumps(answer_task().to_json()))
        capsys.readouterr()
        assert main(["evaluate", "--model", "tiny", "--tasks", f"{task_file}", "--n", "3", *extra]) == 2
        assert msg in capsys.readouterr().err
    assert loads == ["tiny"]                                        # refused before the model loads


def test_mamba_predict_batches(tiny):
    mamba = pytest.importorskip("mechcopy.models.mamba")
    model = mamba.tiny_mamba(seed=0)
    prompts = list(probe_prompts(model.tokenizer, n=12, shots=2, seed=0))
    assert predict(model, prompts, batch_size=32) == predict(model, prompts, batch_size=1)
    # the BOS convention is the model's (tiny Mamba prepends none); the rest of the tokens agree
    bos = 1 if model.cfg.default_prepend_bos else 0
    assert all(encode(model.tokenizer, p.text)[1 - bos:] == model.to_tokens(p.text)[0].tolist() for p in prompts)


@pytest.mark.slow
def test_smollm2_prompts_antonyms_and_probe(smollm2):
    tok = smollm2.tokenizer
    probe = probe_prompts(tok, n=30, shots=4, seed=0)
    antonyms = build_prompts(load_task("antonyms"), tok, shots=4, n=12, seed=0)
    for p in list(probe) + list(antonyms):
        assert encode(tok, p.text) == smollm2.to_tokens(p.text)[0].tolist()
    # SmolLM2 splits " 3" into " ", "3": the space sits in the prompt and the answer is one digit token
    assert all(p.text.endswith("-> ") and len(p.answer_ids) == 1 for p in probe)
    assert all(p.text.endswith(" ->") for p in antonyms)  # words keep their leading space
    r = evaluate(smollm2, antonyms)
    assert r.accuracy > 0
    r = evaluate(smollm2, probe)
    assert r.copy_rate > 0.5, r


@pytest.mark.slow
def test_smollm2_padded_and_one_pass_are_exact(smollm2):
    """On SmolLM2: left-padded batches and the one-pass conditions (zero and mean ablation, every
    position and the last) give the answers of separate runs, and logits within 1e-4 of unpadded,
    separate runs."""
    from mechcopy.batching import left_pad

    tok, arch = smollm2.tokenizer, arch_of(smollm2)
    prompts = [p for name in ("antonyms", "country_capital", "copy_probe")
               for p in build_prompts(load_task(name), tok, shots=4, n=6, seed=0)]
    rows = [smollm2.to_tokens(p.text)[0] for p in prompts]
    assert len({len(r) for r in rows}) > 3 and {_steps(p) == 1 for p in prompts} == {True, False}
    fp = model_fingerprint(smollm2)
    top = NeuronSet(tuple((l, (37 * l + 11 * i) % 1536) for l in (3, 9, 17, 25) for i in range(5)), fp)
    refs = list(probe_prompts(tok, n=8, shots=4, seed=3))
    means = {p: component_means(smollm2, refs, positions=p) for p in ("all", "last")}
    sets = [UNPRUNED, *standard_conditions(smollm2, top, n_random=1, seed=0),
            *[Condition(f"mean-{p}", "mean", top, "mean", p, means[p]) for p in ("all", "last")],
            Condition("zero-last", "zero-last", top, positions="last")]
    one_pass = predict_conditions(smollm2, prompts, sets, batch_size=64)
    for c in sets:
        assert one_pass[c.label] == predict(smollm2, prompts, fwd_hooks=condition_hooks(smollm2, c), pad=False), c.label
    tokens, mask = left_pad(rows[:8], pad_id=tok.pad_token_id or 0)
    with torch.no_grad():
        padded = arch.decoder(smollm2)(tokens, mask)
        for r, row in enumerate(rows[:8]):
            assert torch.allclose(arch.decoder(smollm2)(row[None])[0], padded[r], atol=1e-4), r
        fork_at, hooks = grouped_hooks(smollm2, sets)
        with smollm2.hooks(fwd_hooks=hooks):
            forked = arch.decoder(smollm2, len(sets), fork_at)(tokens, mask)
        for g, c in enumerate(sets):
            with smollm2.hooks(fwd_hooks=condition_hooks(smollm2, c)):
                alone = arch.decoder(smollm2)(tokens, mask)
            assert torch.allclose(alone, forked[g * 8:(g + 1) * 8], atol=1e-4), c.label


def _fake_rows(seed=0, n=40, group=None):
    """Result rows of three tasks (one the probe) under five conditions, with random outcomes."""
    rng = np.random.default_rng(seed)
    conds = [UNPRUNED, Condition("pruned", "pruned", group=group), Condition("random-0", "random", seed=0, group=group),
             Condition("random-1", "random", seed=1, group=group), Condition("bottom", "bottom", group=group)]
    rows = []
    for task, kind in (("a", "linguistic"), ("b", "knowledge"), ("copy_probe", "probe")):
        for cond in conds:
            correct = rng.random(n) < (0.5 if cond.family != "pruned" else 0.7)
            copy = ~correct & (rng.random(n) < 0.5)
            rows.append(ResultRow(summarize_outcomes(task, cond.label, correct, copy), kind, 0, 0.0, cond.spec))
    return rows


def summarize_outcomes(task: str, condition: str, correct: np.ndarray, copy: np.ndarray) -> TaskResult:
    """A TaskResult holding given per-prompt outcomes (rates from them; intervals not computed)."""
    n = len(correct)
    return TaskResult(task, condition, n, float(correct.mean()), float(copy.mean()), 0.0,
                      float((~correct & ~copy).mean()), (0.0, 1.0), (0.0, 1.0), ("",) * n,
                      tuple(map(bool, correct)), tuple(map(bool, copy)))


def test_compare_rows_by_hand():
    rows = _fake_rows()
    out = compare_rows(rows, n_boot=300)
    assert set(out) == {"a", "b", "copy_probe", "pooled"}
    by = {(t, c.condition, c.baseline, c.metric): c for t, cs in out.items() for c in cs}
    get = {(r.task, r.condition): r.result for r in rows}
    for t in ("a", "b", "copy_probe"):
        for cond in ("pruned", "bottom"):
            c = by[(t, cond, "unpruned", "accuracy")]
            assert c.diff == pytest.approx(np.mean(get[(t, cond)].correct) - np.mean(get[(t, "unpruned")].correct))
            assert c.ci[0] <= c.diff <= c.ci[1] and c.n == 40 and 0 <= c.p_value <= 1 and c.mde > 0
        rand = np.mean([np.mean(get[(t, f"random-{s}")].copy) for s in (0, 1)])
        assert by[(t, "pruned", "random", "copy_rate")].diff == pytest.approx(np.mean(get[(t, "pruned")].copy) - rand)
    # pooled: the mean of the held-out tasks' differences; the probe (where the neurons were chosen) is left out
    pooled = by[("pooled", "pruned", "unpruned", "accuracy")]
    assert pooled.n_tasks == 2 and pooled.n == 80
    assert pooled.diff == pytest.approx(np.mean([by[(t, "pruned", "unpruned", "accuracy")].diff for t in "ab"]))


def test_compare_rows_groups_by_spec_not_by_name():
    """The random family is the spec's family (a set named anything), and a group's comparisons are those
    of its own conditions beside the ungrouped unpruned, labelled as they would be alone."""
    alone = compare_rows(_fake_rows(), n_boot=200)
    grouped = _fake_rows(group=20)
    assert {r.condition for r in grouped} == {"unpruned", "pruned@20", "random-0@20", "random-1@20", "bottom@20"}
    both = grouped + [r for r in _fake_rows(seed=1) if r.spec.family != "unpruned"]   # ungrouped: left out
    assert compare_rows(both, n_boot=200, group=20) == alone
    renamed = [replace(r, spec=replace(r.spec, name=r.spec.name.replace("random", "baseline"))) for r in _fake_rows()]
    pooled = {(c.condition, c.baseline) for c in compare_rows(renamed, n_boot=200)["pooled"]}
    assert ("pruned", "random") in pooled and ("random", "unpruned") in pooled
    with pytest.raises(ValueError, match="older mechcopy"):
        ResultRow.from_json({k: v for k, v in _fake_rows()[0].to_json().items() if k != "spec"})


def test_versus_comparisons_and_task_levels_by_hand():
    """A calibrated condition is compared with unpruned and with what its spec's `versus` names, per task and
    pooled over the held-out tasks; `task_levels` is `stats.task_level` of the same per-task differences."""
    from mechcopy.comparisons import task_level_table, task_levels
    from mechcopy.conditions import LABELS, calibrated_conditions, read_by
    from mechcopy.stats import task_level

    rng = np.random.default_rng(3)
    base = read_by([UNPRUNED, Condition("pruned", "pruned")], LABELS)
    conds = base + calibrated_conditions(base, ["contextual"])
    rows = [ResultRow(summarize_outcomes(t, c.label, rng.random(30) < 0.5, rng.random(30) < 0.3), kind, 0, 0.0, c.spec)
            for t, kind in (("a", "knowledge"), ("b", "sentiment"), ("c", "linguistic"), ("copy_probe", "probe"))
            for c in conds]
    out = compare_rows(rows, n_boot=200)
    get = {(r.task, r.condition): np.mean(r.result.correct) for r in rows}
    pairs = {(c.condition, c.baseline) for c in out["a"] if c.metric == "accuracy"}
    assert pairs == {("pruned", "unpruned"), ("contextual", "unpruned"), ("pruned+contextual", "unpruned"),
                     ("contextual", "pruned"), ("pruned+contextual", "pruned"), ("pruned+contextual", "contextual")}
    by = {(t, c.condition, c.baseline, c.metric): c for t, cs in out.items() for c in cs}
    for t in "abc":
        assert by[(t, "contextual", "pruned", "accuracy")].diff == pytest.approx(get[(t, "contextual")] - get[(t, "pruned")])
    pooled = by[("pooled", "pruned+contextual", "contextual", "accuracy")]
    assert pooled.tasks == ["a", "b", "c"] and pooled.diff == pytest.approx(
        np.mean([get[(t, "pruned+contextual")] - get[(t, "contextual")] for t in "abc"]))
    levels = task_levels(out, seed=0)
    assert len(levels) == len(out["pooled"])
    for level, c in zip(levels, out["pooled"]):
        want = task_level({t: by[(t, c.condition, c.baseline, c.metric)].diff for t in "abc"},
                          c.metric, c.condition, c.baseline, seed=0)
        assert level == want
    assert len(task_level_table(levels)) == len(levels)


def test_comparisons_table_lists_every_comparison():
    pooled = compare_rows(_fake_rows(), n_boot=200)["pooled"]
    table = comparisons_table(pooled)
    assert len(table) == len(pooled) and "pruned - random" in set(table["comparison"])


def test_run_evaluation_builds_prompts_without_gold_in_demos(tiny, monkeypatch):
    """`gold_in_demos=False` reaches the prompt builder: no demo carries its query's gold label."""
    import mechcopy.suite as S

    built, real = [], S.build_prompts

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(S, "build_prompts", spy)
    task = Task("two", tuple((w, "yes" if i % 2 else "no") for i, w in enumerate("abcdefghijklmnop")))
    rows, _ = run_evaluation(tiny, [task], shots=3, n=8, conditions=[UNPRUNED], progress=False,
                             gold_in_demos=False)
    assert rows[0].result.n == 8 and all(p.answer not in p.demo_labels for p in built[0].prompts)
    run_evaluation(tiny, [task], shots=3, n=8, progress=False)
    assert any(p.answer in p.demo_labels for p in built[1].prompts)   # the standard construction lets it in
