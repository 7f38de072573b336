"""The direct label push of heads and neurons (`mechcopy.label_push`): per layer the components and the
bias term sum to the push of the sublayer's output read from the cache; all terms with the embedding
and the constants sum to the model's own centred label logits; one head and one neuron equal a hand
computation from the cache and the weights (plain, Gemma-like post-sublayer norms, LayerNorm with
biases, plain MLP); the UniBias-style score equals a plain loop; refusals."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mechcopy.label_push import LabelPush, label_push, unibias_scores
from mechcopy.models.tiny import tiny_transformer
from mechcopy.selection import select
from mechcopy.tasks.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"plain": {},
           "gemma-like": {"n_key_value_heads": 2, "use_normalization_before_and_after": True},
           "layernorm": {"normalization_type": "LN", "gated": False}}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    m = tiny_transformer(n_layers=3, seed=1, **CONFIGS[request.param])
    with torch.no_grad():        # biases and norm weights that are not 0 and 1, so each term matters
        for name, param in m.named_parameters():
            if name.endswith(("b_O", "b_out", ".b", "b_U")):
                param.normal_(0, 0.3)
            elif name.endswith(".w") and ("ln" in name):
                param.normal_(1, 0.2)
    return m


@pytest.fixture(scope="module")
def prompts(model):
    tok = model.tokenizer
    a = ("3", "4", "5", "7")
    return [replace(make_prompt([("cat", "3"), ("tree", "4"), ("fish", "5")], ("lamp", "7"), tok, task="a"), label_space=a),
            replace(make_prompt([("ab", "1"), ("cde", "2")], ("xy", "2"), tok, task="b"), label_space=("1", "2")),
            replace(make_prompt([("sun", "5"), ("moon", "3")], ("star", "4"), tok, task="a"), label_space=a)]


def _norm_by_hand(norm, scale, x):
    """A TransformerLens RMSNorm / LayerNorm with its scale given, without its bias."""
    if type(norm).__name__.startswith("LayerNorm"):
        x = x - x.mean(-1, keepdim=True)
    return x / scale * norm.w


def _onto_labels(model, cache, x, ids):
    """What `x` (written at the last position) adds to the centred logits of tokens `ids`, by hand."""
    y = _norm_by_hand(model.ln_final, cache["ln_final.hook_scale"][0, -1], x) @ model.W_U[:, list(ids)]
    return y - y.mean(-1, keepdim=True)


def _ids(prompt, tok):
    """The first token of each label as it follows the prompt (the char tokenizer: the label's first char)."""
    return [tok.encode(y, add_special_tokens=False)[0] for y in prompt.label_space]


def test_label_ids_are_the_labels_first_tokens(model, prompts):
    push = label_push(model, prompts, "head")
    assert push.label_ids == tuple(tuple(_ids(p, model.tokenizer)) for p in prompts)
    assert push.push.shape == (3, 3, 4, 4) and torch.isnan(push.push[1, ..., 2:]).all()
    assert not torch.isnan(push.push[0]).any() and not torch.isnan(push.push[1, ..., :2]).any()


def test_components_and_bias_sum_to_the_sublayer_output(model, prompts):
    heads, neurons = label_push(model, prompts, "head"), label_push(model, prompts, "neuron")
    assert neurons.push.shape == (3, 3, 64, 4)
    for i, p in enumerate(prompts):
        _, cache = model.run_with_cache(p.text)
        k = len(p.label_space)
        for l in range(model.cfg.n_layers):
            for push, hook in ((heads, "hook_attn_out"), (neurons, "hook_mlp_out")):
                want = _onto_labels(model, cache, cache[f"blocks.{l}.{hook}"][0, -1], push.label_ids[i]).detach()
                got = push.push[i, l, :, :k].sum(0) + push.bias[i, l, :k]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                assert push.push[i, l, :, :k].abs().max() > 1e-3       # the components carry the sum, not the bias alone
            torch.testing.assert_close(heads.push[i, l, :, :k].sum(-1), torch.zeros(4), atol=1e-5, rtol=0)  # centred


def test_every_term_sums_to_the_centred_label_logits(model, prompts):
    heads, neurons = label_push(model, prompts, "head"), label_push(model, prompts, "neuron")
    for i, p in enumerate(prompts):
        logits, cache = model.run_with_cache(p.text)
        ids = heads.label_ids[i]
        want = logits[0, -1, list(ids)].detach()
        want = want - want.mean()
        k = len(ids)
        embed = _onto_labels(model, cache, cache["blocks.0.hook_resid_pre"][0, -1], ids)
        final_bias = getattr(model.ln_final, "b", torch.zeros(model.cfg.d_model))     # LayerNorm's; RMSNorm has none
        const = final_bias @ model.W_U[:, list(ids)] + model.b_U[list(ids)]
        const = const - const.mean()
        total = (heads.push[i, ..., :k].sum((0, 1)) + heads.bias[i, :, :k].sum(0)
                 + neurons.push[i, ..., :k].sum((0, 1)) + neurons.bias[i, :, :k].sum(0) + embed + const)
        torch.testing.assert_close(total.detach(), want, atol=1e-4, rtol=1e-4)


def test_one_head_and_one_neuron_by_hand(model, prompts):
    from mechcopy.arch.transformer import transformer_block

    heads, neurons = label_push(model, prompts, "head"), label_push(model, prompts, "neuron")
    post = model.cfg.use_normalization_before_and_after
    layer, head, neuron = 1, 3, 17
    block = transformer_block(model, layer)
    for i, p in enumerate(prompts):
        _, cache = model.run_with_cache(p.text)
        k = len(p.label_space)
        ids = _ids(p, model.tokenizer)
        write = cache[f"blocks.{layer}.attn.hook_z"][0, -1, head] @ model.W_O[layer, head]
        if post:
            write = _norm_by_hand(block.ln1_post, cache[f"blocks.{layer}.ln1_post.hook_scale"][0, -1], write)
        torch.testing.assert_close(heads.push[i, layer, head, :k], _onto_labels(model, cache, write, ids).detach(),
                                   atol=1e-5, rtol=1e-4)
        write = cache[f"blocks.{layer}.mlp.hook_post"][0, -1, neuron] * model.W_out[layer, neuron]
        if post:
            write = _norm_by_hand(block.ln2_post, cache[f"blocks.{layer}.ln2_post.hook_scale"][0, -1], write)
        torch.testing.assert_close(neurons.push[i, layer, neuron, :k], _onto_labels(model, cache, write, ids).detach(),
                                   atol=1e-5, rtol=1e-4)


def test_json_round_trip(model, prompts):
    push = label_push(model, prompts[:2], "head")
    back = LabelPush.from_json(push.to_json())
    torch.testing.assert_close(back.push, push.push, equal_nan=True)
    torch.testing.assert_close(back.bias, push.bias, equal_nan=True)
    assert (back.tasks, back.labels, back.label_ids, back.kind) == (push.tasks, push.labels, push.label_ids, "head")


# ---------------------------------------------------------------- the UniBias-style score


def _reference(push, tasks, n_labels):
    """The score as a plain loop over components and tasks (numpy)."""
    _, n_layers, width, _ = push.shape
    out = np.zeros((n_layers, width))
    names = sorted(set(tasks))
    for l in range(n_layers):
        for c in range(width):
            total = 0.0
            for t in names:
                rows = [i for i, x in enumerate(tasks) if x == t]
                values = np.array([push[i, l, c, :n_labels[rows[0]]] for i in rows])
                m = values.mean(0)
                j = int(np.argmax(m))
                total += m[j] if m[j] >= np.std(values[:, j]) else 0.0
            out[l, c] = total / len(names)
    return out


def _made_up(values, tasks, labels, kind="neuron"):
    most = max(len(ls) for ls in labels)
    t = torch.tensor(values, dtype=torch.float32)
    push = torch.cat([t, t.new_full((*t.shape[:-1], most - t.shape[-1]), float("nan"))], -1) if t.shape[-1] < most else t
    for i, ls in enumerate(labels):
        push[i, ..., len(ls):] = float("nan")
    return LabelPush(push, torch.zeros(push.shape[0], push.shape[1], most), tuple(tasks), tuple(labels),
                     tuple(tuple(range(len(ls))) for ls in labels), kind, {"name": "made-up"})


def test_unibias_scores_equal_a_plain_loop():
    rng = np.random.default_rng(0)
    tasks = ["a"] * 4 + ["b"] * 3
    labels = [("x", "y", "z")] * 4 + [("u", "v")] * 3
    raw = rng.normal(size=(7, 2, 5, 3))
    raw[:, 0, 0] = [1.0, -0.5, -0.5]          # biased and consistent: its score is its bias
    raw[:4, 0, 1] = [[5, -2.5, -2.5], [-3, 1.5, 1.5], [5, -2.5, -2.5], [-3, 1.5, 1.5]]   # biased, inconsistent
    raw[4:, 0, 1] = [[4, -4, 0], [-4, 4, 0], [4, -4, 0]]
    raw[:, 1, 4] += np.array([3.0, -3.0, 0.0])          # strongly biased in both tasks (toward the first label)
    raw[:4, 1, 2] = [[1.9, -0.95, -0.95], [0.1, -0.05, -0.05]] * 2   # bias 1, population sd 0.9 (sample sd 1.04)
    raw[4:, 1, 2] = 0.0
    raw[4:, ..., 2] = np.nan
    push = _made_up(raw, tasks, labels)
    scores = unibias_scores(push)
    want = _reference(raw, tasks, [len(ls) for ls in labels])
    np.testing.assert_allclose(scores.scores.numpy(), want, rtol=1e-5, atol=1e-6)
    assert scores.scores[0, 1] == 0      # biased (1 in a, 4/3 in b) but standard deviations 4 and 3.8: dropped
    assert float(scores.scores[0, 0]) == pytest.approx(1.0)      # bias 1, standard deviation 0, in both tasks
    assert float(scores.scores[1, 2]) == pytest.approx(0.5)      # kept in task a (sd 0.9 < 1), 0 in b
    assert 0 < (want > 0).sum() < want.size          # the test data has both kept and dropped components
    chosen = select(scores, "global", k=1)
    assert chosen.kind == "neuron" and chosen.pairs == ((1, 4),)
    assert scores.kind == "neuron" and scores.meta["method"] == "unibias"


def test_unibias_scores_of_heads_select_heads(model, prompts):
    scores = unibias_scores(label_push(model, prompts, "head"))
    assert scores.scores.shape == (3, 4) and (scores.scores >= 0).all()
    scores.check(model)
    assert select(scores, "global", k=3).kind == "head"


def test_a_task_with_two_label_sets_is_refused():
    push = _made_up(np.zeros((2, 1, 1, 2)), ["a", "a"], [("x", "y"), ("x", "z")])
    with pytest.raises(ValueError, match="do not share one label set"):
        unibias_scores(push)


# ---------------------------------------------------------------- refusals


def test_refusals(prompts, mamba):
    with pytest.raises(ValueError, match="has none"):
        label_push(mamba, prompts, "head")
    with pytest.raises(ValueError, match="neurons are not written that way"):
        label_push(mamba, prompts, "neuron")
    capped = tiny_transformer(n_layers=2, seed=0, output_logits_soft_cap=30.0)
    for kind in ("head", "neuron"):
        with pytest.raises(ValueError, match="soft-caps its logits"):
            label_push(capped, prompts, kind)
    plain = tiny_transformer(n_layers=2, seed=0)
    with pytest.raises(ValueError, match="unknown kind"):
        label_push(plain, prompts, "layer")
    with pytest.raises(ValueError, match="label_space"):
        label_push(plain, [replace(prompts[0], label_space=())], "neuron")
    with pytest.raises(ValueError, match="no prompts"):
        label_push(plain, [], "head")


def test_unibias_candidates_of_the_study(model, prompts):
    """The study's arm (analyses/copy_mechanism.py): the top k heads and neurons of `unibias_scores`, zeroed
    at the last position and read by label scoring; k larger than the model has is left out."""
    from types import SimpleNamespace

    from conftest import analysis_script
    from mechcopy.conditions import LABELS

    cm = analysis_script("copy_mechanism")
    settings = {"unibias_hs": [2, 5, 99], "unibias_ks": [3, 10]}
    candidates, extra = cm.unibias_candidates(model, SimpleNamespace(attribution=prompts), 0, settings)
    assert [c.name for c in candidates] == ["zero-h2", "zero-h5", "zero-k3", "zero-k10"]
    heads = unibias_scores(label_push(model, prompts, "head"))
    for c in candidates:
        assert (c.family, c.ablation, c.positions, c.readout) == ("pruned", "zero", "last", LABELS)
        assert c.components.kind == ("head" if "-h" in c.name else "neuron")
    assert candidates[0].components.pairs == select(heads, "global", k=2).pairs
    top = extra["head"]["scores_top"]
    assert len(top) == 12 and top[0][2] == pytest.approx(float(heads.scores.max()))
    assert len(extra["neuron"]["scores_top"]) == 20 and extra["n_attribution"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_completeness_on_the_zoo_models(request, name):
    """On the real models (Gemma 3 with its post-attention and post-MLP norms), on copy-probe prompts:
    heads + bias and neurons + bias per layer equal the sublayer outputs' push, and every term equals
    the centred label logits."""
    from mechcopy.heads import final_norm
    from mechcopy.tasks.copy_probe import CopyProbeConfig, build_copy_probe

    model = request.getfixturevalue(name)
    config = CopyProbeConfig(("last_digit", "star_count"), "no-gold", 4, n_attr=2, n_dev=0, n_test=0)
    prompts = list(build_copy_probe(model.tokenizer, config, seed=0).attribution)[:3]
    heads, neurons = label_push(model, prompts, "head"), label_push(model, prompts, "neuron")
    norm = final_norm(model)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            logits, cache = model.run_with_cache(p.text)
            ids = list(heads.label_ids[i])
            k = len(ids)

            def onto(x):
                y = x / cache["ln_final.hook_scale"][0, -1] * getattr(norm, "w", 1.0) @ model.W_U[:, ids]
                return y - y.mean()

            for l in range(model.cfg.n_layers):
                for push, hook in ((heads, "hook_attn_out"), (neurons, "hook_mlp_out")):
                    got = push.push[i, l, :, :k].sum(0) + push.bias[i, l, :k]
                    torch.testing.assert_close(got, onto(cache[f"blocks.{l}.{hook}"][0, -1]), atol=2e-4, rtol=1e-4)
            want = logits[0, -1, ids] - logits[0, -1, ids].mean()
            const = model.b_U[ids] - model.b_U[ids].mean()
            total = sum(x.push[i, ..., :k].sum((0, 1)) + x.bias[i, :, :k].sum(0) for x in (heads, neurons))
            torch.testing.assert_close(total + onto(cache["blocks.0.hook_resid_pre"][0, -1]) + const, want,
                                       atol=2e-4, rtol=1e-4)
