"""The hand-written blocks of the fast IG path against TransformerLens' own blocks.

Tiny random models carry the configuration features of the zoo models (SmolLM2: Llama, grouped-query
attention; Gemma 3: norms after attention and MLP, per-head q/k norms, local and global rotary bases,
sliding windows, gelu-tanh gated MLP, query scaling, soft caps), of GPT-2 (LayerNorm, learned
positions, plain MLP, biases), and partial adjacent-pair rotary with YaRN tables. Every weight that
random initialisation leaves at one or zero (norm weights, biases) is jittered so that a block which
skipped it would fail.
"""

import pytest
import torch

from mechcopy.arch import TRANSFORMER
from mechcopy.arch.transformer import OneTokenBlocks, TLBlocks, one_token_block_unsupported, run_blocks
from mechcopy.attribution import integrated_gradients
from mechcopy.hooks import zero_neurons
from mechcopy.models.tiny import tiny_transformer
from mechcopy.tasks.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "llama-gqa": dict(n_heads=4, n_key_value_heads=2),
    "gemma3": dict(n_heads=4, n_key_value_heads=1, d_head=16, rotary_dim=16, use_normalization_before_and_after=True,
                   use_qk_norm=True, use_local_attn=True, attn_types=["local", "global", "local"], window_size=6,
                   rotary_base=10000, rotary_base_local=100, act_fn="gelu_pytorch_tanh", attn_scale=3.0,
                   attn_scores_soft_cap=5.0, output_logits_soft_cap=8.0),
    "gpt2": dict(gated=False, normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new"),
    "partial-rotary-yarn": dict(n_heads=4, rotary_dim=4, rotary_adjacent_pairs=True, use_yarn_rope=True, yarn_factor=2.0,
                               yarn_original_max_position_embeddings=16),
}


def _jittered(**config):
    model = tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=5, **config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith(("b", "w")):              # biases and norm weights
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _prompts(tok):
    return [make_prompt([("cat", "1"), ("dog", "2"), ("sun", "1"), ("plum", "2")], ("tree", "3"), tok, task="t"),
            make_prompt([("a", "7"), ("bb", "5")], ("ccc", "4"), tok, task="t")]


def _caches(model, tokens):
    names = set(TRANSFORMER.ig_cache_names(model))
    with torch.no_grad():
        return [model.run_with_cache(t, names_filter=lambda n: n in names)[1] for t in tokens]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _jittered(**CONFIGS[request.param])


def test_the_one_token_blocks_are_chosen(model):
    tokens = [model.to_tokens(p.text) for p in _prompts(model.tokenizer)]
    assert one_token_block_unsupported(model) is None
    assert isinstance(TRANSFORMER.ig_stepper(model, tokens, _caches(model, tokens)), OneTokenBlocks)


def test_one_token_blocks_equal_transformerlens_blocks(model):
    """Perturbed rows of two prompts of different lengths (windows bite on the longer one): every block,
    whole and from its neuron site, equals TransformerLens' block on a key/value cache."""
    tokens = [model.to_tokens(p.text) for p in _prompts(model.tokenizer)]
    assert tokens[0].shape[1] > 2 * model.cfg.window_size if model.cfg.use_local_attn else True
    caches = _caches(model, tokens)
    fast, tl = OneTokenBlocks(model, caches), TLBlocks(model, tokens, caches)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            clean = torch.cat([c[f"blocks.{layer}.hook_resid_pre"][:, -1:].expand(3, 1, -1) for c in caches])
            x = clean + torch.randn(clean.shape, generator=g)
            want = tl.step(layer, x)
            assert (fast.step(layer, x) - want).abs().max() <= 1e-5 * want.abs().max(), layer
            neurons = torch.randn(6, model.cfg.d_mlp, generator=g)
            want = tl.enter(layer, neurons)
            assert (fast.enter(layer, neurons) - want).abs().max() <= 1e-5 * want.abs().max(), layer


def test_the_clean_run_equals_transformerlens(model):
    """The hand-written blocks over a whole prompt (the clean run) give TransformerLens' activations at
    every position and layer, also under a pruning hook."""
    tokens = model.to_tokens(_prompts(model.tokenizer)[0].text)
    names = {f"blocks.{l}.{h}" for l in range(model.cfg.n_layers)
             for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_resid_post")}
    with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", zero_neurons([0, 3, 5]))]):
        out, ours = run_blocks(model, tokens, names)
        with torch.no_grad():
            want, theirs = model.run_with_cache(tokens, stop_at_layer=model.cfg.n_layers,
                                               names_filter=lambda n: n in names)
    assert set(ours) == names
    for name in names:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-5 * theirs[name].abs().max(), name
    assert torch.allclose(out, want, atol=1e-5) and not ours["blocks.1.mlp.hook_post"][..., 3].any()


def test_fast_ig_equals_reference(model):
    ps = _prompts(model.tokenizer)
    ref = integrated_gradients(model, ps, steps=6, method="reference")
    fast = integrated_gradients(model, ps, steps=6, method="fast", batch_size=2)
    assert (fast.values - ref.values).abs().max() <= 1e-4 * ref.values.abs().max()
    assert torch.allclose(fast.target_zero, ref.target_zero, atol=1e-5)


@pytest.mark.parametrize("why, config, hooks", [
    ("parallel attention and MLP", dict(parallel_attn_mlp=True), []),
    ("a hook on blocks.1.attn.hook_pattern", {}, [("blocks.1.attn.hook_pattern", lambda a, hook: a * 0.8)]),
    ("YaRN attention scaling", dict(use_yarn_rope=True, yarn_factor=2.0, yarn_attention_factor=1.3,
                                    yarn_original_max_position_embeddings=16), []),
])
def test_what_the_one_token_blocks_lack_falls_back_to_transformerlens(why, config, hooks):
    """Said why, TransformerLens' blocks run instead, and the fast path still equals the reference."""
    model = _jittered(**config)
    ps = _prompts(model.tokenizer)
    tokens = [model.to_tokens(p.text) for p in ps]
    with model.hooks(fwd_hooks=hooks):
        assert one_token_block_unsupported(model) == why
        assert isinstance(TRANSFORMER.ig_stepper(model, tokens, _caches(model, tokens)), TLBlocks)
        ref = integrated_gradients(model, ps, steps=4, method="reference")
        fast = integrated_gradients(model, ps, steps=4, method="fast", batch_size=2)
    assert (fast.values - ref.values).abs().max() <= 1e-4 * ref.values.abs().max()
    assert one_token_block_unsupported(_jittered()) is None


def test_non_causal_attention_has_no_fast_path():
    model = _jittered(attention_dir="bidirectional")
    with pytest.raises(ValueError, match="method='reference'"):
        integrated_gradients(model, _prompts(model.tokenizer)[:1], steps=2)


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_bfloat16_ig_is_float32_and_complete(arch):
    """On a bfloat16 model the attributions are float32, the fast path tracks the reference and
    completeness holds to bfloat16's precision (targets and sums are computed in float32)."""
    from mechcopy.models.mamba import tiny_mamba

    make = (lambda **k: tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=1, **k)) if arch == "transformer" \
        else (lambda **k: tiny_mamba(n_layers=2, d_model=32, seed=0, **k))
    model = make(dtype=torch.bfloat16)
    ps = _prompts(model.tokenizer)
    fast = integrated_gradients(model, ps, steps=32)
    ref = integrated_gradients(model, ps, steps=32, method="reference")
    for att in (fast, ref):
        assert att.values.dtype == att.target_zero.dtype == att.target_clean.dtype == torch.float32
        assert torch.isfinite(att.values).all()
    assert (fast.values - ref.values).abs().max() <= 0.05 * ref.values.abs().max()
    # measured: |sum IG - delta| <= 1.7% of the largest delta (float32: 1e-6); the old bfloat16 targets
    # were rounded to bfloat16's 8 bits, about the size of the smaller deltas here
    assert (fast.sums - fast.deltas).abs().max() <= 0.05 * fast.deltas.abs().max()
