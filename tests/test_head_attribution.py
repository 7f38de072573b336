"""Attribution over heads: direct logit attribution sums to the logit difference (plain, grouped-query,
Gemma 3's post-attention norm) and equals TransformerLens' own per-head decomposition; IG over heads
meets completeness per layer, its fast path equals the reference; gradient x activation equals a
gradient taken by hand; label-swap targets."""

import pytest
import torch

from mechcopy import head_attribution as HA
from mechcopy.models.tiny import tiny_transformer
from mechcopy.tasks.pairs import corrupt_prompt
from mechcopy.tasks.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"plain": {}, "gqa": {"n_key_value_heads": 2},
           "gqa+post-norm": {"n_key_value_heads": 2, "use_normalization_before_and_after": True}}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    m = tiny_transformer(n_layers=3, seed=1, **CONFIGS[request.param])
    with torch.no_grad():
        for block in m.blocks:
            block.attn.b_O.normal_(0, 0.3)
        m.ln_final.w.normal_(1, 0.2)           # a final norm weight that is not all ones
    return m


@pytest.fixture(scope="module")
def prompts(model):
    tok = model.tokenizer
    return [make_prompt([("cat", "3"), ("tree", "4"), ("fish", "5")], ("lamp", "7"), tok),
            make_prompt([("ab", "1"), ("cde", "2")], ("xy", "6"), tok)]


def test_dla_terms_sum_to_the_logit_difference(model, prompts):
    d = HA.direct_logit_attribution(model, prompts)
    assert d.heads.shape == (2, 3, 4)
    torch.testing.assert_close(d.total(), d.logit_diff, atol=1e-4, rtol=1e-4)
    # the logit difference is the model's own, read by hand; plus = the copied demo label, minus = gold
    for p, plus, minus, ld in zip(prompts, d.plus, d.minus, d.logit_diff):
        logits = model(p.text)[0, -1].detach()
        assert abs(float(logits[plus] - logits[minus]) - float(ld)) < 1e-4
        assert minus == p.answer_ids[0] and plus in {ids[0] for ids in p.demo_label_ids}
    # the heads carry real weight in it (the test is not carried by the other terms alone)
    assert d.heads.abs().max() > 0.05
    back = HA.HeadDLA.from_json(d.to_json())
    torch.testing.assert_close(back.heads, d.heads)


def test_dla_per_head_equals_transformer_lens_stack(prompts):
    """On a model without a post-attention norm, TransformerLens' own decomposition gives the same heads."""
    model = tiny_transformer(n_layers=3, seed=1, n_key_value_heads=2)
    with torch.no_grad():
        model.ln_final.w.normal_(1, 0.2)
    d = HA.direct_logit_attribution(model, prompts)
    for i, p in enumerate(prompts):
        _, cache = model.run_with_cache(p.text)
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)      # [layers*heads, 1, d_model]
        direction = model.ln_final.w * (model.W_U[:, d.plus[i]] - model.W_U[:, d.minus[i]])
        theirs = (stack[:, 0] @ direction).reshape(3, 4)
        torch.testing.assert_close(d.heads[i], theirs, atol=1e-5, rtol=1e-4)


def test_dla_with_a_label_swap_target(model, prompts):
    p = prompts[0]
    target = HA.label_swap_target(p, "5")
    assert target.copy == p.demo_label_ids[2][0] and target.gold == p.answer_ids[0]
    d = HA.direct_logit_attribution(model, [p], target=[target])
    logits = model(p.text)[0, -1].detach()
    assert abs(float(d.total()[0]) - float(logits[target.copy] - logits[target.gold])) < 1e-4
    with pytest.raises(ValueError, match="not a demo label"):
        HA.label_swap_target(p, "9")
    with pytest.raises(ValueError, match="two-token contrast"):
        HA.direct_logit_attribution(model, [p], target="gold_logprob")


def _completeness(att):
    """The largest |sum IG - (T(z) - T(z'))| over prompts and layers, relative to the largest delta (a
    relative error per entry would be float32 noise where a delta is ~1e-5)."""
    return ((att.sums - att.deltas).abs().max() / att.deltas.abs().max()).item()


def test_ig_completeness_and_fast_equals_reference(model, prompts):
    post = model.cfg.use_normalization_before_and_after
    rng = __import__("random").Random(0)
    # a counterfactual baseline: the same prompt with its demo labels shuffled (a label-swap prompt)
    swaps = [corrupt_prompt(p, "shuffled_labels", model.tokenizer, rng) for p in prompts]
    baselines = [swaps] if post else ["zero", swaps]
    for baseline in baselines:
        fast = HA.head_integrated_gradients(model, prompts, steps=48, method="fast", baseline=baseline)
        ref = HA.head_integrated_gradients(model, prompts, steps=48, method="reference", baseline=baseline)
        assert fast.values.shape == (2, 3, 4)
        torch.testing.assert_close(fast.values, ref.values, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(fast.target_zero, ref.target_zero, atol=1e-4, rtol=1e-3)
        assert _completeness(fast) < 1e-3, (baseline if isinstance(baseline, str) else "counterfactual")
        assert fast.deltas.abs().max() > 1e-3          # completeness is not met by deltas of zero
        assert fast.baseline == ("zero" if isinstance(baseline, str) else "counterfactual")
    # the counterfactual's target at the baseline is the run with that layer's last z from the swap prompt
    _, swap_cache = model.run_with_cache(swaps[0].text)
    z_swap = swap_cache["blocks.1.attn.hook_z"][0, -1]

    def put(z, hook):
        z = z.clone()
        z[:, -1] = z_swap
        return z

    logits = model.run_with_hooks(prompts[0].text, fwd_hooks=[("blocks.1.attn.hook_z", put)])[0, -1].detach()
    target = fast.copy_tokens[0], fast.gold_tokens[0]
    assert abs(float(logits[target[0]] - logits[target[1]]) - float(fast.target_zero[0, 1])) < 1e-4


def test_ig_with_any_target_and_layers(model, prompts):
    targets = [HA.label_swap_target(prompts[0], "3"), HA.label_swap_target(prompts[1], "2")]
    rng = __import__("random").Random(1)
    base = [corrupt_prompt(p, "shuffled_labels", model.tokenizer, rng) for p in prompts]
    att = HA.head_integrated_gradients(model, prompts, target=targets, steps=48, baseline=base, layers=[1, 2])
    assert att.values.shape == (2, 2, 4) and att.layers == (1, 2) and att.copy_tokens[0] == targets[0].copy
    assert _completeness(att) < 1e-3
    logp = HA.head_integrated_gradients(model, prompts, target="gold_logprob", steps=48, baseline=base, layers=[2])
    assert _completeness(logp) < 1e-3
    with pytest.raises(ValueError, match="1 counterfactual prompts for 2 prompts"):
        HA.head_integrated_gradients(model, prompts, baseline=base[:1])


def test_grad_x_act_equals_a_gradient_by_hand(model, prompts):
    p = prompts[0]
    att = HA.head_grad_x_act(model, [p], method="fast")
    ref = HA.head_grad_x_act(model, [p], method="reference")
    torch.testing.assert_close(att.values, ref.values, atol=1e-5, rtol=1e-4)
    _, cache = model.run_with_cache(p.text)
    z = cache["blocks.2.attn.hook_z"][0, -1].clone().requires_grad_(True)

    def put(act, hook):
        return torch.cat([act[:, :-1], z[None, None]], 1)

    logits = model.run_with_hooks(p.text, fwd_hooks=[("blocks.2.attn.hook_z", put)])[0, -1]
    target = logits[att.copy_tokens[0]] - logits[att.gold_tokens[0]]
    (grad,) = torch.autograd.grad(target, z)
    torch.testing.assert_close(att.values[0, 2], (grad * z).sum(-1).detach(), atol=1e-5, rtol=1e-4)


def test_head_attributions_join_and_say_their_baseline(model, prompts):
    rng = __import__("random").Random(0)
    base = [corrupt_prompt(p, "shuffled_labels", model.tokenizer, rng) for p in prompts]
    parts = [HA.head_grad_x_act(model, [p], baseline=[b]) for p, b in zip(prompts, base)]
    whole = HA.HeadAttributions.cat(parts)
    assert whole.baseline == "counterfactual" and whole.values.shape == (2, 3, 4)
    torch.testing.assert_close(whole.values, HA.head_grad_x_act(model, prompts, baseline=base).values)
    assert whole.to_json()["component"] == "heads"
    with pytest.raises(ValueError, match="different baselines"):
        HA.HeadAttributions.cat([parts[0], HA.head_grad_x_act(model, [prompts[0]])])


def test_zero_baseline_fails_completeness_after_a_post_attention_norm():
    """What the module docstring warns of: with Gemma 3's norm after the attention, no output bias and a
    small eps, scaling a layer's heads together changes nothing until they are near zero, so IG from zero
    misses completeness (at 20 steps the sums are near 0), while a counterfactual baseline meets it."""
    model = tiny_transformer(n_layers=3, seed=1, n_key_value_heads=2, use_normalization_before_and_after=True, eps=1e-8)
    tok = model.tokenizer
    p = make_prompt([("cat", "3"), ("tree", "4"), ("fish", "5")], ("lamp", "7"), tok)
    for steps in (20, 64):
        assert HA.head_integrated_gradients(model, [p], steps=steps).completeness_error().max() > 0.1
    swap = corrupt_prompt(p, "shuffled_labels", tok, __import__("random").Random(0))
    assert _completeness(HA.head_integrated_gradients(model, [p], steps=20, baseline=[swap])) < 1e-3


def test_copied_to_gold_replaces_the_copied_label(model, prompts):
    from mechcopy.attribution import make_target

    for p, cf in zip(prompts, HA.copied_to_gold(model, prompts)):
        with torch.no_grad():
            copy = make_target("contrast", p, model(p.text)[0, -1]).copy
        c = next(y for y, ids in zip(p.demo_labels, p.demo_label_ids) if ids[0] == copy)
        assert c not in cf.demo_labels and cf.query == p.query and cf.answer == p.answer
        assert [x for x, _ in cf.demos] == [x for x, _ in p.demos]
        assert list(cf.demo_labels) == [p.answer if y == c else y for y in p.demo_labels]
