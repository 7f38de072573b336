"""IG speed and agreement: the fast path against the reference (timed on every layer) and captum.

    python benchmarks/ig_speed.py [--model smollm2-135m] [--prompts 2] [--steps 20] [--threads 1]
        [--captum-layers 15] [--mamba auto|none|FOLDER] [--out results/ig_speed.json]

Prints and writes one JSON object (rewritten after every stage, so a long run leaves its numbers):

* seconds per prompt of the fast path, the reference (every layer: `reference_all_layers`) and captum's
  LayerIntegratedGradients (run on --captum-layers and extrapolated to all layers, labelled so: it
  runs the full sequence per layer, like the reference);
* `speedup_fast_vs_reference`, `speedup_fast_vs_captum` (extrapolated), and the agreement of the fast
  path and of captum with the reference: max |x - reference| / max |reference| per prompt, and per layer;
* the machine's float32 matmul rate (a 2048^3 matmul in this process, same threads, before and after
  the fast path), the fast path's FLOPs per prompt (`flop_formula`), its GFLOP/s and roofline fraction;
* threads, torch version, and a Mamba section: fast vs reference on a HookedMamba (the Mamba model
  organism if one is cached, else a random tiny_mamba of d_model 256 and 8 layers).

On a shared CPU use --threads 1 (two threads on two busy cores wait for each other).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOP_FORMULA = (
    "2 FLOP per multiply-add. Rows: for each attributed layer l, steps+1 rows run W_out of block l and every "
    "later block whole; per row and block: d_model*d_head*(2*n_heads + 2*n_kv_heads) (W_Q, W_K, W_V, W_O) + "
    "(3 if gated else 2)*d_model*d_mlp (MLP) + 2*n_heads*d_head*(prefix+1) (scores and values over the prefix "
    "and the row itself), plus 2*d_model for the two unembedding columns of the contrast; counted twice: "
    "forward and backward to the inputs (the same matmuls again). Weight-gradient FLOPs are excluded: "
    "autograd.grad asks for the leaves only and no weight gradient is computed. Clean run: one forward over "
    "the prompt's T tokens, T*n_layers*(projections + MLP) + n_layers*n_heads*d_head*T*(T+1) + d_model*d_vocab "
    "(last position's logits). flop_per_prompt = rows + clean run."
)


def fast_path_flops(cfg, n_tokens: int, steps: int) -> dict[str, float]:
    """FLOPs of the fast path on one prompt of `n_tokens` tokens, all layers (see FLOP_FORMULA)."""
    d, heads, d_head, n = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers
    kv = cfg.n_key_value_heads or heads
    projections = d * d_head * (2 * heads + 2 * kv)
    mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
    block = projections + mlp + 2 * heads * d_head * n_tokens
    per_row = sum(cfg.d_mlp * d + (n - 1 - l) * block + 2 * d for l in range(n))
    rows = 2 * 2 * (steps + 1) * per_row
    clean = 2 * (n_tokens * n * (projections + mlp) + n * heads * d_head * n_tokens * (n_tokens + 1) + d * cfg.d_vocab)
    return {"rows": float(rows), "clean_run": float(clean), "total": float(rows + clean)}


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """float32 matmul rate of this process (best of `reps`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|."""
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def per_layer_rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest `rel_diff` over prompts and layers ([prompts, layers, neurons])."""
    return max(rel_diff(a, b) for xp, rp in zip(x, ref) for a, b in zip(xp, rp))


class LastPositionNeurons(torch.nn.Module):
    """Identity: the neuron vector at the last position, as a layer captum can attribute to."""

    def forward(self, x):
        return x


def captum_layer_ig(model, prompt, layer: int, steps: int, copy: int, gold: int) -> torch.Tensor:
    """captum LayerIntegratedGradients on layer `layer`'s last-position neurons (baseline 0, contrast)."""
    from captum.attr import LayerIntegratedGradients

    from mechcopy.sites import neuron_site

    tokens = model.to_tokens(prompt.text)
    wrapper = LastPositionNeurons()
    _, cache = model.run_with_cache(tokens, names_filter=neuron_site(model, layer))
    act = cache[neuron_site(model, layer)][:, -1]                     # [1, N]

    def forward(x):                                                    # x: [batch, N] last-position neurons
        def put(a, hook):
            return torch.cat([a[:, :-1].expand(x.shape[0], -1, -1), wrapper(x)[:, None]], dim=1)

        logits = model.run_with_hooks(tokens.expand(x.shape[0], -1), fwd_hooks=[(neuron_site(model, layer), put)])
        return logits[:, -1, copy] - logits[:, -1, gold]

    lig = LayerIntegratedGradients(forward, wrapper)
    attr = lig.attribute(act, baselines=torch.zeros_like(act), n_steps=steps, method="gausslegendre",
                         internal_batch_size=steps)
    return attr[0].detach()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def mamba_section(spec: str, n_prompts: int, steps: int) -> dict:
    """Fast vs reference IG on a HookedMamba: the cached Mamba organism, FOLDER, or tiny_mamba(8, 256)."""
    from mechcopy.attribution import integrated_gradients
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.organisms import load_organism, probe_splits as organism_splits
    from mechcopy.organisms.train import CONFIG_FILE, default_dir

    folder = Path(spec) if spec != "auto" else default_dir("mamba", 0)
    if spec != "auto" or (folder / CONFIG_FILE).exists():
        model = load_organism(folder)
        prompts = organism_splits(model.tokenizer, n_attr=n_prompts, n_dev=1, n_test=1)[0]
        source = f"organism {folder}"
    else:
        from mechcopy.models.mamba import tiny_mamba
        from mechcopy.tasks.probe import probe_splits

        model = tiny_mamba(n_layers=8, d_model=256, seed=0)
        prompts = probe_splits(model.tokenizer, n_attr=n_prompts, n_dev=1, shots=4, seed=0)[0]
        source = "random tiny_mamba(n_layers=8, d_model=256) (no Mamba organism cached)"
    integrated_gradients(model, prompts[:1], steps=2)                 # warm-up
    fast, t_fast = timed(lambda: integrated_gradients(model, prompts, steps=steps))
    ref, t_ref = timed(lambda: integrated_gradients(model, prompts, steps=steps, method="reference"))
    return {"source": source, "model": model_fingerprint(model), "n_prompts": len(prompts),
            "prompt_tokens": [int(model.to_tokens(p.text).shape[1]) for p in prompts],
            "fast_s_per_prompt": t_fast / len(prompts), "reference_s_per_prompt": t_ref / len(prompts),
            "reference_all_layers": True, "speedup_fast_vs_reference": t_ref / t_fast,
            "max_rel_diff_fast_vs_reference": max(rel_diff(a, b) for a, b in zip(fast.values, ref.values)),
            "max_rel_diff_fast_vs_reference_per_layer": per_layer_rel_diff(fast.values, ref.values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per batch of IG rows (fast path)")
    p.add_argument("--captum-layers", default="15", help="layers captum runs on (comma-separated; empty: skip)")
    p.add_argument("--skip-reference", action="store_true", help="fast and captum only")
    p.add_argument("--mamba", default="auto", help="auto (cached organism, else tiny_mamba 8x256), none, or a folder")
    p.add_argument("--out", default="results/ig_speed.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from mechcopy import load_model
    from mechcopy.attribution import grad_x_act, integrated_gradients, rank_correlation
    from mechcopy.io import write_json_atomic
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.provenance import git_revision
    from mechcopy.tasks.probe import probe_splits

    def save(stage: str) -> None:
        write_json_atomic(args.out, res)
        print(f"[{stage}] written to {args.out}", file=sys.stderr, flush=True)

    model = load_model(args.model)
    prompts, _ = probe_splits(model.tokenizer, n_attr=args.prompts, n_dev=1, shots=4, seed=0)
    tokens = [int(model.to_tokens(q.text).shape[1]) for q in prompts]
    res: dict = {"model": model_fingerprint(model), "git_revision": git_revision(), "n_prompts": len(prompts),
                 "prompt_tokens": tokens, "steps": args.steps, "rule": "gauss-legendre", "threads": args.threads,
                 "batch_size": args.batch_size, "torch": torch.__version__, "machine": platform.machine(),
                 "processor": platform.processor()}

    integrated_gradients(model, prompts[:1], steps=2, layers=[0])      # warm-up
    before = matmul_gflops()
    fast, t_fast = timed(lambda: integrated_gradients(model, prompts, steps=args.steps, batch_size=args.batch_size))
    after = matmul_gflops()
    flops = [fast_path_flops(model.cfg, t, args.steps) for t in tokens]
    per_prompt = sum(f["total"] for f in flops) / len(flops)
    res["matmul_gflops"] = {"before_fast": before, "after_fast": after, "n": 2048, "dtype": "float32"}
    res["fast"] = {"seconds": t_fast, "seconds_per_prompt": t_fast / len(prompts),
                   "completeness_error": {"median": float(fast.completeness_error().median()),
                                          "max": float(fast.completeness_error().max())},
                   "flop_per_prompt": per_prompt, "flop_per_prompt_parts": flops,
                   "achieved_gflops": per_prompt * len(prompts) / t_fast / 1e9,
                   "roofline_fraction": per_prompt * len(prompts) / t_fast / 1e9 / max(before, after)}
    res["flop_formula"] = FLOP_FORMULA
    gxa, t_gxa = timed(lambda: grad_x_act(model, prompts, batch_size=args.batch_size))
    res["gradxact"] = {"seconds_per_prompt": t_gxa / len(prompts),
                       "rank_correlation_with_ig": [rank_correlation(a, b) for a, b in zip(fast.values, gxa.values)]}
    save("fast")

    ref = None
    if not args.skip_reference:                                        # every layer, prompt by prompt
        parts, seconds = [], []
        for prompt in prompts:
            part, t = timed(lambda: integrated_gradients(model, [prompt], steps=args.steps, method="reference"))
            parts.append(part.values[0])
            seconds.append(t)
            done = torch.stack(parts)
            res["reference"] = {"seconds_per_prompt": sum(seconds) / len(seconds), "seconds": seconds,
                                "prompts_done": len(seconds)}
            res["reference_all_layers"] = True
            res["speedup_fast_vs_reference"] = res["reference"]["seconds_per_prompt"] / res["fast"]["seconds_per_prompt"]
            res["max_rel_diff_fast_vs_reference"] = max(rel_diff(a, b) for a, b in zip(fast.values, done))
            res["max_rel_diff_fast_vs_reference_per_layer"] = per_layer_rel_diff(fast.values[:len(done)], done)
            save(f"reference prompt {len(seconds)}")
        ref = torch.stack(parts)

    layers = [int(l) for l in args.captum_layers.split(",") if l]
    if layers:
        diffs, seconds = [], 0.0
        against = ref if ref is not None else fast.values
        for i, prompt in enumerate(prompts):
            for layer in layers:
                c, t = timed(lambda: captum_layer_ig(model, prompt, layer, args.steps, fast.copy_tokens[i],
                                                     fast.gold_tokens[i]))
                seconds += t
                diffs.append(rel_diff(c, against[i, layer]))
        per_layer = seconds / (len(prompts) * len(layers))
        res["captum"] = {"layers_timed": layers, "seconds_per_prompt_layer": per_layer,
                         "seconds_per_prompt_extrapolated_to_all_layers": per_layer * model.cfg.n_layers,
                         "extrapolated": True,
                         "max_rel_diff_vs_" + ("reference" if ref is not None else "fast"): max(diffs)}
        res["speedup_fast_vs_captum"] = per_layer * model.cfg.n_layers / res["fast"]["seconds_per_prompt"]
        res["speedup_fast_vs_captum_is_extrapolated"] = True
        save("captum")

    if args.mamba != "none":
        res["mamba"] = mamba_section(args.mamba, args.prompts, args.steps)
        save("mamba")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
