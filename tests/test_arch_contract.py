"""The architecture contract: the same checks, once per architecture (tiny transformer, tiny Mamba).

A new architecture is done when its tiny model passes every test here (docs/architecture.md).
"""

import re
from pathlib import Path

import pytest
import torch

from mechcopy.arch import MAMBA, TRANSFORMER, arch_of
from mechcopy.hooks import zero_neurons
from mechcopy.neurons import NeuronSet, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["transformer", "mamba"])
def case(request):
    from mechcopy.models.mamba import tiny_mamba
    from mechcopy.models.tiny import tiny_transformer

    if request.param == "transformer":
        model, arch = tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=3), TRANSFORMER
    else:
        model, arch = tiny_mamba(n_layers=3, d_model=32, seed=3), MAMBA
    tokens = model.to_tokens("hot -> cold\nbig -> small\nfast ->")
    return model, arch, tokens


def test_arch_of_names_the_architecture(case):
    model, arch, _ = case
    assert arch_of(model) is arch and arch.name in ("transformer", "mamba")
    assert model_fingerprint(model)["architecture"] == arch.architecture_name(model)
    with pytest.raises(TypeError, match="hooked model"):
        arch_of(torch.nn.Linear(2, 2))


def test_neuron_sites_and_components_are_hook_points(case):
    model, arch, tokens = case
    for layer in range(model.cfg.n_layers):
        site = arch.neuron_site(model, layer)
        assert site in model.hook_dict
        _, cache = model.run_with_cache(tokens, names_filter=site)
        assert cache[site].shape[-1] == arch.neurons_per_layer(model)
        for template in arch.components.values():
            assert template.format(layer=layer) in model.hook_dict
    for bad in (-1, model.cfg.n_layers):
        with pytest.raises(IndexError):
            arch.neuron_site(model, bad)
    for bad in (1.5, True, "1"):     # refused by its own check, or first by its `int` annotation in the tests
        with pytest.raises(TypeError, match="must be an integer|typechecking parameter 'layer'"):
            arch.neuron_site(model, bad)


def test_forward_tail_matches_the_full_model(case):
    model, arch, tokens = case
    with torch.no_grad():
        full = model(tokens)
        assert torch.allclose(arch.last_logits(model, tokens), full[:, -1], atol=1e-5)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        rows = [3, 7, 11]
        assert torch.allclose(arch.final_logits(model, resid, rows), full[..., rows], atol=1e-5)
        # starting at a layer from the cached residual stream gives the same logits
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
        for layer in range(model.cfg.n_layers):
            got = arch.last_logits(model, cache[f"blocks.{layer}.hook_resid_pre"], start_at_layer=layer)
            assert torch.allclose(got, full[:, -1], atol=1e-5), layer


def test_decoder_continues_exactly(case):
    model, arch, tokens = case
    batch = torch.cat([tokens, tokens.flip(0)])  # two identical rows: the decoder keeps them apart
    decode = arch.decoder(model)
    seq = batch[:, :-3]
    with torch.no_grad():
        logits = decode(seq)
        for step in range(3):
            assert torch.allclose(logits, arch.last_logits(model, seq), atol=1e-4), step
            nxt = batch[:, seq.shape[1]:seq.shape[1] + 1]
            seq = torch.cat([seq, nxt], dim=1)
            logits = decode(nxt)
        assert torch.allclose(logits, arch.last_logits(model, seq), atol=1e-4)


def _left_padded(model, texts):
    from mechcopy.batching import left_pad

    rows = [model.to_tokens(t)[0] for t in texts]
    return rows, *left_pad(rows, pad_id=5)


TEXTS = ["hot -> cold\nbig -> small\nfast ->", "a -> b\nc ->", "up -> down\nleft -> right\nin -> out\nyes ->", "x"]


def test_decoder_pads_left_exactly(case):
    """Left-padded rows give each prompt's own logits, on the prompt and on every generated token."""
    model, arch, _ = case
    rows, tokens, mask = _left_padded(model, TEXTS)
    assert len({len(r) for r in rows}) == len(rows) and (mask == 0).any()
    decode = arch.decoder(model)
    with torch.no_grad():
        padded = [decode(tokens, mask)]
        for _ in range(3):
            padded.append(decode(padded[-1].argmax(-1)[:, None]))
        for r, row in enumerate(rows):
            alone = arch.decoder(model)
            for step, logits in enumerate(padded):
                inp = row[None] if step == 0 else padded[step - 1][r].argmax()[None, None]
                assert torch.allclose(alone(inp)[0], logits[r], atol=1e-4), (r, step)


@pytest.mark.parametrize("fork_at", [0, 1, 2])
def test_decoder_forks_exactly(case, fork_at):
    """Row group g of a forked batch gives what a separate run under group g's hooks gives."""
    from mechcopy.hooks import ablate_by_group, zero_neurons

    model, arch, _ = case
    _, tokens, mask = _left_padded(model, TEXTS)
    width, n = arch.neurons_per_layer(model), model.cfg.n_layers
    prune = [{}, {fork_at: range(0, width, 2)}, {l: range(l, width // 2) for l in range(fork_at, n)}]
    masks = {l: torch.ones(len(prune), width) for l in range(fork_at, n)}
    for g, layers in enumerate(prune):
        for l, idx in layers.items():
            masks[l][g, list(idx)] = 0.0
    batch = tokens.shape[0]
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(arch.neuron_site(model, l), ablate_by_group(m)) for l, m in masks.items()]):
            decode = arch.decoder(model, groups=len(prune), fork_at=fork_at)
            forked = [decode(tokens, mask)]
            forked.append(decode(forked[0].argmax(-1)[:, None]))
        for g, layers in enumerate(prune):
            rows = slice(g * batch, (g + 1) * batch)
            with model.hooks(fwd_hooks=[(arch.neuron_site(model, l), zero_neurons(list(i))) for l, i in layers.items()]):
                alone = arch.decoder(model)
                assert torch.allclose(alone(tokens, mask), forked[0][rows], atol=1e-5), g
                assert torch.allclose(alone(forked[0][rows].argmax(-1)[:, None]), forked[1][rows], atol=1e-5), g
    assert not torch.allclose(forked[0][:batch], forked[0][batch:2 * batch], atol=1e-3)  # the groups differ


def _clean_runs(model, arch, tokens):
    """Caches of what the stepper reads, the neuron sites and the last block's output, per prompt."""
    n = model.cfg.n_layers
    names = set(arch.ig_cache_names(model)) | {arch.neuron_site(model, l) for l in range(n)}
    names |= {f"blocks.{n - 1}.hook_resid_post"}
    with torch.no_grad():
        return [model.run_with_cache(t, names_filter=lambda name: name in names)[1] for t in tokens]


def _per_prompt(caches, name, rows, pick=lambda a: a[:, -1:]):
    return torch.cat([pick(c[name]).expand(rows, *pick(c[name]).shape[1:]) for c in caches])


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_ig_stepper_continues_the_prefix(case, n_prompts):
    """Rows stepped from block l, or entering at layer l's neuron site, reproduce the clean run's last
    position; two prompts of different lengths share one batch of rows."""
    model, arch, tokens = case
    prompts = [tokens, tokens[:, :-5]][:n_prompts]
    caches = _clean_runs(model, arch, prompts)
    step = arch.ig_stepper(model, prompts, caches)
    n = model.cfg.n_layers
    want = _per_prompt(caches, f"blocks.{n - 1}.hook_resid_post", 3)
    with torch.no_grad():
        for layer in range(n):
            x = _per_prompt(caches, f"blocks.{layer}.hook_resid_pre", 3)
            for l in range(layer, n):
                x = step.step(l, x)
            assert torch.allclose(x, want, atol=1e-5), layer
            x = step.enter(layer, _per_prompt(caches, arch.neuron_site(model, layer), 3, lambda a: a[0, -1:]))
            for l in range(layer + 1, n):
                x = step.step(l, x)
            assert torch.allclose(x, want, atol=1e-5), layer


def test_ig_stepper_fires_the_neuron_site(case):
    """A pruning hook at the neuron site acts on the rows that enter there, as on the clean run."""
    model, arch, tokens = case
    n, layer = model.cfg.n_layers, 1
    unpruned = _clean_runs(model, arch, [tokens])
    with model.hooks(fwd_hooks=[(arch.neuron_site(model, layer), zero_neurons(torch.arange(0, 40)))]):
        pruned = _clean_runs(model, arch, [tokens])
        step = arch.ig_stepper(model, [tokens], pruned)
        with torch.no_grad():
            x = step.enter(layer, _per_prompt(unpruned, arch.neuron_site(model, layer), 2, lambda a: a[0, -1:]))
            for l in range(layer + 1, n):
                x = step.step(l, x)
    want = _per_prompt(pruned, f"blocks.{n - 1}.hook_resid_post", 2)
    assert torch.allclose(x, want, atol=1e-5)
    assert not torch.allclose(x, _per_prompt(unpruned, f"blocks.{n - 1}.hook_resid_post", 2), atol=1e-3)


def test_weight_edit_equals_the_pruning_hook(case):
    import copy

    model, arch, tokens = case
    idx = torch.tensor([0, 5, 9])
    layer = 1
    hooked = model.run_with_hooks(tokens, fwd_hooks=[(arch.neuron_site(model, layer), zero_neurons(idx))])
    edited = copy.deepcopy(model)
    before = model_fingerprint(edited)["weight_hash"]
    arch.prune_weights(edited, layer, idx)
    with torch.no_grad():
        assert torch.allclose(edited(tokens), hooked, atol=1e-5)
        assert not torch.allclose(model(tokens), hooked, atol=1e-5)
    # the cached fingerprint notices the edit, and a set found on the original is refused on the copy
    after = model_fingerprint(edited)["weight_hash"]
    assert after != before
    with pytest.raises(ValueError, match=f"weight_hash: file has '{before}', model has '{after}'"):
        NeuronSet(((layer, 0),), model_fingerprint(model)).check(edited)


def test_neuron_direction_is_what_the_neuron_writes(case):
    """Zeroing one neuron changes its block's output, at every position, by exactly activation x direction."""
    model, arch, tokens = case
    layer, idx = 1, 7
    site, post = arch.neuron_site(model, layer), f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=lambda n: n in (site, post))
        store = {}
        model.run_with_hooks(tokens, fwd_hooks=[(site, zero_neurons([idx])),
                                                (post, lambda a, hook: store.setdefault("post", a.clone()))])
    direction = arch.neuron_direction(model, layer, idx)
    assert direction.shape == (model.cfg.d_model,)
    change = clean[post] - store["post"]
    expect = clean[site][..., idx, None] * direction
    assert torch.allclose(change, expect, atol=1e-5), (change - expect).abs().max()
    for bad in ((layer, arch.neurons_per_layer(model)), (layer, -1), (model.cfg.n_layers, 0)):
        with pytest.raises(IndexError):
            arch.neuron_direction(model, *bad)


def test_no_type_test_of_a_model_outside_arch():
    """`arch_of` is the only place that asks which class a model is."""
    root = Path(__file__).resolve().parent.parent / "mechcopy"
    banned = re.compile(r"isinstance\([^)]*Hooked(Transformer|Mamba)|\bis_mamba\b|_is_transformer|"
                        r"type\(model\)|__name__ == ['\"]Hooked|cfg\.architecture ==")
    offenders = [f"{p.relative_to(root)}:{i}: {line.strip()}"
                 for p in root.rglob("*.py") if "arch" not in p.relative_to(root).parts[:1]
                 for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not offenders, "type tests of a model outside mechcopy/arch/:\n" + "\n".join(offenders)
