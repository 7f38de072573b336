"""HookedMamba: Mamba-1 in plain PyTorch with TransformerLens hook points.

The model is numerically the Hugging Face `MambaForCausalLM` (its CPU path is the reference), laid out
so that the project's hook language works unchanged:

    hook_embed
    blocks.{l}.hook_resid_pre                      [batch, pos, d_model]
    blocks.{l}.norm.hook_scale / hook_normalized   RMSNorm internals (as TransformerLens names them)
    blocks.{l}.mixer.hook_x, hook_z                the two in-projection halves [batch, pos, d_inner]
    blocks.{l}.mixer.hook_conv                     causal conv output after SiLU [batch, pos, d_inner]
    blocks.{l}.mixer.hook_delta                    softplus(dt_proj(.)) [batch, pos, d_inner]
    blocks.{l}.mixer.hook_B, hook_C                [batch, pos, d_state]
    blocks.{l}.mixer.hook_ssm_state                state after each position [batch, pos, d_inner, d_state]
                                                   (only computed when a hook or the cache asks for it)
    blocks.{l}.mixer.hook_ssm_out                  y = C·h + D·u (before gating) [batch, pos, d_inner]
    blocks.{l}.mixer.hook_gated                    y·SiLU(z), the NEURON SITE, input to out_proj
    blocks.{l}.mixer.hook_out                      mixer output [batch, pos, d_model]
    blocks.{l}.hook_resid_post
    ln_final.hook_scale / hook_normalized

`blocks.{l}.mixer.out_proj` is an `nn.Linear(d_inner, d_model)`, so pruning by weight edit is zeroing its
input columns. Recurrent use: `forward(..., return_state=True)` also returns a `MambaState` (conv window
and SSM state of every layer), and `forward(new_tokens, state=...)` continues from it; with
`start_at_layer` the input is the residual stream. Together they give the one-token pass of the fast
attribution path (see docs/mamba.md).

CUDA fast path: when the model is on CUDA, `mamba_ssm` imports and `use_kernels` is true, a mixer with
no active hook on any mixer-internal hook point runs mamba-ssm's fused `mamba_inner_fn`; a mixer whose
internal hooks do not include `hook_ssm_state` runs its `selective_scan_fn` for the scan only (so every
hook still fires); `hook_ssm_state`, `state=` and `return_state=True` always take the plain path.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

MIXER_INTERNAL_HOOKS = ("hook_x", "hook_z", "hook_conv", "hook_delta", "hook_B", "hook_C",
                        "hook_ssm_state", "hook_ssm_out", "hook_gated")


@dataclass(frozen=True)
class MambaConfig:
    """Sizes and options of a Mamba-1 language model (names follow TransformerLens where they exist)."""

    n_layers: int
    d_model: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    d_vocab: int
    model_name: str = "mamba"
    architecture: str = "mamba"
    original_architecture: str = "MambaForCausalLM"
    eps: float = 1e-5
    use_bias: bool = False          # in_proj / out_proj bias
    conv_bias: bool = True
    normalization_type: str = "RMS"  # "RMS" (HF, mamba-ssm rms_norm=True) or "LN" (mamba-ssm rms_norm=False)
    tie_embeddings: bool = False     # informational: weights are stored untied
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    default_prepend_bos: bool = False
    n_ctx: int = 2048                # nominal: Mamba has no context limit; for code that asks
    output_logits_soft_cap: float = -1.0  # off (as in TransformerLens), for code shared with transformers
    tokenizer_name: str | None = None
    seed: int | None = None

    def __post_init__(self):
        for key in ("n_layers", "d_model", "d_inner", "d_state", "d_conv", "dt_rank", "d_vocab"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"MambaConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.normalization_type not in ("RMS", "LN"):
            raise ValueError(f"normalization_type must be 'RMS' or 'LN', got {self.normalization_type!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["dtype"] = str(self.dtype).replace("torch.", "")
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "MambaConfig":
        """The config `to_json` wrote (dtype by name, float32 where absent)."""
        return cls(**{**obj, "dtype": getattr(torch, str(obj.get("dtype", "float32")))})


@dataclass
class MambaState:
    """Per-layer recurrent state after a prefix: the last d_conv-1 conv inputs and the SSM state (None for a
    layer not run yet)."""

    conv: list[Float[Tensor, "batch d_inner d_conv_minus_1"] | None]
    ssm: list[Float[Tensor, "batch d_inner d_state"] | None]

    def repeat_interleave(self, n: int) -> "MambaState":
        """Each batch row repeated n times (to run many variants of one prefix in one batch)."""
        return MambaState([None if c is None else c.repeat_interleave(n, 0) for c in self.conv],
                          [None if s is None else s.repeat_interleave(n, 0) for s in self.ssm])

    def index(self, rows) -> "MambaState":
        """The state of batch rows `rows` (layers not run yet stay None)."""
        return MambaState([None if c is None else c[rows] for c in self.conv],
                          [None if s is None else s[rows] for s in self.ssm])

    def detach(self) -> "MambaState":
        return MambaState([None if c is None else c.detach() for c in self.conv],
                          [None if s is None else s.detach() for s in self.ssm])


# ---------------------------------------------------------------------------------------------------
# optional CUDA kernels


def _kernels() -> dict[str, Any]:
    """mamba-ssm kernels if importable (never required); cached after the first call."""
    global _KERNEL_CACHE
    if _KERNEL_CACHE is None:
        found: dict[str, Any] = {}
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            found["selective_scan_fn"] = selective_scan_fn
            try:
                import causal_conv1d  # noqa: F401  (mamba_inner_fn needs its CUDA conv)
                from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

                found["mamba_inner_fn"] = mamba_inner_fn
            except Exception:
                pass
        except Exception:
            pass
        _KERNEL_CACHE = found
    return _KERNEL_CACHE


_KERNEL_CACHE: dict[str, Any] | None = None


def _kernel_device_ok(h: Tensor) -> bool:
    """The mamba-ssm kernels run on CUDA tensors in float32 / float16 / bfloat16."""
    return h.is_cuda and h.dtype in (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# modules


class Embed(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class Unembed(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype))

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        return x @ self.W_U + self.b_U


class Norm(nn.Module):
    """RMSNorm (as HF Mamba computes it, in float32) or LayerNorm, with TransformerLens hook names."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.eps = cfg.eps
        self.is_ln = cfg.normalization_type == "LN"
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        if self.is_ln:
            self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_scale = HookPoint()       # [batch, pos, 1]: the divisor sqrt(mean(x²) + eps)
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before the weight

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        if self.is_ln:
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        out = self.w * x.to(dtype)
        return out + self.b if self.is_ln else out


class MambaMixer(nn.Module):
    """The selective-SSM mixer of one Mamba-1 block, with a hook point at every intermediate."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        I, N, R, dtype = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.dtype
        self.in_proj = nn.Linear(cfg.d_model, 2 * I, bias=cfg.use_bias, dtype=dtype)
        self.conv1d = nn.Conv1d(I, I, kernel_size=cfg.d_conv, groups=I, padding=cfg.d_conv - 1,
                                bias=cfg.conv_bias, dtype=dtype)
        self.x_proj = nn.Linear(I, R + 2 * N, bias=False, dtype=dtype)
        self.dt_proj = nn.Linear(R, I, bias=True, dtype=dtype)
        self.A_log = nn.Parameter(torch.empty(I, N, dtype=dtype))
        self.D = nn.Parameter(torch.empty(I, dtype=dtype))
        self.out_proj = nn.Linear(I, cfg.d_model, bias=cfg.use_bias, dtype=dtype)
        self.use_kernels = True
        self.hook_x, self.hook_z, self.hook_conv = HookPoint(), HookPoint(), HookPoint()
        self.hook_delta, self.hook_B, self.hook_C = HookPoint(), HookPoint(), HookPoint()
        self.hook_ssm_state, self.hook_ssm_out = HookPoint(), HookPoint()
        self.hook_gated, self.hook_out = HookPoint(), HookPoint()

    def _hooked(self, names: Iterable[str]) -> bool:
        return any(getattr(self, n).has_hooks() for n in names)

    def forward(
        self,
        h: Float[Tensor, "batch pos d_model"],
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        return_state: bool = False,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ):
        """Mixer output; with `return_state`, also (new conv window, new SSM state).

        `attention_mask` (0 = left padding) makes left padding of an empty state exact: a pad position
        writes zeros into the conv window (what the empty window holds) and has step Δ = 0, so the SSM
        state stays zero.
        """
        cfg = self.cfg
        batch, pos, _ = h.shape
        stateful = conv_state is not None or ssm_state is not None or return_state
        kernels = _kernels() if (self.use_kernels and _kernel_device_ok(h) and not stateful) else {}
        keep = None if attention_mask is None else attention_mask[..., None].to(h.device, h.dtype)
        if "mamba_inner_fn" in kernels and keep is None and not self._hooked(MIXER_INTERNAL_HOOKS):
            return self.hook_out(self._fused(h, kernels["mamba_inner_fn"]))

        x, z = self.in_proj(h).chunk(2, dim=-1)
        x, z = self.hook_x(x), self.hook_z(z)
        if keep is not None:
            x = x * keep
        xt = x.transpose(1, 2)  # [batch, d_inner, pos]
        K = cfg.d_conv
        if conv_state is None:
            conv_state = xt.new_zeros(batch, cfg.d_inner, K - 1)
        window = torch.cat([conv_state.to(xt.dtype), xt], dim=-1)
        conv = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=cfg.d_inner)
        u = self.hook_conv(F.silu(conv).transpose(1, 2))  # [batch, pos, d_inner]

        dt, B, C = torch.split(self.x_proj(u), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        delta = self.hook_delta(F.softplus(self.dt_proj(dt)))
        if keep is not None:
            delta = delta * keep
        B, C = self.hook_B(B), self.hook_C(C)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

        if "selective_scan_fn" in kernels and not self.hook_ssm_state.has_hooks():
            y = kernels["selective_scan_fn"](
                u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.float(),
                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(),
                z=None, delta_bias=None, delta_softplus=False,
            ).transpose(1, 2).to(u.dtype)
            last = None
        else:
            y, last = self._scan(u, delta, A, B, C, ssm_state)
        y = self.hook_ssm_out(y)
        gated = self.hook_gated(y * F.silu(z))
        out = self.hook_out(self.out_proj(gated))
        if not return_state:
            return out
        return out, (window[..., window.shape[-1] - (K - 1):] if K > 1 else window[..., :0]), last

    def _scan(self, u, delta, A, B, C, h0):
        """The selective scan, sequential over positions like HF's CPU path; float32 inside."""
        dtype = u.dtype
        ct = torch.promote_types(dtype, torch.float32)
        u, delta, A, B, C = u.to(ct), delta.to(ct), A.to(ct), B.to(ct), C.to(ct)
        h = h0.to(ct) if h0 is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
        want_states = self.hook_ssm_state.has_hooks()
        ys, states = [], []
        # Per-position pieces are made inside the loop (cache-sized tensors; ~2x faster forward and
        # backward than materialising [batch, pos, d_inner, d_state] decays), and the inputs are
        # unbound once: indexing [:, t] in the loop makes backward zero-fill a full-size gradient
        # per position (quadratic in the length).
        for d_t, du_t, B_t, C_t in zip(delta.unbind(1), (delta * u).unbind(1), B.unbind(1), C[..., None].unbind(1)):
            h = torch.exp(d_t[..., None] * A) * h + du_t[..., None] * B_t[:, None, :]
            if want_states:
                states.append(h)
            else:
                ys.append(torch.matmul(h, C_t)[..., 0])
        if want_states:
            # Edits made by a hook here change y at that position only; later states are not recomputed.
            H = self.hook_ssm_state(torch.stack(states, dim=1))
            y = torch.matmul(H, C[:, :, :, None])[..., 0]
        else:
            y = torch.stack(ys, dim=1)
        y = y + u * self.D.to(ct)
        return y.to(dtype), h

    def _fused(self, h, mamba_inner_fn):
        """mamba-ssm's fused kernel (conv, scan, gating and out_proj in one), CUDA only."""
        xz = self.in_proj(h).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        return mamba_inner_fn(
            xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
            self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = Norm(cfg)
        self.mixer = MambaMixer(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid, conv_state=None, ssm_state=None, return_state=False, attention_mask=None):
        resid = self.hook_resid_pre(resid)
        out = self.mixer(self.norm(resid), conv_state, ssm_state, return_state, attention_mask)
        if return_state:
            out, conv, ssm = out
            return self.hook_resid_post(resid + out), conv, ssm
        return self.hook_resid_post(resid + out)


# ---------------------------------------------------------------------------------------------------
# state-dict conversion (HF MambaForCausalLM and mamba-ssm MambaLMHeadModel share the layer names)

_MIXER_KEYS = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight",
               "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias")


def _source_name(ours: str, embed_key: str) -> str | None:
    """Our parameter name -> the name in an HF / mamba-ssm state dict (None: not stored there)."""
    if ours == "embed.W_E":
        return embed_key
    if ours == "unembed.W_U":
        return "lm_head.weight"
    if ours == "unembed.b_U":
        return None
    if ours.startswith("ln_final."):
        return "backbone.norm_f." + ("weight" if ours.endswith(".w") else "bias")
    parts = ours.split(".")  # blocks.{l}.norm.w | blocks.{l}.mixer.<key>
    layer = parts[1]
    if parts[2] == "norm":
        return f"backbone.layers.{layer}.norm." + ("weight" if parts[3] == "w" else "bias")
    return f"backbone.layers.{layer}.mixer." + ".".join(parts[3:])


def _convert_state_dict(model: "HookedMamba", sd: dict[str, Tensor], embed_key: str,
                        tie: bool) -> dict[str, Tensor]:
    """Check `sd` against the model's expected keys and shapes and rename it; ValueError names bad keys."""
    sd = dict(sd)
    if tie and "lm_head.weight" not in sd and embed_key in sd:
        sd["lm_head.weight"] = sd[embed_key]
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for ours, p in model.state_dict().items():
        src = _source_name(ours, embed_key)
        if src is not None:
            shape = tuple(p.shape[::-1]) if ours == "unembed.W_U" else tuple(p.shape)
            expected[src] = (ours, shape)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: got {tuple(sd[k].shape)}, expected {expected[k][1]}"
                  for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k][1]]
    if missing or unexpected or mismatched:
        bits = []
        if missing:
            bits.append(f"missing keys {missing}")
        if unexpected:
            bits.append(f"unexpected keys {unexpected}")
        if mismatched:
            bits.append(f"shape mismatches [{'; '.join(mismatched)}]")
        raise ValueError("state dict does not fit this Mamba config: " + "; ".join(bits)
                         + ". Check that the config belongs to these weights.")
    out = {}
    for src, (ours, _) in expected.items():
        t = sd[src].detach()
        out[ours] = t.T.contiguous() if ours == "unembed.W_U" else t
    out["unembed.b_U"] = torch.zeros(model.cfg.d_vocab)
    return out


def _get(conf, *names, default=None):
    for n in names:
        v = conf.get(n) if isinstance(conf, dict) else getattr(conf, n, None)
        if v is not None:
            return v
    return default


# ---------------------------------------------------------------------------------------------------
# the model


class HookedMamba(HookedRootModule):
    """Mamba-1 language model with TransformerLens hooks; see the module docstring for hook names."""

    def __init__(self, cfg: MambaConfig, tokenizer=None, init_seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.padding_side = "right"
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([MambaBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = Norm(cfg)
        self.unembed = Unembed(cfg)
        if init_seed is not None:
            self.init_weights(init_seed)
        self.setup()
        self.to(cfg.device)
        self.eval()

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        """Keep cfg.device / cfg.dtype in step with `.to()`, `.cuda()`, `.half()` etc."""
        out = super()._apply(fn, *args, **kwargs)
        p = self.embed.W_E
        if str(p.device) != self.cfg.device or p.dtype != self.cfg.dtype:
            self.cfg = replace(self.cfg, device=str(p.device), dtype=p.dtype)
            for block in self.mamba_blocks:
                block.mixer.cfg = self.cfg
        return out

    @property
    def mamba_blocks(self) -> list[MambaBlock]:
        """`blocks`, typed as what they are."""
        return cast("list[MambaBlock]", list(self.blocks))

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.unembed.b_U

    def set_use_kernels(self, flag: bool) -> None:
        """Allow (default) or forbid the mamba-ssm CUDA kernels; the plain path is always exact."""
        for block in self.mamba_blocks:
            block.mixer.use_kernels = bool(flag)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random weights (Mamba's own dt / A / D initialisation; other scales keep logits varied)."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg

        def normal(shape, std):
            return (torch.randn(shape, generator=g) * std).to(cfg.dtype)

        self.embed.W_E.copy_(normal(self.embed.W_E.shape, 1.0))
        self.unembed.W_U.copy_(normal(self.unembed.W_U.shape, 2.0 / cfg.d_model**0.5))
        self.unembed.b_U.zero_()
        for norm in [self.ln_final] + [block.norm for block in self.mamba_blocks]:
            norm.w.fill_(1.0)
            if norm.is_ln:
                norm.b.zero_()
        for block in self.mamba_blocks:
            m = block.mixer
            m.in_proj.weight.copy_(normal(m.in_proj.weight.shape, 1.0 / cfg.d_model**0.5))
            m.conv1d.weight.copy_(normal(m.conv1d.weight.shape, 1.0 / cfg.d_conv**0.5))
            m.x_proj.weight.copy_(normal(m.x_proj.weight.shape, 1.0 / cfg.d_inner**0.5))
            m.dt_proj.weight.copy_((torch.rand(m.dt_proj.weight.shape, generator=g) * 2 - 1) * cfg.dt_rank**-0.5)
            dt = torch.exp(torch.rand(cfg.d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1))
            m.D.fill_(1.0)
            m.out_proj.weight.copy_(normal(m.out_proj.weight.shape, 1.0 / cfg.d_inner**0.5))
            for b in (m.in_proj.bias, m.conv1d.bias, m.out_proj.bias):
                if b is not None:
                    b.copy_(normal(b.shape, 0.02))

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        return_type: str | None = "logits",
        *,
        prepend_bos: bool | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        state: MambaState | None = None,
        return_state: bool = False,
        loss_per_token: bool = False,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ):
        """Run the model.

        `input`: text, a list of texts, tokens [batch, pos], or (with `start_at_layer`) the residual
        stream before that block. `return_type`: "logits", "loss" (mean next-token cross-entropy),
        "both" (logits, loss) or None. `stop_at_layer=l` returns the residual stream before block l.
        `state` continues from an earlier run's `MambaState` (the input then holds only the new
        positions; hooks see only those); `return_state=True` returns (output, MambaState).
        `attention_mask` (1 = token, 0 = left padding) makes left-padded rows of a run from an empty
        state exact: the padding leaves the state empty (see `MambaMixer.forward`).
        """
        tokens = None
        if start_at_layer is None:
            if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
                tokens = self.to_tokens(list(input) if not isinstance(input, str) else input, prepend_bos=prepend_bos)
            else:
                tokens = torch.as_tensor(input)
            if tokens.ndim == 1:
                tokens = tokens[None]
            resid = self.hook_embed(self.embed(tokens.to(self.embed.W_E.device)))
            start = 0
        else:
            n = self.cfg.n_layers
            resid, start = input, (start_at_layer + n if start_at_layer < 0 else start_at_layer)
        n = self.cfg.n_layers
        stop = n if stop_at_layer is None else (stop_at_layer + n if stop_at_layer < 0 else stop_at_layer)
        convs: list[Tensor | None] = list(state.conv) if state is not None else [None] * self.cfg.n_layers
        ssms: list[Tensor | None] = list(state.ssm) if state is not None else [None] * self.cfg.n_layers
        for l in range(start, stop):
            if return_state:
                resid, convs[l], ssms[l] = self.blocks[l](resid, convs[l], ssms[l], True, attention_mask)
            else:
                resid = self.blocks[l](resid, convs[l], ssms[l], False, attention_mask)
        new_state = MambaState(convs, ssms) if return_state else None
        if stop_at_layer is not None or return_type is None:
            out = resid if stop_at_layer is not None else None
            return (out, new_state) if return_state else out
        logits = self.unembed(self.ln_final(resid))
        if return_type == "logits":
            out = logits
        elif return_type in ("loss", "both"):
            if tokens is None:
                raise ValueError("return_type='loss' needs tokens as input (not start_at_layer)")
            logp = logits[:, :-1].log_softmax(-1)
            nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]
            loss = nll if loss_per_token else nll.mean()
            out = loss if return_type == "loss" else (logits, loss)
        else:
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        return (out, new_state) if return_state else out

    @torch.no_grad()
    def generate(self, input: str | Int[Tensor, "batch pos"], max_new_tokens: int = 10,
                 stop_at_eos: bool = True, eos_token_id: int | None = None, do_sample: bool = False,
                 return_type: str = "input", verbose: bool = False, **kwargs):
        """Greedy generation through the recurrent state (hooks active in `model.hooks()` fire at every step)."""
        if do_sample:
            raise NotImplementedError("HookedMamba.generate is greedy only (do_sample=False)")
        tokens = self.to_tokens(input) if isinstance(input, str) else input
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        logits, state = self(tokens, return_state=True)
        out = tokens
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if stop_at_eos and eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stop_at_eos and bool(done.all()):
                break
            logits, state = self(nxt[:, None], state=state, return_state=True)
        if return_type == "str" or (return_type == "input" and isinstance(input, str)):
            return self.to_string(out[0])
        return out

    # -- tokenizer helpers (HookedTransformer's behaviour) --------------------------------------------

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this HookedMamba has no tokenizer: pass tokens, or load a folder that has "
                             "tokenizer files, or set model.tokenizer")
        return self.tokenizer

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True,
                  truncate: bool = False) -> Int[Tensor, "batch pos"]:
        """Text -> tokens [batch, pos]. Lists are padded on `padding_side` (default right; left padding
        is exact only with `forward(..., attention_mask=...)`)."""
        tok = self._tok()
        texts = [input] if isinstance(input, str) else list(input)
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if bos:
            if tok.bos_token_id is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
            ids = [[tok.bos_token_id] + i for i in ids]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        side = padding_side or self.padding_side
        rows = [(i + [pad] * (width - len(i))) if side == "right" else ([pad] * (width - len(i)) + i) for i in ids]
        out = torch.tensor(rows, dtype=torch.long)
        return out.to(self.cfg.device) if move_to_device else out

    def to_string(self, tokens) -> str | list[str]:
        """Tokens -> text (rank 0/1 gives a string, rank 2 a list of strings)."""
        tok = self._tok()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return tok.batch_decode(tokens, clean_up_tokenization_spaces=False)
        if tokens.ndim <= 1:
            return tok.decode(tokens.reshape(-1), clean_up_tokenization_spaces=False)
        raise ValueError(f"to_string takes rank 0, 1 or 2 tokens, got shape {tuple(tokens.shape)}")

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        """Each token as a string, for text or a token tensor (batch 1) or a list of texts."""
        tok = self._tok()
        if isinstance(input, list) and input and isinstance(input[0], str):
            return [cast("list[str]", self.to_str_tokens(t, prepend_bos)) for t in input]
        tokens = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError("to_str_tokens takes one sequence; got a batch of " f"{tokens.shape[0]}")
            tokens = tokens[0]
        return [tok.decode([int(t)], clean_up_tokenization_spaces=False) for t in tokens.reshape(-1)]

    def to_single_token(self, string: str) -> int:
        tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one")
        return int(tokens[0])

    def tokens_to_residual_directions(self, tokens) -> Tensor:
        return self.W_U[:, torch.as_tensor(tokens, device=self.W_U.device)].T

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_model_or_state_dict, hf_config=None, tokenizer=None, model_name: str | None = None,
                device: str | None = None, dtype: torch.dtype | None = None) -> "HookedMamba":
        """From a transformers `MambaForCausalLM` (or its state dict plus its config / config dict)."""
        if isinstance(hf_model_or_state_dict, nn.Module):
            hf_config = hf_config or hf_model_or_state_dict.config
            sd = hf_model_or_state_dict.state_dict()
        else:
            sd = hf_model_or_state_dict
        if hf_config is None:
            raise ValueError("from_hf needs the HF config when given a bare state dict")
        act = _get(hf_config, "hidden_act", default="silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"HookedMamba implements SiLU mixers only; this config has hidden_act={act!r}")
        d_model = int(_get(hf_config, "hidden_size"))
        expand = _get(hf_config, "expand", default=2)
        rank = _get(hf_config, "time_step_rank", default="auto")
        cfg = MambaConfig(
            n_layers=int(_get(hf_config, "num_hidden_layers")), d_model=d_model,
            d_inner=int(_get(hf_config, "intermediate_size", default=int(expand * d_model))),
            d_state=int(_get(hf_config, "state_size", default=16)),
            d_conv=int(_get(hf_config, "conv_kernel", default=4)),
            dt_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank),
            d_vocab=int(_get(hf_config, "vocab_size")),
            model_name=model_name or str(_get(hf_config, "_name_or_path", default="") or "mamba-hf"),
            original_architecture="MambaForCausalLM",
            eps=float(_get(hf_config, "layer_norm_epsilon", default=1e-5)),
            use_bias=bool(_get(hf_config, "use_bias", default=False)),
            conv_bias=bool(_get(hf_config, "use_conv_bias", default=True)),
            tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", default=True)),
            device=device or "cpu", dtype=dtype or torch.float32,
        )
        embed_key = "backbone.embedding.weight" if "backbone.embedding.weight" in sd else "backbone.embeddings.weight"
        return cls._from_converted(cfg, sd, embed_key, tokenizer)

    @classmethod
    def from_mamba_ssm_state_dict(cls, state_dict: dict[str, Tensor], config_dict: dict, tokenizer=None,
                                  model_name: str = "mamba-ssm", device: str | None = None,
                                  dtype: torch.dtype | None = None) -> "HookedMamba":
        """From a mamba-ssm `MambaLMHeadModel` state dict and its config (config.json as a dict)."""
        ssm = dict(config_dict.get("ssm_cfg") or {})
        if ssm.get("layer", "Mamba1") != "Mamba1":
            raise ValueError(f"HookedMamba implements Mamba-1 only; this config has ssm_cfg.layer={ssm['layer']!r}")
        if config_dict.get("d_intermediate", 0) or config_dict.get("attn_layer_idx"):
            raise ValueError("this mamba-ssm config has MLP or attention layers (d_intermediate/attn_layer_idx); "
                             "HookedMamba implements pure Mamba-1 stacks only")
        d_model = int(config_dict["d_model"])
        vocab = int(config_dict["vocab_size"])
        mult = int(config_dict.get("pad_vocab_size_multiple", 1))
        if vocab % mult:
            vocab += mult - vocab % mult
        expand = ssm.get("expand", 2)
        rank = ssm.get("dt_rank", "auto")
        cfg = MambaConfig(
            n_layers=int(config_dict["n_layer"]), d_model=d_model, d_inner=int(expand * d_model),
            d_state=int(ssm.get("d_state", 16)), d_conv=int(ssm.get("d_conv", 4)),
            dt_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank), d_vocab=vocab,
            model_name=model_name, original_architecture="MambaLMHeadModel",
            eps=float(config_dict.get("norm_epsilon", 1e-5)), use_bias=bool(ssm.get("bias", False)),
            conv_bias=bool(ssm.get("conv_bias", True)),
            normalization_type="RMS" if config_dict.get("rms_norm", True) else "LN",
            tie_embeddings=bool(config_dict.get("tie_embeddings", True)),
            device=device or "cpu", dtype=dtype or torch.float32,
        )
        return cls._from_converted(cfg, state_dict, "backbone.embedding.weight", tokenizer)

    @classmethod
    def _from_converted(cls, cfg: MambaConfig, sd, embed_key: str, tokenizer) -> "HookedMamba":
        model = cls(replace(cfg, device="cpu", dtype=torch.float32), tokenizer=tokenizer, init_seed=None)
        ours = _convert_state_dict(model, sd, embed_key, cfg.tie_embeddings)
        model.load_state_dict({k: v.to(torch.float32).cpu() for k, v in ours.items()}, strict=True)
        return model.to(cfg.device).to(cfg.dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None,
                        dtype: torch.dtype | None = None) -> "HookedMamba":
        """From a local folder: HF (config.json with model_type "mamba") or mamba-ssm (config.json with
        n_layer), weights as safetensors or a PyTorch file (loaded with weights_only=True); the folder's
        tokenizer if it has one.

        The first load converts the weights and caches the result (`mechcopy.models.processed`);
        later loads memory-map it into a model built without random weights."""
        from mechcopy.models.processed import load_processed

        path = Path(path).expanduser().resolve()
        conf_file = path / "config.json"
        if not conf_file.exists():
            raise FileNotFoundError(f"{path} has no config.json (not a Mamba model folder)")
        processed = load_processed(path, "HookedMamba", lambda: cls._process_folder(path))
        tokenizer = None
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        cfg = MambaConfig.from_json(processed.config)
        model = cls(replace(cfg, device="cpu", dtype=torch.float32), tokenizer=tokenizer, init_seed=None)
        model.load_state_dict(processed.tensors, strict=True, assign=True)
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).to(dtype or torch.float32)
        model.cfg = replace(model.cfg, tokenizer_name=str(path) if tokenizer is not None else None)
        return model

    @classmethod
    def _process_folder(cls, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """A Mamba folder's (config, float32 tensors), converted from HF or mamba-ssm names."""
        conf = json.loads((path / "config.json").read_text())
        if not isinstance(conf, dict):
            raise ValueError(f"{path / 'config.json'} holds {type(conf).__name__}, not a JSON object of settings")
        sd = _load_weights(path)
        if "n_layer" in conf and "d_model" in conf:
            model = cls.from_mamba_ssm_state_dict(sd, conf, None, model_name=path.name, device="cpu")
        elif conf.get("model_type") == "mamba":
            model = cls.from_hf(sd, conf, None, model_name=path.name, device="cpu")
        else:
            raise ValueError(f"{path / 'config.json'} is neither an HF Mamba config (model_type 'mamba') nor a "
                             f"mamba-ssm config (n_layer, d_model); model_type is {conf.get('model_type')!r}")
        return model.cfg.to_json(), {k: t.detach() for k, t in model.state_dict().items()}

    def to_mamba_ssm_state_dict(self) -> dict[str, Tensor]:
        """This model's weights under mamba-ssm `MambaLMHeadModel` names (for a round trip or export)."""
        out = {}
        for ours, t in self.state_dict().items():
            src = _source_name(ours, "backbone.embedding.weight")
            if src is not None:
                out[src] = (t.T if ours == "unembed.W_U" else t).detach().clone()
        return out

    def mamba_ssm_config(self) -> dict[str, Any]:
        """The mamba-ssm config dict matching `to_mamba_ssm_state_dict()`."""
        c = self.cfg
        return {"d_model": c.d_model, "n_layer": c.n_layers, "vocab_size": c.d_vocab, "d_intermediate": 0,
                "ssm_cfg": {"layer": "Mamba1", "d_state": c.d_state, "d_conv": c.d_conv,
                            "expand": c.d_inner / c.d_model, "dt_rank": c.dt_rank,
                            "conv_bias": c.conv_bias, "bias": c.use_bias},
                "rms_norm": c.normalization_type == "RMS", "residual_in_fp32": True,
                "pad_vocab_size_multiple": 1, "tie_embeddings": False, "norm_epsilon": c.eps}


def _load_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a model folder: *.safetensors (sharded or not) or a PyTorch file (weights only)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (path / name).exists():
            return torch.load(path / name, map_location="cpu", weights_only=True)
    shards = sorted(path.glob("pytorch_model-*.bin"))
    if shards:
        sd = {}
        for f in shards:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    raise FileNotFoundError(f"{path} has no weights (*.safetensors or pytorch_model.bin)")


def tiny_mamba(n_layers: int = 2, d_model: int = 32, d_state: int = 8, d_conv: int = 4, expand: int = 2,
               seed: int = 0, dt_rank: int | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> HookedMamba:
    """A small random HookedMamba with the character tokenizer, for tests."""
    from mechcopy.models.tiny import char_tokenizer

    tok = char_tokenizer()
    cfg = MambaConfig(
        n_layers=n_layers, d_model=d_model, d_inner=expand * d_model, d_state=d_state, d_conv=d_conv,
        dt_rank=dt_rank or math.ceil(d_model / 16), d_vocab=len(tok),
        model_name=f"tiny-mamba-l{n_layers}-d{d_model}-s{seed}", original_architecture="tiny-mamba",
        seed=seed, tokenizer_name="char",
    )
    return HookedMamba(cfg, tokenizer=tok, init_seed=seed).to(device, dtype)
