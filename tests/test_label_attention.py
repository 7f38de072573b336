"""Label attention equals the attention weights read from the cache by hand; the OV check's values are
the ones the head mixes into z (grouped-query models included) and its logits are computed by hand;
outcomes split copy errors from correct answers; the pictures show the data."""

import numpy as np
import pytest
import torch

from mechcopy import label_attention as LA
from mechcopy import viz
from mechcopy.models.tiny import tiny_transformer
from mechcopy.tasks.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["plain", "gqa+post-norm"])
def model(request):
    kw = {} if request.param == "plain" else {"n_key_value_heads": 2, "use_normalization_before_and_after": True}
    return tiny_transformer(n_layers=2, seed=2, **kw)


@pytest.fixture(scope="module")
def prompts(model):
    tok = model.tokenizer
    return [make_prompt([("cat", "31"), ("tree", "4"), ("fish", "5")], ("lamp", "7"), tok),
            make_prompt([("ab", "1"), ("cde", "22"), ("q", "3")], ("xy", "6"), tok)]


def _label_positions_by_hand(prompt):
    """Character tokenizer: one token per character, BOS first; a label's characters follow its ' -> '."""
    out, start = [], 0
    for x, y in prompt.demos:
        at = prompt.text.index(f"{x} -> {y}", start) + len(f"{x} -> ")
        out.append([1 + at + i for i in range(len(y))])
        start = at + len(y)
    return out


def test_label_attention_equals_the_pattern_read_by_hand(model, prompts):
    res = LA.label_attention(model, prompts)
    assert res.to_labels.shape == (2, 2, 4) and res.to_demo.shape == (2, 2, 4, 3)
    for i, p in enumerate(prompts):
        positions = _label_positions_by_hand(p)
        assert LA.label_positions(model, p) == positions
        _, cache = model.run_with_cache(p.text)
        for layer in range(2):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]          # [heads, key]
            by_demo = torch.stack([pattern[:, pos].sum(-1) for pos in positions], -1)
            torch.testing.assert_close(res.to_demo[i, layer], by_demo)
            torch.testing.assert_close(res.to_labels[i, layer], pattern[:, sum(positions, [])].sum(-1))
            torch.testing.assert_close(res.to_bos[i, layer], pattern[:, 0])
            assert torch.equal(res.attended[i, layer], by_demo.argmax(-1))
        assert abs(float(res.label_share[i]) - len(sum(positions, [])) / len(model.to_str_tokens(p.text))) < 1e-6


def test_ov_check_by_hand(model, prompts):
    """The values the check reads are the ones the head mixes into z (the attention-weighted sum over
    every position is hook_z: the query head -> key/value head map is right); its logit is computed by
    hand through W_O, the post-attention norm and the final norm with frozen scales, and W_U."""
    res = LA.label_attention(model, prompts)
    p = prompts[0]
    _, cache = model.run_with_cache(p.text)
    n_kv = model.cfg.n_key_value_heads or 4
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]
        v = cache[f"blocks.{layer}.attn.hook_v"][0]                                    # [pos, kv_heads, d_head]
        for h in range(4):
            vh = v[:, h // (4 // n_kv)]
            torch.testing.assert_close(pattern[h] @ vh, cache[f"blocks.{layer}.attn.hook_z"][0, -1, h], atol=1e-5, rtol=1e-5)
            d = int(res.attended[0, layer, h])
            pos = _label_positions_by_hand(p)[d]
            u = (pattern[h, pos, None] * vh[pos]).sum(0) / pattern[h, pos].sum()
            x = u @ model.blocks[layer].attn.W_O[h]
            if model.cfg.use_normalization_before_and_after:
                x = x / cache[f"blocks.{layer}.ln1_post.hook_scale"][0, -1] * model.blocks[layer].ln1_post.w
            x = x / cache["ln_final.hook_scale"][0, -1] * model.ln_final.w
            ids = [ids[0] for ids in p.demo_label_ids]
            own, others = ids[d], sorted((set(ids) | {p.answer_ids[0]}) - {ids[d]})    # other demo labels and gold
            logits = x @ model.W_U
            assert abs(float(logits[own]) - float(res.ov_logit[0, layer, h])) < 1e-4
            assert abs(float(logits[own] - logits[others].mean()) - float(res.ov_margin[0, layer, h])) < 1e-4


def test_outcomes_split_copy_errors_from_correct_answers(model, prompts):
    res = LA.label_attention(model, prompts)
    for p, pred, outcome in zip(prompts, res.predicted, res.outcomes):
        assert pred == int(model(p.text)[0, -1].argmax())
        assert outcome == LA.outcome_of(p, pred)
    p = prompts[0]
    assert LA.outcome_of(p, p.answer_ids[0]) == "correct"
    assert LA.outcome_of(p, p.demo_label_ids[1][0]) == "copy"
    assert LA.outcome_of(p, model.tokenizer.convert_tokens_to_ids("z")) == "other"
    # a mean over one outcome is the mean over those prompts; over none it is NaN
    fake = LA.LabelAttention(**{**res.__dict__, "outcomes": ("copy", "correct")})
    torch.testing.assert_close(fake.mean("to_labels", "copy"), res.to_labels[0])
    assert torch.isnan(fake.mean("to_labels", "other")).all()
    back = LA.LabelAttention.from_json(res.to_json())
    torch.testing.assert_close(back.ov_margin, res.ov_margin, equal_nan=True)


def test_head_heatmap_and_attention_view(model, prompts, tmp_path):
    values = np.array([[0.1, -2.0, 0.3, 0.0], [1.5, 0.2, -0.1, 0.05]])
    fig = viz.plot_head_heatmap(values, "DLA", "logit", top=2)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), values)
    assert "L0H1 -2" in fig.axes[0].get_title() and "L1H0 +1.5" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) == 2
    viz.save_figure(viz.plot_head_heatmap(values, centre=False), tmp_path / "h.png")
    fig = viz.plot_head_maps({"a": {"values": values}, "b": {"values": 2 * values, "centre": False}}, "maps")
    panels = [ax for ax in fig.axes if ax.images]
    np.testing.assert_allclose(panels[0].images[0].get_array(), values)
    np.testing.assert_allclose(panels[1].images[0].get_array(), 2 * values)
    # a map that is not 2-D: refused by the annotation's shape where the tests check annotations, else by the
    # function's own check
    with pytest.raises((ValueError, TypeError), match="2-D|layers heads"):
        viz.plot_head_heatmap(values[0])
    p = prompts[0]
    view = viz.head_attention_view(model, p, [(1, 2), (0, 1)])
    props = viz.to_json_props(view)
    assert props["attentionHeadNames"] == ["L0H1", "L1H2"]
    _, cache = model.run_with_cache(p.text)
    np.testing.assert_allclose(np.array(props["attention"][1]), cache["blocks.1.attn.hook_pattern"][0, 2].numpy(), atol=1e-4)
    marked = [i for i, t in enumerate(props["tokens"]) if t.startswith("«")]
    assert marked == sum(_label_positions_by_hand(p), [])
    assert "http" not in view.local_src.split("<script", 1)[0]


# ---------------------------------------------------------------- down-weighting the attention to demo labels

EDIT_LABELS = ("no", "yes", "maybe")
EDIT_WORDS = ("cat", "moon", "sky", "river", "stone", "apple", "tree", "house", "lamp", "road", "bird", "fish")


def _edit_prompts(model, n: int = 6):
    from mechcopy.tasks import Task
    from mechcopy.tasks.prompts import build_prompts

    task = Task("answers", tuple((w, EDIT_LABELS[i % 3]) for i, w in enumerate(EDIT_WORDS)))
    return build_prompts(task, model.tokenizer, shots=3, n=n, seed=4).prompts


def _edited_by_hand(model, prompt, label: str, heads: dict[int, list[int]], factor: float) -> float:
    """log p(label | prompt) from one full forward pass of prompt + label, the answer position's attention
    to the demo-label tokens (found by hand) times `factor` in `heads`, renormalised (`hooks.scale_attention`
    at that one query)."""
    from mechcopy.hooks import scale_attention

    ids = model.to_tokens(prompt.text)[0].tolist()
    label_tokens = [model.tokenizer.convert_tokens_to_ids(c) for c in label]
    keys = sum(_label_positions_by_hand(prompt), [])
    hooks = [(f"blocks.{l}.attn.hook_pattern", scale_attention(keys, factor, heads=hs, query=len(ids) - 1))
             for l, hs in heads.items()]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logp = torch.log_softmax(model(torch.tensor([ids + label_tokens])).float(), -1)[0]
    return float(sum(logp[len(ids) - 1 + t, x] for t, x in enumerate(label_tokens)))


def test_label_attention_conditions_equal_the_edit_by_hand(model):
    """In one forked pass beside an unedited and a zero-ablated row group, each label-attention condition
    scores every label as a full forward pass with the answer position's attention edited by hand does
    (left-padded batches, labels of 2-5 tokens, heads in both layers); factor 1 changes nothing."""
    from mechcopy.conditions import LABELS, UNPRUNED, Condition
    from mechcopy.heads import head_set
    from mechcopy.scoring import score_labels_conditions

    prompts = _edit_prompts(model)
    assert len({len(p.text) for p in prompts}) > 1
    a, b = {0: [1], 1: [0, 3]}, {1: [2]}
    sets = {name: head_set(model, [(l, h) for l, hs in heads.items() for h in hs]) for name, heads in (("a", a), ("b", b))}
    conditions = [UNPRUNED,
                  Condition("a0", components=sets["a"], ablation="label-attention", positions="last", factor=0.0, readout=LABELS),
                  Condition("zero-b", components=sets["b"], readout=LABELS),
                  Condition("b-half", components=sets["b"], ablation="label-attention", positions="last", factor=0.5,
                            readout=LABELS),
                  Condition("a1", components=sets["a"], ablation="label-attention", positions="last", factor=1.0, readout=LABELS)]
    got = score_labels_conditions(model, prompts, EDIT_LABELS, conditions, batch_size=10)
    for name, heads, factor in (("a0", a, 0.0), ("b-half", b, 0.5)):
        want = np.array([[_edited_by_hand(model, p, y, heads, factor) for y in EDIT_LABELS] for p in prompts])
        np.testing.assert_allclose(got[name].logprobs, want, atol=1e-4, err_msg=name)
        assert not np.allclose(got[name].logprobs, got["unpruned"].logprobs, atol=1e-3)
    np.testing.assert_allclose(got["a1"].logprobs, got["unpruned"].logprobs, atol=1e-5)


def test_label_attention_through_the_evaluator(model):
    """evaluate_conditions reads a label-attention condition (plain and batch-calibrated) as it reads its
    scores alone; the calibrations that need reference queries sit beside it in the same call."""
    from mechcopy.conditions import LABELS, UNPRUNED, Condition, Readout
    from mechcopy.evaluation import evaluate_conditions
    from mechcopy.heads import head_set
    from mechcopy.scoring import score_labels_conditions

    prompts = _edit_prompts(model, n=5)
    heads = head_set(model, [(1, 0), (1, 3)])
    edit = Condition("edit", components=heads, ablation="label-attention", positions="last", factor=0.0, readout=LABELS)
    conditions = [UNPRUNED, edit, Condition("edit+batch", components=heads, ablation="label-attention", positions="last",
                                            factor=0.0, readout=Readout("labels", "batch")),
                  Condition("contextual", readout=Readout("labels", "contextual"))]
    res = evaluate_conditions(model, prompts, conditions, labels=EDIT_LABELS)
    alone = score_labels_conditions(model, prompts, EDIT_LABELS, [edit])["edit"]
    assert list(res["edit"].predictions) == alone.predict()
    assert list(res["edit+batch"].predictions) == alone.predict("batch")


def test_label_attention_conditions_are_checked(model):
    from mechcopy.components import Components
    from mechcopy.conditions import LABELS, Condition, Readout
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.heads import head_set
    from mechcopy.pruning import condition_hooks

    heads = head_set(model, [(0, 1)])
    ok = dict(components=heads, ablation="label-attention", positions="last", factor=0.0, readout=LABELS)
    neurons = Components(((0, 1),), model_fingerprint(model))
    for bad, match in ((dict(components=neurons), "must be heads"), (dict(positions="all"), "positions='last'"),
                       (dict(factor=1.5), "at most 1"), (dict(factor=-0.1), "factor"), (dict(factor=None), "factor"),
                       (dict(readout=Readout()), "label scoring")):
        with pytest.raises((ValueError, TypeError), match=match):
            Condition("x", **{**ok, **bad})
    with pytest.raises(ValueError, match="factor is for"):
        Condition("x", components=heads, factor=0.5)
    edit = Condition("x", **ok)
    assert Condition.from_json(edit.to_json()) == edit and edit.describe()["factor"] == 0.0
    with pytest.raises(ValueError, match="no prompt-free hooks"):
        condition_hooks(model, edit)


def test_label_attention_edits_each_reference_query_too(model):
    """Contextual calibration's content-free queries (with the prompt's demos) are scored with their own
    answer position's attention to the demo labels edited, as a full forward pass of that query's prompt
    edited by hand is."""
    from mechcopy.conditions import LABELS, UNPRUNED, Condition, Readout
    from mechcopy.heads import head_set
    from mechcopy.scoring import CONTENT_FREE, score_labels_conditions, with_query

    prompts = _edit_prompts(model, n=3)
    heads = {0: [2], 1: [1, 3]}
    edit = Condition("edit", components=head_set(model, [(l, h) for l, hs in heads.items() for h in hs]),
                     ablation="label-attention", positions="last", factor=0.0, readout=Readout("labels", "contextual"))
    got = score_labels_conditions(model, prompts, EDIT_LABELS, [UNPRUNED, edit], references={"contextual": CONTENT_FREE},
                                  batch_size=4)["edit"]
    for i, p in enumerate(prompts):
        want = [_edited_by_hand(model, p, y, heads, 0.0) for y in EDIT_LABELS]
        np.testing.assert_allclose(got.logprobs[i], want, atol=1e-4)
        for v, q in enumerate(CONTENT_FREE):
            ref = with_query(p, q, model.tokenizer)
            want = [_edited_by_hand(model, ref, y, heads, 0.0) for y in EDIT_LABELS]
            np.testing.assert_allclose(got.reference["contextual"][i, v], want, atol=1e-4, err_msg=f"{i} {q!r}")


def test_other_attention_control_edits_other_demo_tokens(model):
    """The control's keys: as many demo tokens as the prompt has label tokens, none of them a label or the
    first token, all before the last label, the same on every call (and another draw for another seed);
    scored as a full forward pass with those keys' attention removed by hand, beside the label edit."""
    from mechcopy.conditions import LABELS, Condition
    from mechcopy.heads import head_set
    from mechcopy.hooks import scale_attention
    from mechcopy.scoring import score_labels_conditions

    prompts = _edit_prompts(model, n=4)
    heads = head_set(model, [(1, 0), (1, 2)])
    for p in prompts:
        labels = sum(_label_positions_by_hand(p), [])
        keys = LA.other_positions(model, p, seed=3)
        assert len(keys) == len(labels) and not set(keys) & set(labels) and 0 < min(keys) and max(keys) < max(labels)
        assert keys == LA.other_positions(model, p, seed=3)
    assert any(LA.other_positions(model, p, 3) != LA.other_positions(model, p, 4) for p in prompts)
    edit = dict(components=heads, positions="last", factor=0.0, readout=LABELS)
    got = score_labels_conditions(model, prompts, EDIT_LABELS, [Condition("labels", ablation="label-attention", **edit),
                                                                 Condition("others", ablation="other-attention", seed=3, **edit)],
                                  batch_size=6)
    # two draws of the control on the same heads are two conditions, not one ablation read twice
    from mechcopy.evaluation import evaluate_conditions
    both = evaluate_conditions(model, prompts, [Condition("o3", ablation="other-attention", seed=3, **edit),
                                                Condition("o4", ablation="other-attention", seed=4, **edit)], labels=EDIT_LABELS)
    alone = {s: score_labels_conditions(model, prompts, EDIT_LABELS, [Condition("x", ablation="other-attention", seed=s, **edit)])["x"]
             for s in (3, 4)}
    assert list(both["o3"].predictions) == alone[3].predict() and list(both["o4"].predictions) == alone[4].predict()
    assert not np.allclose(alone[3].logprobs, alone[4].logprobs)
    from mechcopy.evaluation import _ablation_key
    assert _ablation_key(Condition("a", ablation="other-attention", seed=3, **edit)) != \
        _ablation_key(Condition("b", ablation="other-attention", seed=4, **edit))
    for i, p in enumerate(prompts):
        ids = model.to_tokens(p.text)[0].tolist()
        hooks = [("blocks.1.attn.hook_pattern", scale_attention(LA.other_positions(model, p, 3), 0.0, heads=[0, 2],
                                                                query=len(ids) - 1))]
        for j, y in enumerate(EDIT_LABELS):
            label_tokens = [model.tokenizer.convert_tokens_to_ids(c) for c in y]
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                logp = torch.log_softmax(model(torch.tensor([ids + label_tokens])).float(), -1)[0]
            want = float(sum(logp[len(ids) - 1 + t, x] for t, x in enumerate(label_tokens)))
            assert abs(got["others"].logprobs[i, j] - want) < 1e-4
        np.testing.assert_allclose(got["labels"].logprobs[i], [_edited_by_hand(model, p, y, {1: [0, 2]}, 0.0)
                                                              for y in EDIT_LABELS], atol=1e-4)
