"""Size-matched random baselines: component sizes equal a hand computation (neurons: mean |a| at the
answer position from plain cached runs; heads: the norm of TransformerLens' own per-head output
`hook_result`), and the size-matched sets match the selected set's mean size within 10% per layer."""

import numpy as np
import pytest
import torch

from mechcopy.components import SIZE_TOLERANCE, Components, random_matched
from mechcopy.fingerprint import model_fingerprint
from mechcopy.models.tiny import tiny_transformer
from mechcopy.pruning import component_sizes
from mechcopy.tasks.probe import probe_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["transformer", "mamba"])
def model(request):
    from mechcopy.models.mamba import tiny_mamba

    if request.param == "transformer":
        return tiny_transformer(n_layers=3, d_model=32, d_mlp=256, seed=4)
    return tiny_mamba(n_layers=3, d_model=64, seed=4)


def prompts(model, n=12):
    ps = list(probe_prompts(model.tokenizer, n=n, shots=3, seed=1))
    assert len({len(p.text) for p in ps}) > 1             # prompts of several lengths share padded batches
    return ps


def hand_sizes(model, ps, site):
    """Mean |activation| at each prompt's last token, one unpadded prompt at a time."""
    rows = []
    for p in ps:
        _, cache = model.run_with_cache(model.to_tokens(p.text), names_filter=lambda n: n in set(site.values()))
        rows.append(np.stack([cache[site[l]][0, -1].abs().numpy() for l in sorted(site)]))
    return np.mean(rows, axis=0)


def test_neuron_sizes_equal_a_hand_computation(model):
    from mechcopy.arch import arch_of

    ps = prompts(model)
    sizes = component_sizes(model, ps, batch_size=5, reference="probe")
    want = hand_sizes(model, ps, {l: arch_of(model).neuron_site(model, l) for l in range(3)})
    np.testing.assert_allclose(np.stack([sizes[l].numpy() for l in range(3)]), want, rtol=1e-4, atol=1e-6)
    assert sizes.describe() == {"kind": "neuron", "reference": "probe", "n_prompts": len(ps)}


def test_head_sizes_are_the_norm_of_each_heads_output(tiny3):
    ps = prompts(tiny3)
    sizes = component_sizes(tiny3, ps, kind="head", batch_size=4)
    tiny3.set_use_attn_result(True)
    try:
        names = {f"blocks.{l}.attn.hook_result" for l in range(3)}
        want = np.mean([np.stack([cache[f"blocks.{l}.attn.hook_result"][0, -1].norm(dim=-1).numpy() for l in range(3)])
                        for cache in (tiny3.run_with_cache(tiny3.to_tokens(p.text), names_filter=lambda n: n in names)[1]
                                      for p in ps)], axis=0)
    finally:
        tiny3.set_use_attn_result(False)
    np.testing.assert_allclose(np.stack([sizes[l].numpy() for l in range(3)]), want, rtol=1e-4)
    heads = Components(((0, 1), (2, 3)), model_fingerprint(tiny3), kind="head")
    r = random_matched(tiny3, heads, 0, "size", sizes)
    assert r.kind == "head" and r.layer_counts(3) == heads.layer_counts(3) and set(r.meta["size_ratio"]) == {"0", "2"}


def large_set(sizes, per_layer=8, from_rank=12):
    """In every layer, `per_layer` components among the larger ones (ranks from_rank... by size), as copy
    neurons tend to be (issue 25: the selected SmolLM2 neurons are far louder than random ones)."""
    pairs = []
    for layer, s in sizes.values.items():
        order = torch.argsort(s, descending=True)
        pairs += [(layer, int(i)) for i in order[from_rank:from_rank + 2 * per_layer:2]]
    return pairs


def test_size_matched_sets_match_the_mean_size_per_layer(model):
    sizes = component_sizes(model, prompts(model))
    chosen = Components(tuple(large_set(sizes)), model_fingerprint(model))
    layer = [random_matched(model, chosen, s) for s in range(4)]
    matched = [random_matched(model, chosen, s, "size", sizes) for s in range(4)]
    assert len({r.pairs for r in matched}) == 4                         # random: every seed its own set
    for r in matched:
        assert r.layer_counts(3) == chosen.layer_counts(3) and not set(r.pairs) & set(chosen.pairs)
        assert r.meta["match"] == "size" and r.meta["size_mismatch"] == []
        for l, idx in chosen.by_layer().items():
            mine = sizes[l][[i for ll, i in r.pairs if ll == l]].mean()
            ratio = float(mine / sizes[l][idx].mean())
            assert abs(ratio - 1) <= SIZE_TOLERANCE, (l, ratio)
            assert r.meta["size_ratio"][str(l)] == pytest.approx(ratio, abs=1e-4)
    # the layer-matched sets are much quieter: what size matching is for
    quiet = [float(sizes[l][[i for ll, i in r.pairs if ll == l]].mean() / sizes[l][idx].mean())
             for r in layer for l, idx in chosen.by_layer().items()]
    assert np.mean(quiet) < 0.8
    assert "match" in layer[0].meta and layer[0].meta["match"] == "layer" and "size_ratio" not in layer[0].meta


def test_a_layers_loudest_components_cannot_be_matched_and_it_is_said(model, capsys):
    sizes = component_sizes(model, prompts(model))
    top = Components(tuple(large_set(sizes, per_layer=3, from_rank=0)), model_fingerprint(model))
    r = random_matched(model, top, 1, "size", sizes)
    assert r.meta["size_mismatch"] and all(r.meta["size_ratio"][str(l)] < 1 for l in r.meta["size_mismatch"])
    assert "mean size off by more than 10%" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size matching needs the sizes"):
        random_matched(model, top, 1, "size")
    with pytest.raises(ValueError, match="unknown match"):
        random_matched(model, top, 1, "norm", sizes)


def test_layer_matching_is_unchanged():
    """match="layer" draws exactly what the layer-matched baseline drew before sizes existed."""
    model = tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=0)
    chosen = Components(((0, 3), (0, 9), (2, 1)), model_fingerprint(model))
    gen = torch.Generator().manual_seed(7)
    want = []
    for layer, idx in chosen.by_layer().items():
        pool = torch.ones(64, dtype=torch.bool)
        pool[idx] = False
        cand = pool.nonzero()[:, 0]
        want += [(layer, int(i)) for i in cand[torch.randperm(len(cand), generator=gen)[: len(idx)]]]
    assert random_matched(model, chosen, 7).pairs == tuple(sorted(want))
