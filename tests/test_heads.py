"""Heads as components: sites and checks, head hooks = weight edits (zero and mean), means, what a head
writes, attention scaling, neuron hooks refusing a head site, Mamba refused with one line."""

from types import SimpleNamespace

import pytest
import torch

from mechcopy import heads as H
from mechcopy import hooks
from mechcopy.pruning import component_means, prune_weights
from mechcopy.models.tiny import tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "cat -> 3\ntree -> 4\nlamp ->"
TEXTS = ["cat -> 3\ntree -> 4\nlamp ->", "ab -> 1\nxyz -> 2\nq ->", "hello -> 9\nsun ->"]

#: plain, grouped-query (2 key/value heads for 4 query heads), and Gemma 3's norm after attention
CONFIGS = {"plain": {}, "gqa": {"n_key_value_heads": 2},
           "gqa+post-norm": {"n_key_value_heads": 2, "use_normalization_before_and_after": True}}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    m = tiny_transformer(n_layers=2, seed=3, **CONFIGS[request.param])
    with torch.no_grad():                     # tiny models start with zero biases: give b_O something to carry
        for block in m.blocks:
            block.attn.b_O.normal_(0, 0.3)
    return m


def _with_edited_weights(model, edit, tokens):
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        edit(model)
        return model(tokens)
    finally:
        model.load_state_dict(saved)


def test_sites_checks_and_groups(model):
    assert H.head_site(model, 1) == "blocks.1.attn.hook_z"
    assert H.check_heads(model, [(1, 2), (0, 3), (1, 2)]) == ((0, 3), (1, 2))
    assert H.heads_by_layer([(1, 2), (0, 3), (1, 0)]) == {0: [3], 1: [0, 2]}
    assert len(H.all_heads(model)) == 2 * model.cfg.n_heads
    with pytest.raises(IndexError, match="head 4 out of range: layer 0 has 4 heads"):
        H.check_heads(model, [(0, 4)])
    with pytest.raises(IndexError, match="2 layers"):
        H.check_heads(model, [(2, 0)])
    with pytest.raises(TypeError, match="head must be an integer"):
        H.check_heads(model, [(0, 1.5)])
    # query head h reads key/value head kv_head(h): the group TransformerLens repeats it for
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    assert [H.kv_head(model, h) for h in range(4)] == [h // (4 // n_kv) for h in range(4)]
    attn = model.blocks[0].attn
    for h in range(4):
        torch.testing.assert_close(attn.W_V[h], (attn._W_V if n_kv < 4 else attn.W_V)[H.kv_head(model, h)])


def test_zero_heads_hook_equals_zeroing_w_o(model):
    tokens = model.to_tokens(TEXT)
    chosen = [(0, 1), (1, 0), (1, 3)]
    hooked = model.run_with_hooks(tokens, fwd_hooks=H.head_hooks(model, chosen))
    edited = _with_edited_weights(model, lambda m: prune_weights(m, H.head_set(m, chosen)), tokens)
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=1e-5)
    assert (hooked - model(tokens)).abs().max() > 1e-3
    # and the weight edit is what its docstring says: the heads' rows of W_O are zero, nothing else moved
    saved = model.blocks[1].attn.W_O.clone()
    try:
        prune_weights(model, H.head_set(model, [(1, 0)]))
        assert (model.blocks[1].attn.W_O[0] == 0).all() and torch.equal(model.blocks[1].attn.W_O[1:], saved[1:])
    finally:
        with torch.no_grad():
            model.blocks[1].attn.W_O.copy_(saved)


def test_mean_ablation_hook_equals_weight_edit(model):
    prompts = [SimpleNamespace(text=t) for t in TEXTS]
    means = component_means(model, prompts, "head")
    # the means, by hand: every position of every text
    zs = [model.run_with_cache(t)[1]["blocks.1.attn.hook_z"][0] for t in TEXTS]
    torch.testing.assert_close(means[1], torch.cat(zs).mean(0), atol=1e-6, rtol=1e-5)
    last = component_means(model, prompts, "head", positions="last")
    torch.testing.assert_close(last[1], torch.stack([z[-1] for z in zs]).mean(0), atol=1e-6, rtol=1e-5)
    tokens = model.to_tokens(TEXT)
    chosen = [(0, 2), (1, 1)]
    hooked = model.run_with_hooks(tokens, fwd_hooks=H.head_hooks(model, chosen, means))
    edited = _with_edited_weights(model, lambda m: prune_weights(m, H.head_set(m, chosen), means), tokens)
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=1e-5)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=H.head_hooks(model, chosen))
    assert (hooked - zeroed).abs().max() > 1e-3              # the mean is not zero: not the same ablation


def test_set_heads_at_the_last_position_only(model):
    tokens = model.to_tokens(TEXT)
    _, clean = model.run_with_cache(tokens)
    values = torch.randn(2, model.cfg.d_head)
    store = {}
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", hooks.set_heads([0, 2], values, position=-1)),
                                            ("blocks.1.attn.hook_z", hooks.capture(store))])
    got, ref = store["blocks.1.attn.hook_z"], clean["blocks.1.attn.hook_z"]
    torch.testing.assert_close(got[0, -1, [0, 2]], values)
    assert torch.equal(got[:, :-1], ref[:, :-1]) and torch.equal(got[0, -1, [1, 3]], ref[0, -1, [1, 3]])
    with pytest.raises(ValueError, match="one row of d_head values per head"):
        hooks.set_heads([0, 1], values[:1])
    with pytest.raises(IndexError, match="head index 4 out of range"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", hooks.zero_heads([4]))])
    with pytest.raises(ValueError, match="per-head activation"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", hooks.zero_heads([0]))])


def test_head_writes_sum_to_the_attention_output(model):
    tokens = model.to_tokens(TEXT)
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        per_head, bias = H.head_writes(model, cache, layer)
        torch.testing.assert_close(per_head.sum(1) + bias, cache[f"blocks.{layer}.hook_attn_out"][:, -1],
                                   atol=1e-5, rtol=1e-5)
        # without the post-attention norm, a head's write is z @ W_O, by hand
        if not model.cfg.use_normalization_before_and_after:
            z = cache[f"blocks.{layer}.attn.hook_z"][0, -1, 2]
            torch.testing.assert_close(per_head[0, 2], z @ model.blocks[layer].attn.W_O[2])


def test_neuron_hooks_refuse_a_head_site(tiny):
    tokens = tiny.to_tokens(TEXT)
    for hook in (hooks.zero_neurons([8]), hooks.scale_neurons([1], 2.0), hooks.set_neurons([1], torch.tensor([0.0])),
                 hooks.patch_from_cache({}, idx=[1])):
        with pytest.raises(ValueError, match=r"blocks\.1\.attn\.hook_z has shape \[1, \d+, 4, 8\] \(a per-head site"):
            tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", hook)])
    # the neuron sites still take them
    tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", hooks.zero_neurons([8]))])


def test_patch_from_cache_heads_and_aligned_positions(tiny):
    a, b = tiny.to_tokens("abc -> 3"), tiny.to_tokens("xyzw -> 4")
    _, cache = tiny.run_with_cache(a)
    site = "blocks.1.attn.hook_z"
    store = {}
    # head 2 of b's last 3 positions from a's last 3 positions (different lengths, aligned from the end)
    tiny.run_with_hooks(b, fwd_hooks=[(site, hooks.patch_from_cache(cache, positions=[-3, -2, -1], heads=[2],
                                                                    source_positions=[-3, -2, -1])),
                                      (site, hooks.capture(store))])
    _, cache_b = tiny.run_with_cache(b)
    got = store[site]
    torch.testing.assert_close(got[0, -3:, 2], cache[site][0, -3:, 2])
    assert torch.equal(got[0, :-3], cache_b[site][0, :-3]) and torch.equal(got[0, :, [0, 1, 3]], cache_b[site][0, :, [0, 1, 3]])
    with pytest.raises(ValueError, match="not both"):
        hooks.patch_from_cache(cache, idx=[1], heads=[1])
    with pytest.raises(ValueError, match="source_positions needs positions"):
        hooks.patch_from_cache(cache, source_positions=[1])


def test_patch_heads_by_group_equals_one_patch_per_run(tiny):
    a, b = tiny.to_tokens("abc -> 3\nde ->"), tiny.to_tokens("xyz -> 4\nfg ->")
    _, cache = tiny.run_with_cache(a)
    site = "blocks.0.attn.hook_z"
    groups = [(0, None, None), (3, [2, 5], None), (1, [-1], [-2])]
    together = tiny.run_with_hooks(b.repeat(3, 1), fwd_hooks=[(site, hooks.patch_heads_by_group(cache[site], groups))])
    for g, (head, pos, src) in enumerate(groups):
        alone = tiny.run_with_hooks(b, fwd_hooks=[(site, hooks.patch_from_cache(cache, positions=pos, heads=[head],
                                                                             source_positions=src))])
        torch.testing.assert_close(together[g:g + 1], alone, atol=1e-5, rtol=1e-5)


def test_scale_attention(model):
    tokens = model.to_tokens(TEXT)
    site = "blocks.1.attn.hook_pattern"
    keys = [3, 5, 6]
    # factor 0 with renormalising = masking those scores out before the softmax (by hand, at hook_attn_scores)
    def mask_scores(scores, hook):
        scores = scores.clone()
        scores[:, :, -1, keys] = float("-inf")
        return scores

    hand = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_attn_scores", mask_scores)])
    ours = model.run_with_hooks(tokens, fwd_hooks=[(site, hooks.scale_attention(keys, 0.0))])
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)
    # factor f with renormalising = adding log(f) to those scores; only the chosen heads move
    def add_log(scores, hook):
        scores = scores.clone()
        scores[:, 1, -1, keys] += torch.log(torch.tensor(3.0))
        return scores

    hand = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_attn_scores", add_log)])
    ours = model.run_with_hooks(tokens, fwd_hooks=[(site, hooks.scale_attention(keys, 3.0, heads=[1]))])
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)
    store = {}
    model.run_with_hooks(tokens, fwd_hooks=[(site, hooks.scale_attention(keys, 2.0, renormalise=False)),
                                            (site, hooks.capture(store))])
    _, clean = model.run_with_cache(tokens)
    torch.testing.assert_close(store[site][0, :, -1, keys], 2 * clean[site][0, :, -1, keys])
    assert torch.equal(store[site][0, :, :-1], clean[site][0, :, :-1])


def test_mamba_is_refused_with_one_line(mamba):
    from mechcopy import head_attribution as HA, head_patching as HP, label_attention as LA, viz

    calls = [lambda: H.head_site(mamba, 0), lambda: H.head_set(mamba, [(0, 0)]), lambda: H.head_hooks(mamba, [(0, 0)]),
             lambda: H.check_heads(mamba, [(0, 0)]), lambda: HA.direct_logit_attribution(mamba, []),
             lambda: HA.head_integrated_gradients(mamba, [TEXT]), lambda: LA.label_attention(mamba, []),
             lambda: HP.patch_heads(mamba, mamba.to_tokens(TEXT), mamba.to_tokens(TEXT), lambda x: 0.0),
             lambda: viz.head_attention_view(mamba, None, [(0, 0)])]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "needs attention heads, and a mamba model has none" in msg and "\n" not in msg
