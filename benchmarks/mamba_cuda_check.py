"""CUDA check for HookedMamba: mamba-ssm kernel paths against the plain PyTorch path (a few minutes).

Run on a machine with a CUDA GPU and `pip install -e '.[mamba]'` (mamba-ssm, causal-conv1d):

    python benchmarks/mamba_cuda_check.py [--out results/mamba_cuda_check.json]

It builds a random HookedMamba on CUDA and compares, on the same tokens:
  * the fused path (`mamba_inner_fn`, no mixer-internal hooks) vs the plain path: logits;
  * the scan-kernel path (`selective_scan_fn`, a hook on every `hook_gated`) vs the plain path: logits,
    `hook_gated` activations, and the gradient at `hook_gated` (what Integrated Gradients uses);
  * the plain path on CUDA vs the same model on CPU: logits;
and times each path. It prints one JSON object (and writes it with --out); the exit status is 1 when a
difference exceeds its tolerance or a kernel path did not run although mamba-ssm imported.
Without mamba-ssm it still runs the CUDA-vs-CPU comparison and says the kernels were unavailable.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mechcopy.models.mamba as mm  # noqa: E402
from mechcopy.models.mamba import HookedMamba, MambaConfig  # noqa: E402

TOL_LOGITS = 2e-3   # float32 kernels re-associate sums; logits are O(1-10)
TOL_ACT = 1e-3
TOL_GRAD_REL = 1e-2


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> tuple[object, float]:
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync()
    return out, (time.perf_counter() - t0) / reps


def _counting(kernels: dict) -> dict:
    counts = {k: 0 for k in kernels}
    wrapped = {}
    for name, fn in kernels.items():
        def make(name=name, fn=fn):
            def call(*a, **k):
                counts[name] += 1
                return fn(*a, **k)
            return call
        wrapped[name] = make()
    mm._KERNEL_CACHE = wrapped
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pos", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only smoke-tests this script")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this check needs a GPU machine"}))
        return 2

    cfg = MambaConfig(n_layers=args.layers, d_model=args.d_model, d_inner=2 * args.d_model,
                      d_state=args.d_state, d_conv=4, dt_rank=-(-args.d_model // 16), d_vocab=1000,
                      model_name="cuda-check", seed=args.seed, device="cpu")
    model_cpu = HookedMamba(cfg, init_seed=args.seed)
    model = HookedMamba(cfg, init_seed=args.seed).to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    tokens_cpu = torch.randint(0, cfg.d_vocab, (args.batch, args.pos), generator=g)
    tokens = tokens_cpu.to(args.device)
    sites = [f"blocks.{l}.mixer.hook_gated" for l in range(cfg.n_layers)]
    report: dict = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device, "torch": torch.__version__, "python": platform.python_version(),
        "config": cfg.to_json(), "batch": args.batch, "pos": args.pos, "reps": args.reps,
    }
    try:
        import mamba_ssm

        report["mamba_ssm"] = getattr(mamba_ssm, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        report["mamba_ssm"] = None
        report["mamba_ssm_import_error"] = f"{type(e).__name__}: {e}"
    kernels = mm._kernels()
    report["kernels_available"] = sorted(kernels)
    counts = _counting(kernels)
    ok = True

    def with_gated_hooks(store: dict):
        def capture(act, hook):
            store[hook.name] = act
        return [(s, capture) for s in sites]

    with torch.no_grad():
        model.set_use_kernels(False)
        plain_store: dict = {}
        plain, t_plain = _timed(lambda: model(tokens), args.reps)
        model.run_with_hooks(tokens, fwd_hooks=with_gated_hooks(plain_store))
        ref_cpu = model_cpu(tokens_cpu)
        report["plain_cuda_vs_cpu_max_abs_logit_diff"] = (plain.cpu() - ref_cpu).abs().max().item()
        ok &= report["plain_cuda_vs_cpu_max_abs_logit_diff"] < TOL_LOGITS
        report["time_plain_s"] = t_plain

        model.set_use_kernels(True)
        before = dict(counts)
        fused, t_fused = _timed(lambda: model(tokens), args.reps)
        report["fused_calls"] = counts.get("mamba_inner_fn", 0) - before.get("mamba_inner_fn", 0)
        report["fused_vs_plain_max_abs_logit_diff"] = (fused - plain).abs().max().item()
        report["time_fused_s"] = t_fused

        store: dict = {}
        before = dict(counts)
        scanned, t_scan = _timed(lambda: model.run_with_hooks(tokens, fwd_hooks=with_gated_hooks(store)), args.reps)
        report["scan_calls"] = counts.get("selective_scan_fn", 0) - before.get("selective_scan_fn", 0)
        report["scan_vs_plain_max_abs_logit_diff"] = (scanned - plain).abs().max().item()
        report["scan_vs_plain_max_abs_hook_gated_diff"] = max(
            (store[s] - plain_store[s]).abs().max().item() for s in sites)
        report["time_scan_with_hooks_s"] = t_scan

    # gradient at layer 0's hook_gated (what IG differentiates; flows through every layer), both paths
    def grad_at_gated(use_kernels: bool) -> torch.Tensor:
        model.set_use_kernels(use_kernels)
        site = sites[0]
        leaf = {}

        def make_leaf(act, hook):
            leaf["x"] = act.detach().requires_grad_(True)
            return leaf["x"]
        logits = model.run_with_hooks(tokens, fwd_hooks=[(site, make_leaf)])
        (logits[:, -1, 1] - logits[:, -1, 2]).sum().backward()
        return leaf["x"].grad

    g_plain, g_kern = grad_at_gated(False), grad_at_gated(True)
    report["scan_grad_rel_diff"] = ((g_kern - g_plain).norm() / g_plain.norm().clamp_min(1e-12)).item()

    if kernels:
        if "mamba_inner_fn" in kernels:
            ok &= report["fused_calls"] > 0 and report["fused_vs_plain_max_abs_logit_diff"] < TOL_LOGITS
        ok &= report["scan_calls"] > 0
        ok &= report["scan_vs_plain_max_abs_logit_diff"] < TOL_LOGITS
        ok &= report["scan_vs_plain_max_abs_hook_gated_diff"] < TOL_ACT
        ok &= report["scan_grad_rel_diff"] < TOL_GRAD_REL
        report["speedup_fused_vs_plain"] = t_plain / t_fused
        report["speedup_scan_vs_plain"] = t_plain / t_scan
    report["tolerances"] = {"logits": TOL_LOGITS, "hook_gated": TOL_ACT, "grad_rel": TOL_GRAD_REL}
    report["ok"] = bool(ok)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
