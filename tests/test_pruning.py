"""Pruning: hook == weight edit, random baselines, selection modes, the k sweep, bad inputs."""

import copy

import pytest
import torch

from mechcopy import method
from mechcopy.attribution import CopyScores
from mechcopy.components import random_matched
from mechcopy.conditions import UNPRUNED, Condition, standard_conditions
from mechcopy.hooks import capture as hooks_capture
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.pruning import component_means, condition_hooks, grouped_hooks, prune_weights, pruned, pruning_hooks
from mechcopy.selection import bottom_set, select
from mechcopy.sites import neuron_site, neurons_per_layer
from mechcopy.sweeps import sweep_k


def _set(model, pairs, **meta):
    return NeuronSet(tuple(pairs), model_fingerprint(model), meta)


def _scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CopyScores(torch.rand(model.cfg.n_layers, neurons_per_layer(model), generator=g),
                      {"model": model_fingerprint(model)})


TEXT = "pear -> 2\nfig -> 1\nplum -> "


@pytest.mark.parametrize("which", ["tiny3", "mamba"])
def test_hook_equals_weight_edit(which, request):
    model = request.getfixturevalue(which)
    ns = _set(model, [(0, 1), (0, 5), (1, 7), (1, 30)])
    with torch.no_grad():
        clean = model(TEXT)
        with pruned(model, ns):
            hooked = model(TEXT)
        again = model(TEXT)
        edited = copy.deepcopy(model)
        prune_weights(edited, ns)
        weight = edited(TEXT)
    assert torch.equal(clean, again), "the context manager must remove its hooks"
    assert not torch.allclose(clean, hooked)
    assert torch.allclose(hooked, weight, atol=1e-6, rtol=0)


def test_hooks_zero_exactly_the_selected_neurons(tiny3):
    ns = _set(tiny3, [(1, 3), (1, 9), (2, 0)])
    hooks = pruning_hooks(tiny3, ns)
    assert [h[0] for h in hooks] == [neuron_site(tiny3, 1), neuron_site(tiny3, 2)]
    with torch.no_grad():
        _, clean = tiny3.run_with_cache(TEXT)
        with pruned(tiny3, ns):
            _, cache = tiny3.run_with_cache(TEXT)
    post = cache[neuron_site(tiny3, 1)]
    assert (post[..., [3, 9]] == 0).all()
    keep = [i for i in range(64) if i not in (3, 9)]
    assert torch.equal(post[..., keep], clean[neuron_site(tiny3, 1)][..., keep])
    assert torch.equal(cache[neuron_site(tiny3, 0)], clean[neuron_site(tiny3, 0)])


def test_random_matched_keeps_layer_counts_and_varies(tiny3):
    ns = _set(tiny3, [(0, 1), (0, 2), (0, 3), (2, 10)])
    r0, r1, r0b = (random_matched(tiny3, ns, s) for s in (0, 1, 0))
    for r in (r0, r1):
        assert r.layer_counts(3) == ns.layer_counts(3)
        assert not set(r.neurons) & set(ns.neurons)
    assert r0.neurons != r1.neurons
    assert r0.neurons == r0b.neurons
    assert r0.meta["seed"] == 0


def test_selection_modes(tiny3):
    sc = _scores(tiny3)
    s = sc.scores
    top = select(sc, "global", k=5)
    assert len(top) == 5
    cut = torch.topk(s.flatten(), 5).values.min()
    assert all(s[l, i] >= cut for l, i in top.neurons)
    assert top.meta["selection"] == "global" and top.meta["k"] == 5
    per = select(sc, "per-layer", k=3)
    assert per.layer_counts(3) == [3, 3, 3]
    for l, i in per.neurons:
        assert s[l, i] >= torch.topk(s[l], 3).values.min()
    th = select(sc, "threshold", threshold=0.9)
    assert set(th.neurons) == {(int(l), int(i)) for l, i in (s >= 0.9).nonzero()}
    bot = bottom_set(sc, 5)
    assert max(float(s[l, i]) for l, i in bot.neurons) <= float(torch.topk(-s.flatten(), 5).values.neg().max())
    with pytest.raises(ValueError):
        select(sc, "global", k=0)
    with pytest.raises(ValueError):
        select(sc, "threshold", threshold=2.0)
    with pytest.raises(ValueError):
        select(sc, "sideways", k=3)


def test_standard_conditions(tiny3):
    sc = _scores(tiny3)
    ns = select(sc, "global", k=6)
    conds = standard_conditions(tiny3, ns, n_random=3, seed=10, scores=sc)
    assert [c.label for c in conds] == ["pruned", "random-10", "random-11", "random-12", "bottom"]
    assert [c.family for c in conds] == ["pruned", "random", "random", "random", "bottom"]
    assert [c.seed for c in conds] == [None, 10, 11, 12, None]
    assert [c.label for c in standard_conditions(tiny3, ns, n_random=1)] == ["pruned", "random-0"]
    assert conds[0].components == ns and conds[2].components == random_matched(tiny3, ns, 11)
    assert conds[-1].components == bottom_set(sc, 6)
    for c in conds:
        assert [site for site, _ in condition_hooks(tiny3, c)] == [neuron_site(tiny3, l) for l in c.components.by_layer()]
    grouped = standard_conditions(tiny3, ns, n_random=1, group=20)
    assert [c.label for c in grouped] == ["pruned@20", "random-0@20"] and grouped[0].describe()["name"] == "pruned"
    assert condition_hooks(tiny3, UNPRUNED) == []


def test_grouped_hooks(tiny3):
    """One hook per neuron site; row group g ablates condition g's neurons (zero, or to their means, at
    every position or the last); the fork is the first ablated layer."""
    from mechcopy.conditions import Means

    a, b, c = _set(tiny3, [(1, 3), (2, 5)]), _set(tiny3, [(2, 7), (2, 8)]), _set(tiny3, [(2, 1)])
    means = Means({l: torch.arange(64.0) + 100 * l for l in range(3)}, reference="test")
    conds = [UNPRUNED, Condition("a", components=a), Condition("b", components=b, ablation="mean", means=means),
             Condition("c", components=c, positions="last")]
    fork_at, hooks = grouped_hooks(tiny3, conds)
    assert fork_at == 1 and [site for site, _ in hooks] == [neuron_site(tiny3, 1), neuron_site(tiny3, 2)]
    act = torch.randn(4 * 2, 5, 64)  # 4 groups of 2 rows
    out = hooks[1][1](act, None).reshape(4, 2, 5, 64)
    want = act.reshape(4, 2, 5, 64).clone()
    want[1, ..., 5] = 0
    want[2, ..., 7], want[2, ..., 8] = 207.0, 208.0
    want[3, :, -1, 1] = 0
    assert torch.equal(out, want)
    assert grouped_hooks(tiny3, [UNPRUNED]) == (tiny3.cfg.n_layers, [])


def test_bad_inputs(tiny3, mamba, tmp_path):
    other = _set(mamba, [(0, 1)])
    with pytest.raises(ValueError, match="another model"):
        pruning_hooks(tiny3, other)
    with pytest.raises(ValueError, match="out of range: the model the set names has 3 layers of 64"):
        _set(tiny3, [(0, 64)])          # the fingerprint's sizes: refused when the set is made, before any model
    with pytest.raises(ValueError, match="out of range"):
        _set(tiny3, [(3, 0)])
    assert standard_conditions(tiny3, _set(tiny3, [], k=0)) == []   # k = 0: nothing to prune, no conditions
    ns = _set(tiny3, [(0, 1)])
    path = ns.save(tmp_path / "n.json")
    with pytest.raises(ValueError, match="another model"):
        with pruned(mamba, NeuronSet.load(path)):
            pass


def test_sweep_picks_best_feasible_k(tiny3):
    from mechcopy.tasks.probe import probe_splits

    _, dev = probe_splits(tiny3.tokenizer, n_attr=2, n_dev=6)
    sc = _scores(tiny3)
    sw = sweep_k(tiny3, sc, dev, ks=[2, 4, 150, 500], max_ppl_increase=0.5, n_tokens=256)
    assert [r["k"] for r in sw.rows] == [2, 4, 150]  # 500 > 192 neurons: dropped
    feasible = [r for r in sw.rows if r["ppl_increase"] <= 0.5]
    assert all(r["feasible"] == (r in feasible) for r in sw.rows)
    best = max((r["dev_accuracy"] for r in feasible), default=None)
    best_k = min(r["k"] for r in feasible if r["dev_accuracy"] == best) if feasible else None
    assert sw.best_pruned_k == best_k
    assert sw.chosen_k == (best_k if feasible and best > sw.baseline["dev_accuracy"] else 0)
    assert sw.baseline["ppl_increase"] == 0.0
    assert sw.to_json()["rows"][0]["k"] == 2
    tight = sweep_k(tiny3, sc, dev, ks=[150], max_ppl_increase=-1.0, n_tokens=256)
    assert tight.chosen_k == 0 and tight.best_pruned_k is None and "bound" in tight.why


def test_sweep_with_a_general_accuracy_bound(tiny3):
    """The bound for models that read no English: accuracy drop on general prompts, no perplexity."""
    from mechcopy.evaluation import evaluate
    from mechcopy.tasks.probe import probe_splits

    _, dev = probe_splits(tiny3.tokenizer, n_attr=2, n_dev=6)
    _, general = probe_splits(tiny3.tokenizer, n_attr=2, n_dev=8, seed=5)
    sc = _scores(tiny3)
    sw = sweep_k(tiny3, sc, dev, ks=[2, 50, 150], max_ppl_increase=None, general_prompts=general,
                 max_general_drop=0.1)
    base = evaluate(tiny3, general).accuracy
    assert sw.baseline["general_accuracy"] == base and "ppl" not in sw.baseline
    for r in sw.rows:
        acc = evaluate(tiny3, general, fwd_hooks=pruning_hooks(tiny3, select(sc, "global", k=r["k"]))).accuracy
        assert r["general_accuracy"] == acc and r["feasible"] == (acc >= base - 0.1) and "ppl" not in r
    feasible = [r for r in sw.rows if r["feasible"]]
    best = max((r["dev_accuracy"] for r in feasible), default=None)
    assert sw.best_pruned_k == (min(r["k"] for r in feasible if r["dev_accuracy"] == best) if feasible else None)
    assert sw.chosen_k in (0, sw.best_pruned_k)
    assert sw.to_json()["max_general_drop"] == 0.1 and sw.text is None
    with pytest.raises(ValueError, match="bound"):
        sweep_k(tiny3, sc, dev, ks=[2], max_ppl_increase=None)


def test_find_pipeline_and_resume(tiny3, tmp_path, monkeypatch, best_k_chosen):
    """`find` end to end on the tiny model; an interrupted run resumes and gives the same result."""
    from mechcopy.find import FindConfig, find_copy_neurons

    # the guard and the gate off: on a random tiny model they may refuse every k (tested in test_audit)
    config = FindConfig(n=4, n_dev=4, shots=2, steps=3, ks=(2, 4), max_ppl_increase=10.0, ppl_tokens=128,
                        checkpoint_every=2, consistency_random=0, max_completeness_error=None)
    full = find_copy_neurons(tiny3, tmp_path / "a.json", config, progress=False)
    assert len(full) == full.meta["sweep"]["chosen_k"]
    assert NeuronSet.load(tmp_path / "a.json").neurons == full.neurons
    scores = CopyScores.load(full.meta["scores_path"])
    assert select(scores, "global", k=len(full)).neurons == full.neurons
    assert [c.label for c in standard_conditions(tiny3, full, n_random=1)] == ["pruned", "random-0", "bottom"]

    real, calls = method.ATTRIBUTIONS["ig"], []

    def flaky(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setitem(method.ATTRIBUTIONS, "ig", flaky)
    with pytest.raises(KeyboardInterrupt):
        find_copy_neurons(tiny3, tmp_path / "b.json", config, progress=False)
    calls.clear()
    monkeypatch.setitem(method.ATTRIBUTIONS, "ig", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    resumed = find_copy_neurons(tiny3, tmp_path / "b.json", config, progress=False)
    assert calls == [2], "the resumed run attributes only the prompts the checkpoint lacks"
    assert resumed.neurons == full.neurons
    assert torch.equal(CopyScores.load(resumed.meta["scores_path"]).scores, scores.scores)


def test_find_cli_registered():
    from mechcopy.commands import build_parser

    from mechcopy.commands.common import config_from_args
    from mechcopy.find import FindConfig

    args = build_parser().parse_args(["find", "--out", "x.json", "--attribution", "gradxact", "--ks", "3,7"])
    assert args.attribution == "gradxact" and args.n == 200 and args.steps == 20 and args.target == "contrast"
    # every flag feeds the config field of the same name
    assert config_from_args(FindConfig, args) == FindConfig(attribution="gradxact", ks=(3, 7))


def test_conditions_hash_the_weights_once(monkeypatch):
    """Checking 13 neuron sets against one model hashes its weights once (the fingerprint is cached)."""
    import mechcopy.fingerprint
    from mechcopy.models.tiny import tiny_transformer

    model = tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=7)   # a fresh object: nothing cached
    real, calls = mechcopy.fingerprint.weight_hash, []
    monkeypatch.setattr(mechcopy.fingerprint, "weight_hash", lambda m: (calls.append(1), real(m))[1])
    ns = NeuronSet(((0, 1), (1, 2), (1, 5)), model_fingerprint(model))
    scores = CopyScores(torch.rand(2, 64), {"model": model_fingerprint(model)})
    conds = standard_conditions(model, ns, n_random=5, seed=0, scores=scores)
    assert [c.label for c in conds] == ["pruned"] + [f"random-{s}" for s in range(5)] + ["bottom"]
    for c in conds:
        condition_hooks(model, c)
    grouped_hooks(model, conds)
    assert len(calls) == 1


def test_find_config_names_its_probe(tiny3):
    """`method.prompts`: the classic probe, or the balanced one (uniform gold, no gold among the demos),
    with the attribution and dev queries disjoint; a test split drawn after them changes neither."""
    from collections import Counter

    from mechcopy.find import FindConfig

    config = FindConfig(n=12, n_dev=12, probe="balanced", probe_items="words")
    probe = method.prompts(tiny3.tokenizer, config)
    attr, dev = probe.attribution, probe.dev
    assert len(attr) == len(dev) == 12 and not {p.query for p in attr} & {p.query for p in dev} and not probe.test
    assert set(Counter(p.answer for p in attr).values()) == {2}          # 12 prompts over counts 1..6
    assert all(p.answer not in p.demo_labels and len(set(p.demo_labels)) == 4 for p in attr + dev)
    with_test = method.prompts(tiny3.tokenizer, config, n_test=6)
    assert (with_test.attribution, with_test.dev) == (attr, dev) and len(with_test.test) == 6
    classic = method.prompts(tiny3.tokenizer, FindConfig(n=12, n_dev=12, probe="classic"))
    assert classic.attribution[0].task == "copy_probe" and not classic.attribution[0].label_space
    classic_test = method.prompts(tiny3.tokenizer, FindConfig(n=12, n_dev=12, probe="classic"), n_test=5)
    assert (classic_test.attribution, classic_test.dev) == (classic.attribution, classic.dev)
    assert len(classic_test.test) == 5 and not {p.query for p in classic_test.test} & {p.query for p in classic.dev}
    with pytest.raises(ValueError, match="probe_items"):
        FindConfig(probe="balanced", probe_items="cities")


PROMPTS_FOR_MEANS = ["pear -> 2\nfig -> 1\nplum -> ", "a b c -> 3\nab -> 2\nx y z w -> ", "kiwi -> 1\nplum -> "]


@pytest.mark.parametrize("which", ["tiny3", "mamba"])
def test_neuron_means_against_a_cache(which, request):
    """The mean over every position of every prompt, from run_with_cache prompt by prompt."""
    from types import SimpleNamespace

    model = request.getfixturevalue(which)
    prompts = [SimpleNamespace(text=t) for t in PROMPTS_FOR_MEANS + PROMPTS_FOR_MEANS[:1]]
    means = component_means(model, prompts, batch_size=2, reference="four prompts")
    assert means.describe() == {"kind": "neuron", "positions": "all", "reference": "four prompts", "n_prompts": 4}
    with torch.no_grad():
        caches = [model.run_with_cache(p.text)[1] for p in prompts]
    last = component_means(model, prompts, positions="last", batch_size=2)
    for layer in range(model.cfg.n_layers):
        acts = torch.cat([c[neuron_site(model, layer)][0] for c in caches])      # [all positions, d]
        assert torch.allclose(means[layer], acts.mean(0), atol=1e-5)
        at_last = torch.stack([c[neuron_site(model, layer)][0, -1] for c in caches])
        assert torch.allclose(last[layer], at_last.mean(0), atol=1e-5)
    # at the last position only: earlier positions keep their activations, the last one gets the means
    ns = _set(model, [(0, 1), (1, 7)])
    store = {}
    with torch.no_grad():
        model.run_with_hooks(prompts[0].text, fwd_hooks=pruning_hooks(model, ns, "mean", "last", last)
                             + [(neuron_site(model, 1), hooks_capture(store))])
    got, ref = store[neuron_site(model, 1)][0], caches[0][neuron_site(model, 1)][0]
    assert torch.allclose(got[-1, 7], last[1][7]) and torch.allclose(got[:-1, 7], ref[:-1, 7], atol=1e-6)
    with pytest.raises(ValueError, match="at least one prompt"):
        component_means(model, [])


def test_mean_ablation_equals_a_weight_edit(tiny3):
    """Setting neurons to constants m: zero their W_out rows and add m @ W_out[idx] to b_out, by hand
    and by `prune_weights(..., means)`."""
    from types import SimpleNamespace

    from mechcopy.conditions import Means

    means = component_means(tiny3, [SimpleNamespace(text=t) for t in PROMPTS_FOR_MEANS])
    ns = _set(tiny3, [(0, 1), (0, 5), (1, 7), (2, 30)])
    edited, by_kind = copy.deepcopy(tiny3), copy.deepcopy(tiny3)
    prune_weights(by_kind, ns, means)
    with torch.no_grad():
        for layer, idx in ns.by_layer().items():
            mlp = edited.blocks[layer].mlp
            mlp.b_out += means[layer][idx] @ mlp.W_out[idx]
            mlp.W_out[idx] = 0
        hooked = tiny3.run_with_hooks(TEXT, fwd_hooks=pruning_hooks(tiny3, ns, "mean", means=means))
        zeroed = tiny3.run_with_hooks(TEXT, fwd_hooks=pruning_hooks(tiny3, ns))
        assert torch.allclose(hooked, edited(TEXT), atol=1e-5, rtol=0)
        assert torch.allclose(hooked, by_kind(TEXT), atol=1e-5, rtol=0)
        assert not torch.allclose(hooked, zeroed, atol=1e-3)
        zero_means = Means({layer: torch.zeros_like(m) for layer, m in means.values.items()})
        assert torch.equal(tiny3.run_with_hooks(TEXT, fwd_hooks=pruning_hooks(tiny3, ns, "mean", means=zero_means)),
                           zeroed)
        assert torch.equal(tiny3.run_with_hooks(TEXT, fwd_hooks=pruning_hooks(tiny3, ns, "zero", "last")),
                           tiny3.run_with_hooks(TEXT, fwd_hooks=pruning_hooks(tiny3, ns, "mean", "last", zero_means)))
    with pytest.raises(ValueError, match="means"):
        pruning_hooks(tiny3, ns, "mean")
    with pytest.raises(ValueError, match="means"):
        Condition("x", components=ns, ablation="mean")
