"""Task vectors: injection identities, averaging, hooks in extraction, the experiment against a
hand-computed sweep, and a SmolLM2 check (with the patching identities on the real model)."""

import pytest
import torch

from mechcopy import task_vectors as TV
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.sites import neuron_site
from mechcopy.hooks import zero_neurons
from mechcopy.tasks import Task
from mechcopy.tasks.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "lamp", "rock", "milk", "rain", "door",
         "leaf", "frog", "ship", "corn", "wolf", "hand", "ring", "salt", "wind", "star", "moon", "pear",
         "apple", "house", "river", "stone", "cloud", "plant"]
LENGTH = Task("length", tuple((w, str(len(w))) for w in WORDS))


def test_identity_same_prompt_reproduces_icl_logits(tiny):
    p = make_prompt([("cat", "3"), ("house", "5")], ("ring", "4"), tiny.tokenizer)
    tokens = tiny.to_tokens(p.text)
    clean = tiny(tokens)[0, -1]
    vectors = TV.extract(tiny, [p])                     # no averaging: one prompt
    other = make_prompt([("dog", "3")], ("apple", "5"), tiny.tokenizer)
    for layer in range(tiny.cfg.n_layers):
        got = tiny.run_with_hooks(tokens, fwd_hooks=TV.injection_hooks(vectors[layer], layer))[0, -1]
        torch.testing.assert_close(got, clean, atol=1e-5, rtol=1e-5)
        # a vector from another prompt does change the logits (the identity is not vacuous)
        wrong = TV.extract(tiny, [other], [layer])[0]
        moved = tiny.run_with_hooks(tokens, fwd_hooks=TV.injection_hooks(wrong, layer))[0, -1]
        assert (moved - clean).abs().max() > 1e-3


def test_zero_shot_last_layer_gives_the_vectors_unembedding(tiny):
    p = make_prompt([("cat", "3"), ("house", "5")], ("ring", "4"), tiny.tokenizer)
    last = tiny.cfg.n_layers - 1
    v = TV.extract(tiny, [p], [last])[0]
    zs = make_prompt([], ("moon", "4"), tiny.tokenizer)
    got = tiny.run_with_hooks(tiny.to_tokens(zs.text), fwd_hooks=TV.injection_hooks(v, last))[0, -1]
    want = tiny.unembed(tiny.ln_final(v[None, None]))[0, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_extract_averages_last_tokens_and_applies_hooks(tiny):
    a = make_prompt([("cat", "3"), ("house", "5")], ("ring", "4"), tiny.tokenizer)
    b = make_prompt([("stone", "5")], ("dog", "3"), tiny.tokenizer)   # another length
    both = TV.extract(tiny, [a, b])
    _, ca = tiny.run_with_cache(a.text)
    _, cb = tiny.run_with_cache(b.text)
    for layer in range(tiny.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_post"
        torch.testing.assert_close(both[layer], (ca[name][0, -1] + cb[name][0, -1]) / 2)
    hooks = [(neuron_site(tiny, 0), zero_neurons(range(0, 64, 2)))]
    pruned = TV.extract(tiny, [a], fwd_hooks=hooks)
    store = {}
    from mechcopy.hooks import capture
    tiny.run_with_hooks(a.text, fwd_hooks=hooks + [("blocks.1.hook_resid_post", capture(store))])
    torch.testing.assert_close(pruned[1], store["blocks.1.hook_resid_post"][0, -1])
    assert (pruned[1] - TV.extract(tiny, [a])[1]).abs().max() > 1e-4
    assert not tiny.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks   # nothing left behind


def test_split_is_disjoint_and_single_token(tiny):
    cfg = TV.TaskVectorConfig(shots=3, n_extract=4, n_dev=6, n_test=10, seed=1)
    s = cfg.split(LENGTH, tiny.tokenizer)
    assert len(s.extraction) == 4 and len(s.dev) == 6 and len(s.test) == 10 and len(s.test_icl) == 10
    pool = {d for p in s.extraction for d in p.demos} | {(p.query, p.answer) for p in s.extraction}
    queries = [(p.query, p.answer) for p in s.dev + s.test]
    assert len(set(queries)) == len(queries) and not set(queries) & pool
    assert all(p.demos == () and len(p.answer_ids) == 1 for p in s.dev + s.test)
    assert [p.query for p in s.test_icl] == [p.query for p in s.test]
    assert all(len(p.demos) == 3 and not set(p.demos) & set(queries) for p in s.test_icl)
    assert s.extraction_labels == {lab for p in s.extraction for lab in p.demo_labels}


def test_experiment_matches_hand_computed_sweep(tiny):
    cfg = TV.TaskVectorConfig(shots=3, n_extract=3, n_dev=5, n_test=8, seed=0)
    hooks = [(neuron_site(tiny, 1), zero_neurons([1, 2, 3]))]
    res = TV.task_vector_experiment(tiny, LENGTH, cfg, fwd_hooks=hooks, condition="pruned")
    s = cfg.split(LENGTH, tiny.tokenizer)
    tok = tiny.tokenizer

    def hand_predictions(prompts, vec, layer):
        out = []
        for p in prompts:
            h = hooks + ([] if vec is None else TV.injection_hooks(vec, layer))
            logits = tiny.run_with_hooks(tiny.to_tokens(p.text), fwd_hooks=h)[0, -1]
            out.append(tok.decode([int(logits.argmax())]).strip())
        return out

    # vectors by hand: mean of last-token resid_post with the hooks on
    store = {}
    from mechcopy.hooks import capture
    vecs = []
    for p in s.extraction:
        tiny.run_with_hooks(p.text, fwd_hooks=hooks + [(f"blocks.{l}.hook_resid_post", capture(store))
                                                      for l in range(tiny.cfg.n_layers)])
        vecs.append(torch.stack([store[f"blocks.{l}.hook_resid_post"][0, -1] for l in range(tiny.cfg.n_layers)]))
    vecs = torch.stack(vecs).mean(0)
    dev = [sum(a == p.answer for a, p in zip(hand_predictions(s.dev, vecs[l], l), s.dev)) / len(s.dev)
           for l in range(tiny.cfg.n_layers)]
    assert res.dev_accuracy == pytest.approx(dev)
    best = max(range(len(dev)), key=lambda i: (dev[i], -i))
    assert res.best_layer == best
    preds = hand_predictions(s.test, vecs[best], best)
    assert list(res.predictions) == preds
    assert res.test_accuracy == pytest.approx(sum(a == p.answer for a, p in zip(preds, s.test)) / len(s.test))
    labels = {lab for p in s.extraction for lab in p.demo_labels}
    copies = sum(a in labels and a != p.answer for a, p in zip(preds, s.test)) / len(s.test)
    assert res.copy_rate == pytest.approx(copies)
    zs = hand_predictions(s.test, None, 0)
    assert res.zero_shot_accuracy == pytest.approx(sum(a == p.answer for a, p in zip(zs, s.test)) / len(s.test))
    icl = hand_predictions(s.test_icl, None, 0)
    assert res.icl_accuracy == pytest.approx(sum(a == p.answer for a, p in zip(icl, s.test_icl)) / len(s.test))
    j = res.to_json()
    assert j["condition"] == "pruned" and j["config"]["n_test"] == 8 and j["model"]["name"] == tiny.cfg.model_name


def test_same_api_on_mamba():
    mamba = pytest.importorskip("mechcopy.models.mamba")
    model = mamba.tiny_mamba(seed=0)
    p = make_prompt([("cat", "3"), ("house", "5")], ("ring", "4"), model.tokenizer)
    tokens = model.to_tokens(p.text)
    vectors = TV.extract(model, [p])
    for layer in range(model.cfg.n_layers):
        got = model.run_with_hooks(tokens, fwd_hooks=TV.injection_hooks(vectors[layer], layer))[0, -1]
        torch.testing.assert_close(got, model(tokens)[0, -1], atol=1e-5, rtol=1e-5)
    cfg = TV.TaskVectorConfig(shots=3, n_extract=3, n_dev=4, n_test=6)
    res = TV.task_vector_experiment(model, LENGTH, cfg)
    assert len(res.dev_accuracy) == model.cfg.n_layers and res.n_test == 6


@pytest.mark.slow
def test_smollm2_task_vectors_and_patching(smollm2):
    """On the real model: the injection identity, the experiment end to end, the patching identities."""
    from mechcopy import patching as P
    from mechcopy.tasks import load_task

    task = load_task("antonyms")
    p = make_prompt([("hot", "cold"), ("big", "small"), ("up", "down")], ("fast", "slow"), smollm2.tokenizer)
    tokens = smollm2.to_tokens(p.text)
    vectors = TV.extract(smollm2, [p], [5, 15])
    clean = smollm2(tokens)[0, -1]
    for i, layer in enumerate((5, 15)):
        got = smollm2.run_with_hooks(tokens, fwd_hooks=TV.injection_hooks(vectors[i], layer))[0, -1]
        torch.testing.assert_close(got, clean, atol=1e-4, rtol=1e-4)
    cfg = TV.TaskVectorConfig(shots=4, n_extract=3, n_dev=4, n_test=12, layers=(12, 16))
    res = TV.task_vector_experiment(smollm2, task, cfg)
    assert res.n_test == 12 and len(res.dev_accuracy) == 2 and res.best_layer in (12, 16)
    assert res.icl_accuracy > res.zero_shot_accuracy      # 4-shot antonyms work, zero-shot `x ->` does not
    # patching: the clean residual stream entering any block (all positions) recovers the clean run
    pairs = P.make_pairs(smollm2, task, "shuffled_labels", n=2, shots=3, seed=0)
    assert pairs.clean_tokens.shape == pairs.corrupt_tokens.shape
    metric = P.NormalisedLogitDiff.from_runs(smollm2, pairs.clean_tokens, pairs.corrupt_tokens, pairs.gold,
                                             pairs.ref)
    _, cache = smollm2.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer in (0, 17):
        assert P.patched_metric(smollm2, cache, pairs.corrupt_tokens, metric,
                                [f"blocks.{layer}.hook_resid_pre"]) == pytest.approx(1, abs=1e-3)
    assert P.patched_metric(smollm2, cache, pairs.clean_tokens, metric, ["blocks.17.hook_resid_pre"],
                            positions=[pairs.clean_tokens.shape[1] - 1]) == pytest.approx(1, abs=1e-3)
