"""Every result type reads back what it writes: `from_json(to_json(x)) == x` through JSON text, and the
JSON written again is the JSON written first. The instances come from the analyses themselves on a tiny
model (so they hold what real results hold: numpy floats, nested tuples, None), not from hand-made values.

Tensor results (`Attributions`, `CopyScores`) are files of tensors (safetensors), not JSON: they round-trip
through `save`/`load`, tested here too; results holding tensors or arrays in JSON (`Means`, `Sizes`,
`LabelScores`) are compared value by value. The study's stage results (analyses/study_results.py) are read back
from a real run of the study in tests/test_replication_study.py."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from mechcopy import method
from mechcopy.attribution import Attributions, CopyScores, integrated_gradients
from mechcopy.audit import ConsistencyRow, KCurve, SelfConsistency, k_curve, self_consistency
from mechcopy.cards import NeuronCard, neuron_cards
from mechcopy.comparisons import Evaluation, compare_rows, task_levels
from mechcopy.components import Components, Sizes, random_matched
from mechcopy.conditions import UNPRUNED, Condition, ConditionSpec, Means, Readout, standard_conditions
from mechcopy.copy_effect import CopyEffect, DemoShare, copy_effect, demo_share
from mechcopy.evaluation import TaskResult, evaluate
from mechcopy.fingerprint import model_fingerprint
from mechcopy.job import ReproduceConfig, Settings
from mechcopy.method import FindConfig, Guard
from mechcopy.models.mamba import MambaConfig, tiny_mamba
from mechcopy.organisms.train import TrainConfig, TrainResult
from mechcopy.patching import PatchingResult, activation_patching
from mechcopy.pruning import component_means, component_sizes
from mechcopy.scoring import CONTENT_FREE, LabelScores, score_labels
from mechcopy.selection import select
from mechcopy.stability import Agreement, BootstrapStability, StabilityReport, stability_report
from mechcopy.stats import Comparison, TaskLevel
from mechcopy.suite import PromptRecord, ResultRow, run_evaluation
from mechcopy.sweeps import KSweep, LayerPercentSweep, sweep_k, sweep_layer_percent
from mechcopy.task_vectors import TaskVectorConfig, TaskVectorResult, task_vector_experiment
from mechcopy.tasks import Task, load_task
from mechcopy.tasks.copy_probe import CopyProbe, CopyProbeConfig, build_copy_probe
from mechcopy.tasks.probe import ProbeConfig, ProbeSplits, build_probe
from mechcopy.tasks.prompts import ICLPrompt, build_prompts
from mechcopy.views import ActivationView, AttentionView, Views, copy_error_views

pytestmark = pytest.mark.usefixtures("one_thread")


def _through_text(obj):
    """JSON as `mechcopy.io` writes it (`default=str`), read back."""
    return json.loads(json.dumps(obj, default=str))


@pytest.fixture(scope="module")
def results(tiny) -> dict[type, object]:
    """One instance of every result type, made by the code that makes it."""
    fp = model_fingerprint(tiny)
    splits = build_probe(tiny.tokenizer, ProbeConfig(), n_attr=3, n_dev=4, n_test=2, seed=0)
    attr, dev = list(splits.attribution), list(splits.dev)
    att = integrated_gradients(tiny, attr, steps=4)
    scores = CopyScores(att.values.mean(0), {"model": fp}, allowed_layers=(0, 1))
    chosen = select(scores, "global", k=4)
    means = component_means(tiny, dev, reference="dev split")
    conditions = [UNPRUNED, *standard_conditions(tiny, chosen, n_random=2, seed=0, scores=scores),
                  Condition("pruned-mean", "pruned-mean", chosen, "mean", "last", means)]
    task = load_task("antonyms")
    rows, dropped = run_evaluation(tiny, [task, load_task("next_letter")], shots=2, n=6, conditions=conditions,
                                   progress=False)
    comparisons = compare_rows(rows, n_boot=100)
    evaluation = Evaluation(tuple(rows), dropped, comparisons, tuple(task_levels(comparisons)))
    closed = load_task("sentiment_binary")
    prompts = build_prompts(closed, tiny.tokenizer, shots=3, n=12, seed=0).prompts
    predictions = [p.demo_labels[0] for p in prompts]    # always the first demo's label: a copy effect to find
    check = self_consistency(tiny, attr, scores, ks=(2,), n_random=2, n_boot=100)
    tv_config = TaskVectorConfig(shots=2, n_extract=2, n_dev=3, n_test=3, layers=(0, 1))
    find = FindConfig(n=3, n_dev=4, steps=4, ks=(2, 4))
    train = TrainConfig(arch="transformer", steps=5)
    views = copy_error_views(tiny, find, chosen)
    copy_probe = build_copy_probe(tiny.tokenizer, CopyProbeConfig(tasks=("max_digit",), n_attr=2, n_dev=2, n_test=2))
    made = [
        TaskResult, ResultRow, Evaluation, Comparison, ConditionSpec, Condition, Components, ICLPrompt, Task,
        ProbeConfig, ProbeSplits, SelfConsistency, ConsistencyRow, Guard, KSweep, LayerPercentSweep, KCurve,
        Agreement, BootstrapStability, StabilityReport, PatchingResult, NeuronCard, TaskVectorConfig,
        TaskVectorResult, TrainConfig, TrainResult, MambaConfig, FindConfig, ReproduceConfig, Settings, Views,
        AttentionView, ActivationView, Readout, TaskLevel, CopyEffect, DemoShare, PromptRecord, CopyProbeConfig,
        CopyProbe]
    out: dict[type, object] = {
        TaskResult: evaluate(tiny, dev), ResultRow: rows[-1], Evaluation: evaluation,
        Comparison: evaluation.comparisons["pooled"][0], ConditionSpec: conditions[-1].spec,
        Condition: random_condition(tiny, chosen), Components: chosen, ICLPrompt: attr[0], Task: task,
        ProbeConfig: splits.config, ProbeSplits: splits, SelfConsistency: check, ConsistencyRow: check.rows[0],
        Guard: Guard(check, "refused for the test"),
        KSweep: sweep_k(tiny, scores, dev, ks=(2, 4), n_tokens=64),
        LayerPercentSweep: sweep_layer_percent(tiny, scores, dev, percents=(5,), layers=(1,), max_ppl_increase=0.5,
                                               n_tokens=64),
        KCurve: k_curve(tiny, dev, scores, ks=(2,), n_random=1, n_boot=50),
        StabilityReport: stability_report({"a": att, "b": integrated_gradients(tiny, attr, steps=2)}, ks=(2, 5),
                                          n_boot=3, allowed_layers=(0, 1)),
        PatchingResult: activation_patching(tiny, task, "shuffled_labels", n=2, shots=2, neurons=chosen,
                                            comps=["resid_pre"]),
        NeuronCard: neuron_cards(tiny, select(scores, "global", k=1), dev, top=3, scores=scores)[0],
        TaskVectorConfig: tv_config, TaskVectorResult: task_vector_experiment(tiny, load_task("next_letter"), tv_config),
        TrainConfig: train, TrainResult: TrainResult("out", train, 1.5, {"class": 0.25}, 3.2, 5, None),
        MambaConfig: tiny_mamba(n_layers=1, d_model=16).cfg, FindConfig: find,
        ReproduceConfig: ReproduceConfig(find=find, tv_tasks=("antonyms",)),
        Settings: Settings(ReproduceConfig(find=find), fp, "abc1234"), Views: views,
        AttentionView: views.attention[0], ActivationView: views.neurons, Readout: Readout("labels", "contextual"),
        TaskLevel: evaluation.task_level[0],
        CopyEffect: copy_effect(prompts, predictions, closed.label_set(), closed.name),
        DemoShare: demo_share(prompts, predictions, closed.label_set(), closed.name),
        PromptRecord: rows[-1].per_prompt[0], CopyProbeConfig: copy_probe.config, CopyProbe: copy_probe}
    report = out[StabilityReport]
    out[Agreement], out[BootstrapStability] = report.settings[0], report.bootstrap[0]
    assert set(out) == set(made)
    return out


def random_condition(model, chosen: Components) -> Condition:
    """A condition with every field set: a random set, mean ablation at the last position, a group."""
    return Condition("random-1", "random", random_matched(model, chosen, 1), "mean", "last", _means(model), 1, 20,
                     Readout("labels", "batch"), ("pruned",))


def _means(model) -> Means:
    """Means of every layer's neurons (random values: what matters here is that they come back)."""
    return Means({l: torch.randn(model.cfg.d_mlp, generator=torch.Generator().manual_seed(l))
                  for l in range(model.cfg.n_layers)}, reference="random values", n_prompts=3)


TYPES = ["TaskResult", "ResultRow", "Evaluation", "Comparison", "ConditionSpec", "Condition", "Components",
         "ICLPrompt", "Task", "ProbeConfig", "ProbeSplits", "SelfConsistency", "ConsistencyRow", "Guard", "KSweep",
         "LayerPercentSweep", "KCurve", "Agreement", "BootstrapStability", "StabilityReport", "PatchingResult",
         "NeuronCard", "TaskVectorConfig", "TaskVectorResult", "TrainConfig", "TrainResult", "MambaConfig",
         "FindConfig", "ReproduceConfig", "Settings", "Views", "AttentionView", "ActivationView", "Readout", "TaskLevel",
         "CopyEffect", "DemoShare", "PromptRecord", "CopyProbeConfig", "CopyProbe"]


def _no_nan(obj) -> bool:
    if isinstance(obj, float):
        return not math.isnan(obj)
    if isinstance(obj, dict):
        return all(_no_nan(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_no_nan(v) for v in obj)
    return True


@pytest.mark.parametrize("name", TYPES)
def test_round_trip(results, name):
    cls = next(t for t in results if t.__name__ == name)
    x = results[cls]
    assert type(x) is cls
    first = _through_text(x.to_json())
    back = cls.from_json(first)
    assert type(back) is cls
    if cls is Condition:        # its means (tensors) are not compared by ==: compare them here
        assert all(torch.allclose(back.means[l], x.means[l]) for l in x.means.values)
    assert _no_nan(first), f"{name}: the instance holds a NaN, which == cannot compare; make one without"
    assert back == x
    assert _through_text(back.to_json()) == first       # written again, the same JSON
    # every field was read back, not left at its default (compare=False fields included)
    for f in dataclasses.fields(cls):
        mine, theirs = getattr(back, f.name), getattr(x, f.name)
        if not isinstance(mine, (torch.Tensor, dict, Means)):
            assert mine == theirs, f"{name}.{f.name}"


def test_means_round_trip(results):
    """Means hold tensors (compared by value here; `==` on tensors is elementwise)."""
    means = results[Condition].means
    back = Means.from_json(_through_text(means.to_json()))
    assert back.describe() == means.describe()
    assert set(back.values) == set(means.values)
    assert all(torch.allclose(back[l], means[l].float()) for l in means.values)
    assert _through_text(back.to_json()) == _through_text(means.to_json())


def test_sizes_round_trip(tiny):
    """Sizes hold tensors: compared by value."""
    splits = build_probe(tiny.tokenizer, ProbeConfig(), n_attr=2, n_dev=3, n_test=0)
    sizes = component_sizes(tiny, list(splits.dev), reference="dev split")
    back = Sizes.from_json(_through_text(sizes.to_json()))
    assert back.describe() == sizes.describe() and set(back.values) == set(sizes.values)
    assert all(torch.allclose(back[l], sizes[l]) for l in sizes.values)
    assert _through_text(back.to_json()) == _through_text(sizes.to_json())


def test_label_scores_round_trip(tiny):
    """LabelScores hold arrays (the labels' log-probabilities, and those after each reference query): the
    same values back, and the same predictions under every readout."""
    task = load_task("sentiment_binary")
    prompts = build_prompts(task, tiny.tokenizer, shots=2, n=4, seed=0).prompts
    scores = score_labels(tiny, prompts, task.label_set(), references={"contextual": CONTENT_FREE})
    back = LabelScores.from_json(_through_text(scores.to_json()))
    assert back.labels == scores.labels and back.queries == scores.queries
    assert np.array_equal(back.logprobs, scores.logprobs)
    assert set(back.reference) == {"contextual"} and np.array_equal(back.reference["contextual"],
                                                                      scores.reference["contextual"])
    for readout in ("labels", "batch", "contextual"):
        assert back.predict(readout) == scores.predict(readout)
    assert _through_text(back.to_json()) == _through_text(scores.to_json())


def test_tensor_results_round_trip_through_their_files(tiny, tmp_path):
    """Attributions and CopyScores are tensors: `save` then `load` gives them back exactly."""
    splits = build_probe(tiny.tokenizer, ProbeConfig(), n_attr=2, n_dev=1, n_test=0)
    att = integrated_gradients(tiny, list(splits.attribution), steps=3)
    back, header = Attributions.load(att.save(tmp_path / "a.safetensors", {"n": 2}))
    assert header["n"] == 2
    for f in dataclasses.fields(Attributions):
        mine, theirs = getattr(back, f.name), getattr(att, f.name)
        assert torch.equal(mine, theirs) if isinstance(mine, torch.Tensor) else mine == theirs, f.name
    scores = CopyScores(att.values.mean(0), {"model": model_fingerprint(tiny), "note": "x"}, allowed_layers=(1,))
    again = CopyScores.load(scores.save(tmp_path / "s.scores.safetensors"))
    assert torch.equal(again.scores, scores.scores) and again.allowed_layers == (1,)
    assert again.meta["note"] == "x" and again.model == scores.model


def test_from_json_refuses_what_it_cannot_read():
    """A config from another version is refused (not silently dropped); a row without its spec too."""
    with pytest.raises(ValueError, match="unknown FindConfig settings"):
        FindConfig.from_json({**FindConfig().to_json(), "retired_setting": 1})
    with pytest.raises(ValueError, match="unknown ReproduceConfig settings"):
        ReproduceConfig.from_json({**ReproduceConfig().to_json(), "old": 2})
    row = {"task": "t", "condition": "unpruned", "n": 1, "accuracy": 1.0, "copy_rate": 0.0,
           "copy_share_of_errors": 0.0, "other_rate": 0.0, "accuracy_ci": [0.0, 1.0], "copy_rate_ci": [0.0, 1.0],
           "predictions": ["a"], "correct": [True], "copy": [False]}
    assert TaskResult.from_json(row).accuracy == 1.0
    with pytest.raises(ValueError, match="older mechcopy"):
        ResultRow.from_json(row)
