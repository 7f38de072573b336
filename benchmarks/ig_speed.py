"""IG speed and agreement: fast vs reference on every layer, and captum's LayerIntegratedGradients.

    python benchmarks/ig_speed.py [--model smollm2-135m] [--prompts 4] [--steps 20] [--threads 1]
        [--captum-layers 15] [--out results/ig_speed.json]

Prints JSON: wall times, the fast/reference speed ratio, max |fast - reference| / max |reference|,
and the same for captum on the listed layers (captum runs the full sequence per layer, like the
reference, so its all-layer time is extrapolated from the per-layer time and says so).

On a shared CPU, use --threads 1: with two threads every small op waits for a descheduled worker
(measured here: a forward 8x slower with 2 threads than with 1 while other jobs ran).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings

import torch


class LastPositionNeurons(torch.nn.Module):
    """Identity: the neuron vector at the last position, as a layer captum can attribute to."""

    def forward(self, x):
        return x


def captum_layer_ig(model, prompt, layer: int, steps: int, copy: int, gold: int):
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--captum-layers", default="15")
    p.add_argument("--skip-reference", action="store_true", help="fast and captum only")
    p.add_argument("--reference-layers", default=None,
                   help="time the reference on these layers only and extrapolate to all (CPU time)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from mechcopy import load_model
    from mechcopy.attribution import grad_x_act, integrated_gradients, rank_correlation
    from mechcopy.io import write_json_atomic
    from mechcopy.neurons import model_fingerprint
    from mechcopy.tasks.probe import probe_splits

    model = load_model(args.model)
    prompts, _ = probe_splits(model.tokenizer, n_attr=args.prompts, n_dev=1, k=4, seed=0)
    res: dict = {"model": model_fingerprint(model), "n_prompts": len(prompts), "steps": args.steps,
                 "rule": "gauss-legendre", "threads": args.threads, "torch": torch.__version__,
                 "machine": platform.machine(), "prompt_tokens": [int(model.to_tokens(q.text).shape[1]) for q in prompts]}

    integrated_gradients(model, prompts[:1], steps=2, layers=[0])      # warm-up
    t, c = time.perf_counter(), time.process_time()
    fast = integrated_gradients(model, prompts, steps=args.steps, method="fast")
    res["fast_s"] = time.perf_counter() - t
    res["fast_cpu_s"] = time.process_time() - c
    res["fast_s_per_prompt"] = res["fast_s"] / len(prompts)
    res["completeness_error_fast"] = {"median": float(fast.completeness_error().median()),
                                      "max": float(fast.completeness_error().max())}
    t = time.perf_counter()
    gxa = grad_x_act(model, prompts)
    res["gradxact_s"] = time.perf_counter() - t
    res["gradxact_vs_ig_rank_correlation"] = [rank_correlation(a, b) for a, b in zip(fast.values, gxa.values)]
    print(json.dumps({k: v for k, v in res.items() if k != "model"}), file=sys.stderr, flush=True)

    layers = [int(l) for l in args.captum_layers.split(",") if l]
    if layers:
        t = time.perf_counter()
        diffs = []
        for i, prompt in enumerate(prompts):
            for layer in layers:
                c = captum_layer_ig(model, prompt, layer, args.steps, fast.copy_tokens[i], fast.gold_tokens[i])
                diffs.append(float((c - fast.values[i, layer]).abs().max() / fast.values[i].abs().max()))
        captum_s = time.perf_counter() - t
        per_layer = captum_s / (len(prompts) * len(layers))
        res["captum"] = {"layers": layers, "seconds": captum_s, "seconds_per_prompt_layer": per_layer,
                         "all_layers_s_extrapolated": per_layer * model.cfg.n_layers * len(prompts),
                         "speedup_fast_vs_captum_extrapolated":
                             per_layer * model.cfg.n_layers * len(prompts) / res["fast_s"],
                         "max_rel_diff_vs_fast": max(diffs)}
        if args.out:
            write_json_atomic(args.out, res)
        print(json.dumps(res["captum"]), file=sys.stderr, flush=True)
    if args.reference_layers:                                          # CPU time, extrapolated to all layers
        some = [int(l) for l in args.reference_layers.split(",")]
        c = time.process_time()
        ref = integrated_gradients(model, prompts, steps=args.steps, method="reference", layers=some)
        cpu = time.process_time() - c
        per_layer = cpu / len(some)
        res["reference_layers"] = some
        res["reference_cpu_s_timed"] = cpu
        res["reference_cpu_s_extrapolated"] = per_layer * model.cfg.n_layers
        res["speedup_cpu_fast_vs_reference_extrapolated"] = per_layer * model.cfg.n_layers / res["fast_cpu_s"]
        res["max_rel_diff_on_reference_layers"] = float(
            (fast.values[:, some] - ref.values).abs().max() / ref.values.abs().max())
        args.skip_reference = True
    if not args.skip_reference:                                        # prompt by prompt, saved as it goes
        res["reference_s_per_prompt"], res["max_rel_diff_per_prompt"] = [], []
        for i, prompt in enumerate(prompts):
            t = time.perf_counter()
            ref = integrated_gradients(model, [prompt], steps=args.steps, method="reference", progress=False)
            res["reference_s_per_prompt"].append(time.perf_counter() - t)
            res["max_rel_diff_per_prompt"].append(
                float((fast.values[i] - ref.values[0]).abs().max() / ref.values[0].abs().max()))
            res["reference_s"] = sum(res["reference_s_per_prompt"])
            done = len(res["reference_s_per_prompt"])
            res["speedup_fast_vs_reference"] = res["reference_s"] / (res["fast_s_per_prompt"] * done)
            res["max_rel_diff_fast_vs_reference"] = max(res["max_rel_diff_per_prompt"])
            res["reference_prompts_done"] = done
            if args.out:
                write_json_atomic(args.out, res)
            print(json.dumps({"reference_prompt": i, "seconds": res["reference_s_per_prompt"][-1],
                              "rel_diff": res["max_rel_diff_per_prompt"][-1]}), file=sys.stderr, flush=True)

    out = json.dumps(res, indent=2)
    print(out)
    if args.out:
        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
