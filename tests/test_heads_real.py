"""Heads on the zoo models (slow): per-head DLA sums to the logit difference (Gemma 3 through its
post-attention norm), head ablation by hook equals the weight edit, label attention reads the pattern,
and the prompts' tokens and roles come out on both tokenizers."""

import pytest
import torch

from mechcopy import heads as H
from mechcopy.pruning import prune_weights
from mechcopy.head_attribution import direct_logit_attribution
from mechcopy.label_attention import label_attention, label_positions
from mechcopy.tasks.probe import ProbeConfig, build_probe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(params=["smollm2", "gemma"])
def model(request):
    return request.getfixturevalue(request.param)


def test_heads_on_a_zoo_model(model):
    prompts = list(build_probe(model.tokenizer, ProbeConfig(), n_attr=2, n_dev=0, n_test=0, seed=0).attribution)
    assert model.cfg.n_key_value_heads < model.cfg.n_heads                   # grouped-query attention
    d = direct_logit_attribution(model, prompts)
    assert (d.total() - d.logit_diff).abs().max() < 1e-3
    assert d.heads.abs().max() > 1e-2
    tokens = model.to_tokens(prompts[0].text)
    chosen = [(model.cfg.n_layers - 2, 1), (3, 0)]
    hooked = model.run_with_hooks(tokens, fwd_hooks=H.head_hooks(model, chosen))[0, -1]
    saved = {l: model.blocks[l].attn.W_O.detach().clone() for l, _ in chosen}
    try:
        prune_weights(model, H.head_set(model, chosen))
        edited = model(tokens)[0, -1]
    finally:
        with torch.no_grad():
            for l, w in saved.items():
                model.blocks[l].attn.W_O.copy_(w)
    assert (hooked - edited).abs().max() < 1e-3 and (hooked - model(tokens)[0, -1]).abs().max() > 1e-3
    la = label_attention(model, prompts[:1])
    positions = label_positions(model, prompts[0])
    assert [model.to_str_tokens(tokens[0])[p[-1]].strip() for p in positions] == list(prompts[0].demo_labels)
    _, cache = model.run_with_cache(tokens)
    layer = model.cfg.n_layers - 3
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]
    torch.testing.assert_close(la.to_labels[0, layer], pattern[:, sum(positions, [])].sum(-1), atol=1e-5, rtol=1e-4)
