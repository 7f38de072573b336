"""Neuron cards: every part against an independent computation, on a tiny transformer and a tiny Mamba."""

from collections import Counter

import pytest
import torch

from mechcopy.cards import NO_COPY, direction_logits, neuron_cards
from mechcopy.evaluation import evaluate
from mechcopy.hooks import zero_neurons
from mechcopy.sites import neuron_site
from mechcopy.tasks.probe import ProbeConfig, build_probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("which", ["tiny3", "mamba"])
def test_cards_against_direct_computations(which, request):
    model = request.getfixturevalue(which)
    prompts = build_probe(model.tokenizer, ProbeConfig(), 12, 0, 0, seed=3).attribution
    neurons = [(1, 3), (0, 17)]
    cards = neuron_cards(model, neurons, prompts, top=5)
    clean = evaluate(model, prompts).predictions
    for card, (layer, idx) in zip(cards, neurons):
        assert (card.layer, card.index) == (layer, idx)
        # writes: a hand matmul of the weight that reads the neuron, the final norm's gain and W_U
        if which == "mamba":
            w = model.blocks[layer].mixer.out_proj.weight[:, idx]
        else:
            w = model.blocks[layer].mlp.W_out[idx]
        logits = ((w * model.ln_final.w) @ model.unembed.W_U).detach()
        assert torch.allclose(direction_logits(model, layer, idx), logits, atol=1e-6)
        order = logits.argsort(descending=True)
        assert [t for t, _ in card.promoted] == [model.tokenizer.decode([int(i)]) for i in order[:5]]
        assert [t for t, _ in card.suppressed] == [model.tokenizer.decode([int(i)]) for i in order.flip(0)[:5]]
        for p in prompts:
            assert card.label_logits[p.answer] == pytest.approx(float(logits[p.answer_ids[0]]), abs=1e-5)
        # fires: the activation read from run_with_cache, grouped by hand
        site = neuron_site(model, layer)
        acts = []
        for p in prompts:
            _, cache = model.run_with_cache(p.text, names_filter=site)
            acts.append(float(cache[site][0, -1, idx]))
        assert card.activations == pytest.approx(acts, abs=1e-5)
        for label in {p.answer for p in prompts}:
            want = [a for a, p in zip(acts, prompts) if p.answer == label]
            assert card.activation_by_gold()[label] == pytest.approx(sum(want) / len(want), abs=1e-5)
        copied = [pred if pred != p.answer and pred in p.demo_labels else NO_COPY for p, pred in zip(prompts, clean)]
        for label in set(copied):
            want = [a for a, c in zip(acts, copied) if c == label]
            assert card.activation_by_copied()[label] == pytest.approx(sum(want) / len(want), abs=1e-5)
        # pruned alone: a direct evaluation under zero_neurons
        pruned = evaluate(model, prompts, fwd_hooks=[(site, zero_neurons([idx]))]).predictions
        assert card.label_counts() == dict(sorted(Counter(clean).items()))
        assert card.label_counts(pruned=True) == dict(sorted(Counter(pruned).items()))
        assert card.to_json()["label_counts_pruned"] == card.label_counts(pruned=True)


def test_card_figure(tiny3):
    from matplotlib.figure import Figure

    from mechcopy.viz import plot_neuron_cards

    prompts = build_probe(tiny3.tokenizer, ProbeConfig(), 6, 0, 0).attribution
    cards = neuron_cards(tiny3, [(2, 5), (1, 1)], prompts, top=4)
    fig = plot_neuron_cards(cards)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert len(plot_neuron_cards(cards[0]).axes) == 3
    with pytest.raises(ValueError):
        neuron_cards(tiny3, [], prompts)
