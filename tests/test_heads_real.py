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


def test_label_attention_edit_on_smollm2(smollm2):
    """On SmolLM2 (grouped-query heads, BPE labels of several tokens, left-padded prompts of different
    lengths) the label-attention condition scores each label as a full forward pass of prompt + label does
    with the answer position's attention to the demo labels removed by hand (`hooks.scale_attention`)."""
    import numpy as np

    from mechcopy.conditions import LABELS, UNPRUNED, Condition
    from mechcopy.hooks import scale_attention
    from mechcopy.scoring import label_ids, score_labels_conditions
    from mechcopy.tasks import load_tasks
    from mechcopy.tasks.prompts import build_prompts

    model = smollm2
    task = load_tasks("sentiment_five")[0]
    labels = task.require_labels()
    prompts = build_prompts(task, model.tokenizer, shots=4, n=3, seed=0, gold_in_demos=False).prompts
    heads = {23: [0, 2], 26: [1]}
    edit = Condition("edit", components=H.head_set(model, [(l, h) for l, hs in heads.items() for h in hs]),
                     ablation="label-attention", positions="last", factor=0.0, readout=LABELS)
    got = score_labels_conditions(model, prompts, labels, [UNPRUNED, edit], batch_size=8)
    for i, p in enumerate(prompts):
        ids = model.to_tokens(p.text)[0].tolist()
        keys = sum(label_positions(model, p), [])
        hooks = [(f"blocks.{l}.attn.hook_pattern", scale_attention(keys, 0.0, heads=hs, query=len(ids) - 1))
                 for l, hs in heads.items()]
        for j, x in enumerate(label_ids(model.tokenizer, p, labels)):
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                logp = torch.log_softmax(model(torch.tensor([ids + list(x)])).float(), -1)[0]
            want = float(sum(logp[len(ids) - 1 + t, tok] for t, tok in enumerate(x)))
            assert abs(got["edit"].logprobs[i, j] - want) < 2e-3, (i, labels[j])
    assert not np.allclose(got["edit"].logprobs, got["unpruned"].logprobs, atol=1e-3)
