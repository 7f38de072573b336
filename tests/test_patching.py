"""Activation patching: identities (clean->clean = 1, corrupt->corrupt = 0, full resid_pre = 1),
agreement with transformer_lens.patching, corruptions, role alignment, neuron patching, Mamba."""

import random

import pytest
import torch

from mechcopy import patching as P
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.sites import neuron_site
from mechcopy.tasks.pairs import corrupt_prompt, token_roles
from mechcopy.tasks import Task
from mechcopy.tasks.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "lamp", "rock", "milk", "rain", "door",
         "leaf", "frog", "ship", "corn", "wolf", "hand", "ring", "salt", "wind", "star", "moon", "pear"]


def vowels(w):
    return str(sum(c in "aeiou" for c in w))


# same inputs, same line lengths, different rules: lets other_task keep token lengths equal
LENGTH = Task("length", tuple((w, str(len(w))) for w in WORDS))
VOWELS = Task("vowels", tuple((w, vowels(w)) for w in WORDS))
FIRSTLEN = Task("firstlen", tuple((w, str((ord(w[0]) - 96) % 10)) for w in WORDS))


@pytest.fixture(scope="module")
def pairs(tiny):
    return P.make_pairs(tiny, FIRSTLEN, "shuffled_labels", n=4, shots=3, seed=0)


@pytest.fixture(scope="module")
def metric(tiny, pairs):
    return P.NormalisedLogitDiff.from_runs(tiny, pairs.clean_tokens, pairs.corrupt_tokens, pairs.gold, pairs.ref)


def test_pairs_equal_length_and_aligned_roles(tiny, pairs):
    assert len(pairs) >= 2
    assert pairs.clean_tokens.shape == pairs.corrupt_tokens.shape
    for c in pairs.clean:
        assert tuple(token_roles(tiny.to_str_tokens(c.text), c)) == pairs.roles
    assert pairs.roles[0] == "BOS" and pairs.roles[-1] == "->q" and "y1" in pairs.roles
    for i, (c, x) in enumerate(zip(pairs.clean, pairs.corrupt)):
        assert sorted(c.demo_labels) == sorted(x.demo_labels)            # a permutation of the labels
        assert all(a != b for a, b in zip(c.demo_labels, x.demo_labels))  # a derangement
        assert c.query == x.query and c.answer == x.answer
        assert int(pairs.ref[i]) != int(pairs.gold[i])
        assert int(pairs.ref[i]) in {ids[0] for ids in x.demo_label_ids}


def test_token_roles_hand_made(tiny):
    p = make_prompt([("ab", "3"), ("c", "7")], ("de", "1"), tiny.tokenizer)
    assert token_roles(tiny.to_str_tokens(p.text), p) == ["BOS", "x1", "x1", "->1", "->1", "->1", "->1", "y1", "\\n1",
                                      "x2", "->2", "->2", "->2", "->2", "y2", "\\n2",
                                      "xq", "xq", "->q", "->q", "->q", "->q"]


def test_corruptions(tiny):
    tok, rng = tiny.tokenizer, random.Random(0)
    p = make_prompt([("cat", "3"), ("tree", "4"), ("fish", "4")], ("lamp", "4"), tok)
    g = corrupt_prompt(p, "gold_label", tok, rng)
    assert g.answer in g.demo_labels and sum(a != b for a, b in zip(g.demo_labels, p.demo_labels)) == 1
    assert len(tiny.to_tokens(g.text)[0]) == len(tiny.to_tokens(p.text)[0])
    p2 = make_prompt([("cat", "3"), ("tree", "4")], ("lamp", "4"), tok)
    o = corrupt_prompt(p2, "other_task", tok, rng, other_task=VOWELS)
    assert all(d in VOWELS.pairs for d in o.demos) and o.query == p2.query
    assert len(tiny.to_tokens(o.text)[0]) == len(tiny.to_tokens(p2.text)[0])
    with pytest.raises(ValueError, match="nothing to shuffle"):
        corrupt_prompt(make_prompt([("cat", "3"), ("dog", "3")], ("sun", "3"), tok), "shuffled_labels", tok, rng)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_prompt(p, "nonsense", tok, rng)
    pairs = P.make_pairs(tiny, LENGTH, "other_task", n=3, shots=2, seed=0, other_task=VOWELS)
    assert pairs.clean_tokens.shape == pairs.corrupt_tokens.shape


def test_identities(tiny, pairs, metric):
    clean, corrupt = pairs.clean_tokens, pairs.corrupt_tokens
    assert abs(metric(tiny(clean)).item() - 1) < 1e-5 and abs(metric(tiny(corrupt)).item()) < 1e-5
    comps = list(P.components(tiny))
    one = P.patch_sweep(tiny, clean, clean, metric, comps, skip_identical=False)
    zero = P.patch_sweep(tiny, corrupt, corrupt, metric, comps, skip_identical=False)
    assert one.shape == (3, tiny.cfg.n_layers, clean.shape[1])
    torch.testing.assert_close(one, torch.ones_like(one), atol=1e-4, rtol=0)
    torch.testing.assert_close(zero, torch.zeros_like(zero), atol=1e-4, rtol=0)
    _, cache = tiny.run_with_cache(clean)
    for layer in range(tiny.cfg.n_layers):   # the whole residual stream entering any block carries everything
        got = P.patched_metric(tiny, cache, corrupt, metric, [f"blocks.{layer}.hook_resid_pre"])
        assert abs(got - 1) < 1e-4
    # ...but one position of it does not (the test above is not vacuous)
    part = P.patched_metric(tiny, cache, corrupt, metric, ["blocks.0.hook_resid_pre"], positions=[1])
    assert abs(part - 1) > 1e-3


def test_own_loop_agrees_with_transformer_lens(tiny, pairs, metric):
    ours = P.patch_sweep(tiny, pairs.clean_tokens, pairs.corrupt_tokens, metric)
    ours_full = P.patch_sweep(tiny, pairs.clean_tokens, pairs.corrupt_tokens, metric, skip_identical=False)
    theirs = P.tl_patch_sweep(tiny, pairs.clean_tokens, pairs.corrupt_tokens, metric)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_full, theirs, atol=1e-4, rtol=1e-4)
    # the last position's residual stream entering the last block decides little alone, but not nothing
    assert ours.abs().max() > 1e-3


def test_neuron_patching_matches_hand_hook(tiny, pairs, metric):
    neurons = NeuronSet(((0, 3), (0, 10), (1, 7)), model_fingerprint(tiny))
    all_pos, by_pos = P.patch_neurons(tiny, neurons, pairs.clean_tokens, pairs.corrupt_tokens, metric)
    _, cache = tiny.run_with_cache(pairs.clean_tokens)

    def hand(layer, idx, pos):
        def hook(act, hook):
            act = act.clone()
            act[:, pos, idx] = cache[hook.name][:, pos, idx]
            return act
        return (neuron_site(tiny, layer), hook)

    def run(pos):
        hooks = [hand(0, [3, 10], pos), hand(1, [7], pos)]
        return metric(tiny.run_with_hooks(pairs.corrupt_tokens, fwd_hooks=hooks)).item()

    assert abs(all_pos - run(slice(None))) < 1e-5
    for p in (0, 5, pairs.clean_tokens.shape[1] - 1):
        assert abs(by_pos[p].item() - run([p])) < 1e-5
    assert by_pos.shape == (pairs.clean_tokens.shape[1],)


def test_activation_patching_result(tiny):
    r = P.activation_patching(tiny, FIRSTLEN, "shuffled_labels", n=3, shots=3, seed=0)
    arr = r.array()
    assert arr.shape == (3, tiny.cfg.n_layers, len(r.roles)) and r.components == ("resid_pre", "attn_out", "mlp_out")
    j = r.to_json()
    assert j["settings"]["reference"].startswith("copied label") and j["model"]["name"] == tiny.cfg.model_name
    r_tl = P.activation_patching(tiny, FIRSTLEN, "shuffled_labels", n=3, shots=3, seed=0, method="tl")
    torch.testing.assert_close(r_tl.array(), arr, atol=1e-4, rtol=1e-4)


def test_same_api_on_mamba():
    mamba = pytest.importorskip("mechcopy.models.mamba")
    model = mamba.tiny_mamba(seed=0)
    r = P.activation_patching(model, FIRSTLEN, "shuffled_labels", n=3, shots=3, seed=0)
    assert r.components == ("resid_pre", "mixer_out")
    pairs = P.make_pairs(model, FIRSTLEN, "shuffled_labels", n=3, shots=3, seed=0)
    metric = P.NormalisedLogitDiff.from_runs(model, pairs.clean_tokens, pairs.corrupt_tokens, pairs.gold, pairs.ref)
    one = P.patch_sweep(model, pairs.clean_tokens, pairs.clean_tokens, metric, skip_identical=False)
    torch.testing.assert_close(one, torch.ones_like(one), atol=1e-4, rtol=0)
    _, cache = model.run_with_cache(pairs.clean_tokens)
    assert abs(P.patched_metric(model, cache, pairs.corrupt_tokens, metric, ["blocks.0.hook_resid_pre"]) - 1) < 1e-4
