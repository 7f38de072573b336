"""HookedMamba: equal to HF MambaForCausalLM, loads every way, hooks fire, pruning and gradients are exact."""

import json

import pytest
import torch

from mechcopy import hooks
from mechcopy.models.mamba import HookedMamba, MambaConfig, MambaState, Norm, tiny_mamba
from mechcopy.arch import MAMBA, arch_of
from mechcopy.neurons import model_fingerprint
from mechcopy.sites import neuron_site, neurons_per_layer

pytestmark = pytest.mark.usefixtures("one_thread")

MIXER_HOOKS = {  # name -> shape as a function of (batch, pos, cfg)
    "hook_x": lambda b, p, c: (b, p, c.d_inner),
    "hook_z": lambda b, p, c: (b, p, c.d_inner),
    "hook_conv": lambda b, p, c: (b, p, c.d_inner),
    "hook_delta": lambda b, p, c: (b, p, c.d_inner),
    "hook_B": lambda b, p, c: (b, p, c.d_state),
    "hook_C": lambda b, p, c: (b, p, c.d_state),
    "hook_ssm_state": lambda b, p, c: (b, p, c.d_inner, c.d_state),
    "hook_ssm_out": lambda b, p, c: (b, p, c.d_inner),
    "hook_gated": lambda b, p, c: (b, p, c.d_inner),
    "hook_out": lambda b, p, c: (b, p, c.d_model),
}

# Several configurations: sizes, dt_rank, biases, vocab, tied or not, epsilon.
HF_CONFIGS = [
    dict(vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2),
    dict(vocab_size=77, hidden_size=24, state_size=16, num_hidden_layers=3, conv_kernel=2, expand=3,
         time_step_rank=5, use_bias=True, use_conv_bias=False, tie_word_embeddings=False),
    dict(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1, conv_kernel=3, expand=1,
         time_step_rank=1, layer_norm_epsilon=1e-6, use_bias=True),
    dict(vocab_size=130, hidden_size=48, state_size=16, num_hidden_layers=2, conv_kernel=4, expand=2,
         tie_word_embeddings=False),
]


def _random_hf(seed=0, **kw):
    """A random HF Mamba whose every weight (norms, D, biases too) is perturbed away from its init."""
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    torch.manual_seed(seed)
    hf = MambaForCausalLM(HFConfig(**kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hf


@pytest.fixture(scope="module")
def hf_small():
    return _random_hf(0, **HF_CONFIGS[0])


@pytest.fixture(scope="module")
def tm():
    return tiny_mamba(n_layers=2, d_model=32, d_state=8, seed=0)


@pytest.mark.parametrize("i", range(len(HF_CONFIGS)))
def test_logits_equal_hf(i):
    kw = HF_CONFIGS[i]
    hf = _random_hf(i, **kw)
    ours = HookedMamba.from_hf(hf)
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, kw["vocab_size"], (3, 17 + 7 * i), generator=g)
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == ref.shape
    assert ref.std() > 0.3  # not a flat model
    assert (got - ref).abs().max().item() < 1e-4


def test_loaded_from_folder_equals_hf(tmp_path, hf_small):
    from mechcopy import load_model
    from mechcopy.models.tiny import char_tokenizer

    tok = char_tokenizer()
    assert len(tok) <= HF_CONFIGS[0]["vocab_size"]
    hf_small.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert type(model).__name__ == "HookedMamba" and arch_of(model) is MAMBA
    tokens = model.to_tokens(["ab -> c\nxy ->", "hello world!!"])
    with torch.no_grad():
        assert (model(tokens) - hf_small(tokens).logits).abs().max().item() < 1e-4
        assert torch.allclose(model("ab -> c"), model(model.to_tokens("ab -> c")))
    fp = model_fingerprint(model)
    assert fp["architecture"] == "mamba" and fp["neurons_per_layer"] == model.cfg.d_inner


def test_pytorch_bin_folder(tmp_path, hf_small):
    torch.save(hf_small.state_dict(), tmp_path / "pytorch_model.bin")
    hf_small.config.to_json_file(tmp_path / "config.json")
    model = HookedMamba.from_pretrained(tmp_path, device="cpu")
    assert model.tokenizer is None
    tokens = torch.randint(0, 104, (2, 9))
    with torch.no_grad():
        assert (model(tokens) - hf_small(tokens).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="no tokenizer"):
        model("text")


def _to_mamba_ssm(hf):
    """An HF Mamba's weights and config as mamba-ssm MambaLMHeadModel would store them."""
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    c = hf.config
    conf = {"d_model": c.hidden_size, "n_layer": c.num_hidden_layers, "vocab_size": c.vocab_size - 3,
            "ssm_cfg": {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand},
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
            "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    return sd, conf


def test_mamba_ssm_state_dict_round_trip(tmp_path, hf_small):
    sd, conf = _to_mamba_ssm(hf_small)  # vocab 101 padded to a multiple of 8 is 104
    model = HookedMamba.from_mamba_ssm_state_dict(sd, conf)
    tokens = torch.randint(0, 104, (2, 15))
    with torch.no_grad():
        ref = hf_small(tokens).logits
        assert (model(tokens) - ref).abs().max().item() < 1e-4
        # without lm_head.weight (tied), and back out through our own export
        sd_tied = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        assert (HookedMamba.from_mamba_ssm_state_dict(sd_tied, conf)(tokens) - ref).abs().max().item() < 1e-4
        again = HookedMamba.from_mamba_ssm_state_dict(model.to_mamba_ssm_state_dict(), model.mamba_ssm_config())
        assert torch.equal(again(tokens), model(tokens))
    # a mamba-ssm folder (config.json with n_layer + pytorch_model.bin) loads too
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with torch.no_grad():
        assert (HookedMamba.from_pretrained(tmp_path, device="cpu")(tokens) - ref).abs().max().item() < 1e-4


def test_bad_state_dict_names_the_keys(hf_small):
    sd, conf = _to_mamba_ssm(hf_small)
    bad = dict(sd)
    del bad["backbone.layers.1.mixer.A_log"]
    bad["backbone.layers.0.mixer.extra.weight"] = torch.zeros(3)
    bad["backbone.layers.0.mixer.x_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError) as err:
        HookedMamba.from_mamba_ssm_state_dict(bad, conf)
    msg = str(err.value)
    for key in ("backbone.layers.1.mixer.A_log", "backbone.layers.0.mixer.extra.weight",
                "backbone.layers.0.mixer.x_proj.weight"):
        assert key in msg
    wrong_size = dict(conf, d_model=40)
    with pytest.raises(ValueError, match="backbone.embedding.weight"):
        HookedMamba.from_mamba_ssm_state_dict(sd, wrong_size)
    with pytest.raises(ValueError, match="Mamba-1 only"):
        HookedMamba.from_mamba_ssm_state_dict(sd, dict(conf, ssm_cfg={"layer": "Mamba2"}))


def test_cache_has_every_hook_with_shapes(tm):
    tokens = tm.to_tokens(["cat -> 1\ndog ->", "sun -> 1\nsky ->"])
    b, p = tokens.shape
    _, cache = tm.run_with_cache(tokens)
    c = tm.cfg
    assert cache["hook_embed"].shape == (b, p, c.d_model)
    for l in range(c.n_layers):
        assert cache[f"blocks.{l}.hook_resid_pre"].shape == (b, p, c.d_model)
        assert cache[f"blocks.{l}.hook_resid_post"].shape == (b, p, c.d_model)
        for name, shape in MIXER_HOOKS.items():
            assert cache[f"blocks.{l}.mixer.{name}"].shape == shape(b, p, c), name
        # the pieces fit together: gated = ssm_out * silu(z), out = out_proj(gated), post = pre + out
        mix = f"blocks.{l}.mixer."
        gated = cache[mix + "hook_ssm_out"] * torch.nn.functional.silu(cache[mix + "hook_z"])
        assert torch.allclose(cache[mix + "hook_gated"], gated, atol=1e-6)
        assert torch.allclose(cache[mix + "hook_out"], tm.blocks[l].mixer.out_proj(gated), atol=1e-5)
        assert torch.allclose(cache[f"blocks.{l}.hook_resid_post"],
                              cache[f"blocks.{l}.hook_resid_pre"] + cache[mix + "hook_out"], atol=1e-5)
        # the cached states reproduce y: y_t = C_t . h_t + D * u_t
        y = (cache[mix + "hook_ssm_state"] @ cache[mix + "hook_C"][..., None])[..., 0]
        y = y + cache[mix + "hook_conv"] * tm.blocks[l].mixer.D
        assert torch.allclose(y, cache[mix + "hook_ssm_out"], atol=1e-5)
    assert neuron_site(tm, 1) == "blocks.1.mixer.hook_gated" and neurons_per_layer(tm) == c.d_inner


def test_hook_pruning_equals_weight_edit(tm):
    tokens = tm.to_tokens("lemon -> 2\nriver -> 2\nmountain ->")
    idx = torch.tensor([0, 5, 17, 40, 63])
    layer = 1
    site = neuron_site(tm, layer)
    with torch.no_grad():
        clean = tm(tokens)
        hooked = tm.run_with_hooks(tokens, fwd_hooks=[(site, hooks.zero_neurons(idx))])
        with tm.hooks(fwd_hooks=[(site, hooks.zero_neurons(idx))]):
            hooked_ctx = tm(tokens)
        edited = tiny_mamba(n_layers=2, d_model=32, d_state=8, seed=0)
        edited.blocks[layer].mixer.out_proj.weight[:, idx] = 0
        weight = edited(tokens)
    assert (hooked - clean).abs().max() > 1e-3  # the neurons mattered
    assert torch.allclose(hooked, weight, atol=1e-6)
    assert torch.equal(hooked, hooked_ctx)


def test_gradient_at_hook_gated_matches_finite_difference():
    model = tiny_mamba(n_layers=2, d_model=16, d_state=4, seed=3).to(torch.float64)
    assert model.cfg.dtype == torch.float64
    tokens = model.to_tokens("abc -> 3\nxyz ->")
    site = neuron_site(model, 0)
    _, cache = model.run_with_cache(tokens, names_filter=site)
    clean = cache[site].detach()

    def target(act):
        def replace(a, hook):
            return act
        logits = model.run_with_hooks(tokens, fwd_hooks=[(site, replace)])
        return logits[0, -1, 7] - logits[0, -1, 11]

    leaf = clean.clone().requires_grad_(True)
    target(leaf).backward()
    assert leaf.grad.abs().sum() > 0
    eps = 1e-6
    for pos, i in [(-1, 3), (-1, 20), (2, 9), (5, 31)]:
        plus, minus = clean.clone(), clean.clone()
        plus[0, pos, i] += eps
        minus[0, pos, i] -= eps
        with torch.no_grad():
            fd = (target(plus) - target(minus)) / (2 * eps)
        assert abs(fd.item() - leaf.grad[0, pos, i].item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_recurrent_state_matches_full_run(tm):
    tokens = tm.to_tokens(["hot -> cold\nbig ->", "one -> two\nsix ->"])
    site = neuron_site(tm, 1)
    idx = [1, 2, 3, 30]
    with torch.no_grad():
        full = tm(tokens)
        _, state = tm(tokens[:, :-1], return_state=True)
        step = tm(tokens[:, -1:], state=state)
        assert torch.allclose(step[:, 0], full[:, -1], atol=1e-5)
        # one-token pass from layer 1, fed the cached residual: what the fast IG path needs
        _, cache = tm.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
        resid = cache["blocks.1.hook_resid_pre"][:, -1:]
        part = tm(resid, start_at_layer=1, state=state)
        assert torch.allclose(part[:, 0], full[:, -1], atol=1e-5)
        # batching many variants of one prefix; hooks fire on the new position only
        rep = state.repeat_interleave(3)
        assert rep.ssm[0].shape[0] == 6 and isinstance(rep, MambaState)
        scaled = tm.run_with_hooks(tokens[:, -1:].repeat_interleave(3, 0), state=rep,
                                   fwd_hooks=[(site, hooks.zero_neurons(idx))])

        def zero_last(a, hook):
            a = a.clone()
            a[:, -1, idx] = 0
            return a
        ref = tm.run_with_hooks(tokens, fwd_hooks=[(site, zero_last)])
        assert torch.allclose(scaled[::3, 0], ref[:, -1], atol=1e-5)
        # block by block, the prefix state broadcast over rows (like a frozen key/value cache entry)
        x = cache["blocks.0.hook_resid_pre"][:1, -1:].repeat_interleave(2, 0)
        for l, block in enumerate(tm.blocks):
            n = x.shape[0]
            x = block(x, state.conv[l][:1].expand(n, -1, -1), state.ssm[l][:1].expand(n, -1, -1))
        assert torch.allclose(tm.unembed(tm.ln_final(x))[:, 0], full[:1, -1].expand(2, -1), atol=1e-5)
        # stop_at_layer returns the residual stream
        assert torch.allclose(tm(tokens, stop_at_layer=1), cache["blocks.1.hook_resid_pre"])


def test_generate_is_greedy_argmax(tm):
    tokens = tm.to_tokens("abc")
    out = tm.generate(tokens, max_new_tokens=5, stop_at_eos=False)
    seq = tokens
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, tm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert isinstance(tm.generate("abc", max_new_tokens=2, stop_at_eos=False), str)


def test_tokenizer_helpers(tm):
    assert tm.to_str_tokens("a b") == ["a", " ", "b"]
    assert tm.to_string(tm.to_tokens("x -> 3")[0]) == "x -> 3"
    assert tm.to_tokens("ab", prepend_bos=True)[0, 0].item() == tm.tokenizer.bos_token_id
    assert tm.to_tokens(["a", "abc"]).shape == (2, 3)
    assert tm.to_single_token("q") == tm.to_tokens("q")[0, 0].item()
    loss = tm(tm.to_tokens("hello there"), return_type="loss")
    assert loss.ndim == 0 and loss.item() > 0


def test_layernorm_variant_matches_torch():
    cfg = MambaConfig(n_layers=1, d_model=8, d_inner=16, d_state=2, d_conv=2, dt_rank=1, d_vocab=5,
                      normalization_type="LN")
    norm = Norm(cfg)
    with torch.no_grad():
        norm.w.normal_()
        norm.b.normal_()
    x = torch.randn(2, 3, 8)
    ref = torch.nn.functional.layer_norm(x, (8,), norm.w, norm.b, eps=cfg.eps)
    assert torch.allclose(norm(x), ref, atol=1e-6)


def test_tiny_mamba_is_deterministic_and_not_flat():
    a, b = tiny_mamba(seed=1), tiny_mamba(seed=1)
    tokens = a.to_tokens("hello")
    with torch.no_grad():
        la, lb = a(tokens), b(tokens)
    assert torch.equal(la, lb)
    assert la[0, -1].softmax(-1).max() < 0.9 and la.std() > 0.5
    assert not torch.equal(la, tiny_mamba(seed=2)(tokens))


def test_integrated_gradients_completeness_and_one_token_path(tm):
    """IG at hook_gated (last position, one layer scaled) sums to f(a) - f(0), both through full runs and
    through the batched one-token pass from the prefix state (the fast path's building block)."""
    tokens = tm.to_tokens("sun -> 3\nsky -> 3\ntree ->")
    layer, steps, (c, g) = 0, 32, (5, 9)
    site = neuron_site(tm, layer)
    _, cache = tm.run_with_cache(tokens, names_filter=[site, f"blocks.{layer}.hook_resid_pre"])
    act = cache[site][:, -1:].detach()                                     # [1, 1, d_inner]
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps    # midpoint rule

    def contrast(logits):
        return logits[:, -1, c] - logits[:, -1, g]

    def scaled_last(values):
        def hook(a, hook):
            return torch.cat([a[:, :-1], values.expand(a.shape[0], -1, -1)], dim=1)
        return hook

    # reference: one full-sequence run per alpha
    grads = []
    for alpha in alphas:
        leaf = (alpha * act).requires_grad_(True)
        contrast(tm.run_with_hooks(tokens, fwd_hooks=[(site, scaled_last(leaf))])).sum().backward()
        grads.append(leaf.grad[0, 0])
    ig_ref = act[0, 0] * torch.stack(grads).mean(0)
    with torch.no_grad():
        f1 = contrast(tm.run_with_hooks(tokens, fwd_hooks=[(site, scaled_last(act))]))
        f0 = contrast(tm.run_with_hooks(tokens, fwd_hooks=[(site, scaled_last(0 * act))]))
    assert abs(ig_ref.sum().item() - (f1 - f0).item()) < 2e-3 * max(1.0, abs((f1 - f0).item()))

    # fast: all alphas in one batch, one token from the prefix state, starting at `layer`
    with torch.no_grad():
        _, state = tm(tokens[:, :-1], return_state=True)
    rows = state.repeat_interleave(steps)
    leaf = (alphas[:, None, None] * act).requires_grad_(True)             # [steps, 1, d_inner]
    resid = cache[f"blocks.{layer}.hook_resid_pre"][:, -1:].expand(steps, -1, -1)

    def set_rows(a, hook):
        return leaf

    out = tm.run_with_hooks(resid, start_at_layer=layer, state=rows, fwd_hooks=[(site, set_rows)])
    contrast(out).sum().backward()
    ig_fast = act[0, 0] * leaf.grad[:, 0].mean(0)
    assert torch.allclose(ig_fast, ig_ref, atol=1e-5)


def _fake_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's selective_scan_fn semantics (u, delta: b d l; B, C: b n l), in plain torch."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = torch.exp(delta[:, :, i, None] * A) * x + (delta[:, :, i] * u[:, :, i])[..., None] * B[:, None, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    out = torch.stack(ys, dim=2) + u * D[:, None]
    return out * torch.nn.functional.silu(z) if z is not None else out


def _fake_mamba_inner(xz, conv_w, conv_b, x_proj_w, dt_w, out_w, out_b, A, B, C, D, delta_bias, delta_softplus):
    """mamba-ssm's mamba_inner_fn semantics (xz: b 2d l; returns b l d_model), in plain torch."""
    x, z = xz.chunk(2, dim=1)
    L, R, N = x.shape[-1], dt_w.shape[1], A.shape[1]
    x = torch.nn.functional.silu(torch.nn.functional.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1,
                                                            groups=x.shape[1])[..., :L])
    x_dbl = torch.einsum("bdl,ed->ble", x, x_proj_w)
    delta = torch.einsum("dr,blr->bdl", dt_w, x_dbl[..., :R])
    Bv, Cv = x_dbl[..., R:R + N].transpose(1, 2), x_dbl[..., R + N:].transpose(1, 2)
    y = _fake_selective_scan(x, delta, A, Bv, Cv, D, z, delta_bias, delta_softplus)
    return torch.nn.functional.linear(y.transpose(1, 2), out_w, out_b)


def test_kernel_dispatch_with_reference_kernels(monkeypatch):
    """On CPU, stand-in kernels with mamba-ssm's argument layout check which path runs and that hooks fire."""
    import mechcopy.models.mamba as mm

    calls = {"scan": 0, "inner": 0}

    def scan(*a, **k):
        calls["scan"] += 1
        return _fake_selective_scan(*a, **k)

    def inner(*a, **k):
        calls["inner"] += 1
        return _fake_mamba_inner(*a, **k)

    model = tiny_mamba(n_layers=2, d_model=16, d_state=4, seed=5)
    tokens = model.to_tokens("abc -> 1\nde ->")
    with torch.no_grad():
        model.set_use_kernels(False)
        plain, plain_cache = model.run_with_cache(tokens)
        model.set_use_kernels(True)
        monkeypatch.setattr(mm, "_KERNEL_CACHE", {"selective_scan_fn": scan, "mamba_inner_fn": inner})
        monkeypatch.setattr(mm, "_kernel_device_ok", lambda h: True)
        fused = model(tokens)
        assert calls == {"scan": 0, "inner": 2}
        seen = {}
        scanned = model.run_with_hooks(tokens, fwd_hooks=[(neuron_site(model, 0), hooks.capture(seen))])
        assert calls == {"scan": 1, "inner": 3}  # layer 0 hooked: scan kernel only; layer 1: fused
        assert torch.allclose(seen["blocks.0.mixer.hook_gated"], plain_cache["blocks.0.mixer.hook_gated"], atol=1e-5)
        model.run_with_cache(tokens)  # hook_ssm_state asked for: plain scan everywhere
        _, state = model(tokens, return_state=True)  # recurrent use: plain
        assert calls == {"scan": 1, "inner": 3}
    assert torch.allclose(fused, plain, atol=1e-5) and torch.allclose(scanned, plain, atol=1e-5)
