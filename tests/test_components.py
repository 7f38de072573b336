"""Components of a kind (neurons, heads), their files, conditions and means: hook == weight edit for
every kind and ablation, one pass == separate runs, and what each kind refuses."""

import copy
import json

import pytest
import torch

from mechcopy.components import KINDS, Components, component_kind, random_matched
from mechcopy.conditions import UNPRUNED, Condition, Means, standard_conditions
from mechcopy.evaluation import predict, predict_conditions
from mechcopy.fingerprint import model_fingerprint
from mechcopy.models.tiny import tiny_transformer
from mechcopy.pruning import component_means, condition_hooks, prune_weights, pruning_hooks
from mechcopy.tasks.probe import probe_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "pear -> 2\nfig -> 1\nplum -> "


@pytest.fixture(scope="module", params=[{}, {"n_key_value_heads": 2}, {"use_normalization_before_and_after": True}],
                ids=["mha", "gqa", "post-norm"])
def heads_model(request):
    """Tiny transformers: plain attention, grouped-query attention (SmolLM2, Gemma), and Gemma's norm
    after attention (a head's output goes through it, so only an edit before it is exact)."""
    return tiny_transformer(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=3, **request.param)


def _heads(model, pairs):
    return Components(tuple(pairs), model_fingerprint(model), kind="head")


def test_the_registry():
    assert set(KINDS) == {"neuron", "head"} and component_kind("head").axis == -2
    with pytest.raises(ValueError, match="unknown component kind 'unit'; known: neuron, head"):
        component_kind("unit")
    with pytest.raises(ValueError, match="unknown component kind"):
        Components(((0, 1),), {}, kind="unit")


def test_files_keep_their_format_and_kind(tiny3, tmp_path):
    """A neuron file is what it always was (`neurons`); a head file lists `heads`; both load back."""
    fp = model_fingerprint(tiny3)
    neurons = Components(((1, 3), (0, 2)), fp, {"k": 2})
    assert json.loads(neurons.save(tmp_path / "n.json").read_text()) == {
        "model": fp, "neurons": [[0, 2], [1, 3]], "meta": {"k": 2}}
    old = {"model": fp, "neurons": [[0, 2], [1, 3]], "meta": {"k": 2}}     # a file written before kinds
    assert Components.from_json(old) == neurons and neurons.neurons == neurons.pairs
    heads = _heads(tiny3, [(2, 1), (0, 3)])
    loaded = Components.load(heads.save(tmp_path / "h.json"))
    assert loaded == heads and loaded.kind == "head" and "heads" in json.loads((tmp_path / "h.json").read_text())
    with pytest.raises(AttributeError, match="use .pairs"):
        heads.neurons
    with pytest.raises(ValueError, match="one kind"):
        Components.from_json({**old, "heads": [[0, 1]]})
    loaded.check(tiny3)
    with pytest.raises(ValueError, match=r"head \(0, 4\) is out of range: the model the set names has 3 layers of 4 "
                                         "heads"):
        _heads(tiny3, [(0, 4)])      # the fingerprint's sizes: refused before any model is at hand
    older = {k: v for k, v in fp.items() if k != "n_heads"}           # a fingerprint that records no heads
    with pytest.raises(IndexError, match=r"head \(0, 4\) out of range: the model has 3 layers of 4 heads"):
        Components(((0, 4),), older, kind="head").check(tiny3)


def test_mamba_has_no_heads(mamba):
    heads = _heads(mamba, [(0, 1)])
    with pytest.raises(ValueError, match="this model has no heads: a mamba model has no attention"):
        heads.check(mamba)
    with pytest.raises(ValueError, match="no heads"):
        component_means(mamba, [type("P", (), {"text": TEXT})()], kind="head")


def test_random_matched_heads_keep_layer_counts(tiny3):
    heads = _heads(tiny3, [(0, 1), (0, 2), (2, 0)])
    r = random_matched(tiny3, heads, 5)
    assert r.kind == "head" and r.layer_counts(3) == heads.layer_counts(3) and not set(r.pairs) & set(heads.pairs)


def _head_means(model):
    prompts = list(probe_prompts(model.tokenizer, n=5, shots=2, seed=1))
    return component_means(model, prompts, kind="head", reference="5 probe prompts")


def test_head_means_against_a_cache(tiny3):
    prompts = list(probe_prompts(tiny3.tokenizer, n=5, shots=2, seed=1))
    means = component_means(tiny3, prompts, kind="head", batch_size=2)
    last = component_means(tiny3, prompts, kind="head", positions="last", batch_size=2)
    with torch.no_grad():
        caches = [tiny3.run_with_cache(p.text)[1] for p in prompts]
    for layer in range(3):
        z = torch.cat([c[f"blocks.{layer}.attn.hook_z"][0] for c in caches])        # [positions, head, d_head]
        assert means[layer].shape == (4, 8) and torch.allclose(means[layer], z.mean(0), atol=1e-5)
        at_last = torch.stack([c[f"blocks.{layer}.attn.hook_z"][0, -1] for c in caches])
        assert torch.allclose(last[layer], at_last.mean(0), atol=1e-5)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_head_hooks_equal_the_weight_edit(heads_model, ablation):
    """Zeroing heads' z equals zeroing their rows of W_O; setting z to its mean equals that plus
    mean_z @ W_O in b_O."""
    model = heads_model
    heads = _heads(model, [(0, 1), (1, 0), (1, 3), (2, 2)])
    means = _head_means(model) if ablation == "mean" else None
    edited = copy.deepcopy(model)
    prune_weights(edited, heads, means)
    with torch.no_grad():
        clean = model(TEXT)
        hooked = model.run_with_hooks(TEXT, fwd_hooks=pruning_hooks(model, heads, ablation, means=means))
        assert torch.allclose(hooked, edited(TEXT), atol=1e-5, rtol=0)
        assert not torch.allclose(hooked, clean, atol=1e-3)
        # by hand: the heads' z, read off the cache, are what the hook wrote
        _, cache = model.run_with_cache(TEXT, names_filter=lambda n: n.endswith("hook_z"))
        with model.hooks(fwd_hooks=pruning_hooks(model, heads, ablation, means=means)):
            _, ablated = model.run_with_cache(TEXT, names_filter=lambda n: n.endswith("hook_z"))
    z, ref = ablated["blocks.0.attn.hook_z"][0], cache["blocks.0.attn.hook_z"][0]    # layer 0: head 1 ablated
    want = torch.zeros(z.shape[0], 8) if means is None else means[0][1].expand(z.shape[0], 8)
    assert torch.allclose(z[:, 1], want, atol=1e-6)
    assert torch.equal(z[:, [0, 2, 3]], ref[:, [0, 2, 3]])


def test_head_hooks_at_the_last_position(tiny3):
    heads = _heads(tiny3, [(1, 2)])
    means = _head_means(tiny3)
    with torch.no_grad():
        _, clean = tiny3.run_with_cache(TEXT, names_filter="blocks.1.attn.hook_z")
        with tiny3.hooks(fwd_hooks=pruning_hooks(tiny3, heads, "mean", "last", means)):
            _, cache = tiny3.run_with_cache(TEXT, names_filter="blocks.1.attn.hook_z")
    z, ref = cache["blocks.1.attn.hook_z"][0], clean["blocks.1.attn.hook_z"][0]
    assert torch.allclose(z[-1, 2], means[1][2]) and torch.allclose(z[:-1], ref[:-1])
    assert torch.allclose(z[-1, :2], ref[-1, :2])


def test_one_pass_with_heads_and_neurons_equals_separate_runs(heads_model):
    """Head and neuron conditions, zero and mean, every position and the last, in one forked pass."""
    model = heads_model
    fp = model_fingerprint(model)
    prompts = list(probe_prompts(model.tokenizer, n=10, shots=3, seed=2))
    head_means, neuron_means = _head_means(model), component_means(model, prompts[:4])
    heads = _heads(model, [(1, 0), (1, 2), (2, 3)])
    neurons = Components(tuple((l, i) for l in (0, 2) for i in range(0, 64, 3)), fp)
    conds = [UNPRUNED, Condition("heads", components=heads),
             Condition("heads-mean", components=heads, ablation="mean", means=head_means),
             Condition("heads-last", components=heads, positions="last"),
             Condition("neurons-mean", components=neurons, ablation="mean", means=neuron_means),
             *standard_conditions(model, heads, n_random=1, seed=0)]
    assert [c.label for c in conds][-2:] == ["pruned", "random-0"] and conds[-1].components.kind == "head"
    one_pass = predict_conditions(model, prompts, conds, batch_size=20)
    for c in conds:
        assert one_pass[c.label] == predict(model, prompts, fwd_hooks=condition_hooks(model, c), pad=False), c.label


def test_condition_fields_and_round_trip(tiny3):
    fp = model_fingerprint(tiny3)
    means = component_means(tiny3, list(probe_prompts(tiny3.tokenizer, n=3, shots=2)), reference="3 prompts")
    comps = Components(((0, 1), (2, 5)), fp, {"k": 2})
    c = Condition("pruned", "pruned", comps, "mean", "last", means, None, 20)
    assert c.label == "pruned@20" and c.ablates and not UNPRUNED.ablates and UNPRUNED.family == "unpruned"
    assert c.describe() == {"name": "pruned", "family": "pruned", "group": 20, "kind": "neuron", "n_components": 2,
                            "ablation": "mean", "positions": "last", "seed": None,
                            "means": {"kind": "neuron", "positions": "all", "reference": "3 prompts", "n_prompts": 3},
                            "readout": {"scoring": "generate", "calibration": None}, "versus": []}
    back = Condition.from_json(json.loads(json.dumps(c.to_json())))
    assert back == c and back.components.pairs == comps.pairs
    assert all(torch.allclose(back.means[l], means[l]) for l in range(3))
    assert Means.from_json(means.to_json()).describe() == means.describe()
    for bad, match in ((dict(ablation="half"), "unknown ablation"), (dict(positions="first"), "unknown positions"),
                       (dict(means=means), "means are for mean ablation")):
        with pytest.raises(ValueError, match=match):
            Condition("x", components=comps, **bad)
    heads = _heads(tiny3, [(0, 1)])
    with pytest.raises(ValueError, match="means of neurons for a set of heads"):
        Condition("x", components=heads, ablation="mean", means=means)
