"""Function vectors (Todd et al. 2024): mean head outputs read off the cache, indirect effects in one
grouped pass equal one head patched at a time by hand, the vector as the sum of mean z @ W_O, and its
addition equal to a manual residual addition."""

import pytest
import torch

from mechcopy import function_vectors as FV
from mechcopy.hooks import set_heads
from mechcopy.models.tiny import tiny_transformer
from mechcopy.task_vectors import TaskVectorConfig
from mechcopy.tasks import Task
from mechcopy.tasks.splits import split_task

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "lamp", "rock", "milk", "rain", "door",
         "leaf", "frog", "ship", "corn", "wolf", "hand", "ring", "salt", "wind", "star", "moon", "pear"]
LENGTH = Task("length", tuple((w, str(len(w))) for w in WORDS))      # single-token answers on the tiny tokenizer


@pytest.fixture(scope="module")
def gqa():
    return tiny_transformer(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=7, n_key_value_heads=2)


@pytest.fixture(scope="module")
def split(gqa):
    return split_task(LENGTH, gqa.tokenizer, shots=3, n_extract=4, n_dev=4, n_test=4, seed=0)


def test_means_aie_and_vector_by_hand(gqa, split):
    means = FV.mean_head_outputs(gqa, split.extraction)
    with torch.no_grad():
        zs = [gqa.run_with_cache(p.text)[1] for p in split.extraction]
    for layer in range(2):
        want = torch.stack([c[f"blocks.{layer}.attn.hook_z"][0, -1] for c in zs]).mean(0)
        torch.testing.assert_close(means[layer], want, atol=1e-5, rtol=1e-5)
    shuffled = FV.shuffled_prompts(split.extraction, gqa.tokenizer, 0)
    mixed = [p for p in split.extraction if len(set(p.demo_labels)) > 1]     # all labels equal: left out
    assert shuffled and len(shuffled) == len(mixed)
    for s, p in zip(shuffled, mixed):
        assert s.text != p.text and s.answer == p.answer and sorted(s.demo_labels) == sorted(p.demo_labels)
    aie = FV.indirect_effects(gqa, shuffled, means)
    assert aie.shape == (2, 4) and aie.abs().max() > 0

    def gold_prob(p, hooks=()):
        with torch.no_grad():
            logits = gqa.run_with_hooks(gqa.to_tokens(p.text), fwd_hooks=list(hooks))[0, -1]
        return float(logits.softmax(-1)[p.answer_ids[0]])

    for layer, head in [(0, 1), (1, 3)]:
        hook = (f"blocks.{layer}.attn.hook_z", set_heads([head], means[layer][head][None], position=-1))
        hand = sum(gold_prob(p, [hook]) - gold_prob(p) for p in shuffled) / len(shuffled)
        assert abs(float(aie[layer, head]) - hand) < 1e-5
    heads = FV.top_heads(aie, 3)
    assert heads[0] == divmod(int(aie.flatten().argmax()), 4)
    fv = FV.function_vector(gqa, means, heads)
    want = sum(means[l][h] @ gqa.blocks[l].attn.W_O[h] for l, h in heads)
    torch.testing.assert_close(fv, want.detach(), atol=1e-5, rtol=1e-5)


def test_adding_the_vector_equals_a_manual_residual_addition(gqa, split):
    v = torch.randn(32)
    tokens = gqa.to_tokens(split.dev[0].text)
    with torch.no_grad():
        ours = gqa.run_with_hooks(tokens, fwd_hooks=FV.add_hooks(v, 0))
        # by hand: the residual stream after block 0, plus v at the last position, run through block 1 on
        _, cache = gqa.run_with_cache(tokens)
        resid = cache["blocks.0.hook_resid_post"].clone()
        resid[0, -1] += v
        hand = gqa(resid, start_at_layer=1)
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, gqa(tokens), atol=1e-3)


def test_experiment_fields_and_mamba_refused(gqa, mamba):
    cfg = TaskVectorConfig(shots=3, n_extract=4, n_dev=4, n_test=4)
    res = FV.function_vector_experiment(gqa, LENGTH, cfg, n_heads=2)
    assert len(res.heads) == 2 and res.layers == (0, 1) and len(res.fv_dev_accuracy) == len(res.tv_dev_accuracy) == 2
    assert res.best_layer in (0, 1) and 0 <= res.fv_test_accuracy <= 1 and res.norm > 0
    with pytest.raises(ValueError, match="needs attention heads, and a mamba model has none"):
        FV.function_vector_experiment(mamba, LENGTH, cfg)


def test_function_vectors_command(gqa, monkeypatch, tmp_path):
    import json

    import mechcopy.models
    from mechcopy.commands import main

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: gqa)
    task = tmp_path / "length.json"
    task.write_text(json.dumps({"name": "length", "pairs": [list(p) for p in LENGTH.pairs]}))
    heads = tmp_path / "heads.json"
    from mechcopy.heads import head_set

    head_set(gqa, [(0, 0), (1, 2)], {"k": 2}).save(heads)
    out = tmp_path / "fv.json"
    assert main(["function-vectors", "--tasks", str(task), "--shots", "3", "--n-extract", "4", "--n-dev", "4",
                 "--n-test", "4", "--n-heads", "2", "--prune", str(heads), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["condition"] for r in rows] == ["unpruned", "pruned"]
    want = FV.function_vector_experiment(gqa, LENGTH, TaskVectorConfig(shots=3, n_extract=4, n_dev=4, n_test=4),
                                         n_heads=2)
    assert [tuple(h) for h in rows[0]["heads"]] == list(want.heads)
    assert tuple(rows[0]["fv_dev_accuracy"]) == want.fv_dev_accuracy
