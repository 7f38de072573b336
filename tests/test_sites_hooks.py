"""Neuron sites, NeuronSet and the named hook functions on a tiny model."""

import pytest
import torch

from mechcopy import hooks
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.sites import neuron_site, neurons_per_layer


def test_neuron_site(tiny):
    assert neuron_site(tiny, 1) == "blocks.1.mlp.hook_post"
    assert neurons_per_layer(tiny) == 64
    with pytest.raises(IndexError, match="2 layers"):
        neuron_site(tiny, 2)


def test_zero_neurons_hook_equals_zeroing_w_out(tiny):
    tokens = tiny.to_tokens("abc -> 3\nxyz ->")
    idx = torch.tensor([1, 5, 7])
    hooked = tiny.run_with_hooks(tokens, fwd_hooks=[(neuron_site(tiny, 0), hooks.zero_neurons(idx))])
    w = tiny.blocks[0].mlp.W_out.data
    saved = w[idx].clone()
    w[idx] = 0
    try:
        edited = tiny(tokens)
    finally:
        w[idx] = saved
    assert torch.allclose(hooked, edited, atol=1e-6)
    assert not torch.allclose(hooked, tiny(tokens), atol=1e-4)


def test_set_neurons_sets_exactly_those_neurons(tiny):
    tokens = tiny.to_tokens("abc -> 3\nxyz ->")
    site = neuron_site(tiny, 1)
    _, clean = tiny.run_with_cache(tokens)
    store = {}
    tiny.run_with_hooks(tokens, fwd_hooks=[(site, hooks.set_neurons([2, 9], torch.tensor([1.5, -4.0]))),
                                           (site, hooks.capture(store))])
    got, ref = store[site], clean[site]
    assert (got[..., 2] == 1.5).all() and (got[..., 9] == -4.0).all()
    keep = [i for i in range(64) if i not in (2, 9)]
    assert torch.equal(got[..., keep], ref[..., keep])
    store = {}
    tiny.run_with_hooks(tokens, fwd_hooks=[(site, hooks.set_neurons([2], torch.tensor([1.5]), position=-1)),
                                           (site, hooks.capture(store))])
    assert (store[site][:, -1, 2] == 1.5).all() and torch.equal(store[site][:, :-1], ref[:, :-1])
    assert torch.equal(store[site][:, -1, 3:], ref[:, -1, 3:])
    with pytest.raises(ValueError, match="one value per index"):
        hooks.set_neurons([1, 2], torch.tensor([0.0]))
    with pytest.raises(IndexError, match=">= 0"):
        hooks.set_neurons([-1], torch.tensor([0.0]))
    with pytest.raises(IndexError, match="neuron index 64 out of range"):
        tiny.run_with_hooks(tokens, fwd_hooks=[(site, hooks.set_neurons([64], torch.tensor([0.0])))])


def test_patch_and_capture(tiny):
    a, b = tiny.to_tokens("abc -> 3"), tiny.to_tokens("xyz -> 4")
    _, cache_a = tiny.run_with_cache(a)
    site = "blocks.1.hook_resid_pre"
    # patching every position from a's cache into b's run at the input of the last block reproduces a
    patched = tiny.run_with_hooks(b, fwd_hooks=[(site, hooks.patch_from_cache(cache_a))])
    assert torch.allclose(patched, tiny(a), atol=1e-5)
    store = {}
    tiny.run_with_hooks(a, fwd_hooks=[(site, hooks.capture(store))])
    assert torch.equal(store[site], cache_a[site])
    # inject_vector at the last position = patching only that position
    vec = cache_a[site][0, -1]
    injected = tiny.run_with_hooks(b, fwd_hooks=[(site, hooks.inject_vector(vec, -1))])
    partial = tiny.run_with_hooks(b, fwd_hooks=[(site, hooks.patch_from_cache(cache_a, positions=[-1]))])
    assert torch.allclose(injected, partial)


def test_neuron_set_roundtrip_and_checks(tiny, tmp_path):
    fp = model_fingerprint(tiny)
    ns = NeuronSet(((1, 3), (0, 2), (1, 3)), fp, {"method": "test"})
    assert ns.neurons == ((0, 2), (1, 3))
    assert ns.layer_counts() == [1, 1]
    path = ns.save(tmp_path / "n.json")
    back = NeuronSet.load(path)
    assert back == ns and back.meta == {"method": "test"}
    back.check(tiny)
    with pytest.raises(ValueError, match="out of range: the model the set names has 2 layers of 64"):
        NeuronSet(((0, 64),), fp)               # the fingerprint's sizes: refused when made, before any model
    NeuronSet((), fp, {"k": 0}).check(tiny)  # find's k = 0: legitimate, nothing to prune
    with pytest.raises(ValueError, match="does not name the model"):
        NeuronSet(((0, 1),), {}).check(tiny)
    with pytest.raises(ValueError, match="another model"):
        NeuronSet(((0, 1),), {**fp, "name": "other", "n_layers": 30}).check(tiny)
