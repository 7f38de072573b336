"""What a full layer x head map costs, side by side in one run: per-head patching (ours, batched per
layer from the cached residual stream) against `transformer_lens.patching.get_act_patch_attn_head_out_
all_pos` on the same pair and metric, 270 single-head zero ablations done by hand (one full run each),
and direct logit attribution, label attention and IG over heads (m = 20, fast path) per prompt.

    python benchmarks/head_speed.py [--model smollm2-135m] [--threads 1] [--out docs/data/heads_speed.json]

The pair: the first balanced-probe prompt (no gold among its demos) and the same prompt with one demo
label replaced by the gold, patched gold-shown -> no gold (`role_pairs_of(..., "gold_label",
reverse=True)`). Exit status 1 if ours and TransformerLens' maps differ by more than 1e-4. Timings on
a shared machine are not comparable: run alone, under the CPU lock, with `--threads 1`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def timed(fn):
    t0, c0 = time.time(), time.process_time()
    out = fn()
    return out, round(time.time() - t0, 2), round(time.process_time() - c0, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/heads_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformer_lens import patching as tlp

    from mechcopy import load_model
    from mechcopy.head_attribution import direct_logit_attribution, head_integrated_gradients
    from mechcopy.head_patching import patch_heads
    from mechcopy.heads import all_heads, head_hooks
    from mechcopy.io import write_json_atomic
    from mechcopy.label_attention import label_attention
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.patching import NormalisedLogitDiff, role_pairs_of
    from mechcopy.tasks.probe import ProbeConfig, build_probe

    model = load_model(args.model)
    prompts = list(build_probe(model.tokenizer, ProbeConfig(), n_attr=4, n_dev=0, n_test=0, seed=0).attribution)
    pair = next(p for p in role_pairs_of(model, prompts, "gold_label", reverse=True) if p.same_layout)
    clean, corrupt = pair.clean_tokens, pair.corrupt_tokens
    metric = NormalisedLogitDiff.from_runs(model, clean, corrupt, torch.tensor([pair.gold]), torch.tensor([pair.ref]))
    rows = {"tokens": int(clean.shape[1]), "heads": len(all_heads(model))}

    ours, rows["ours_patch_heads_s"], rows["ours_patch_heads_cpu_s"] = timed(
        lambda: patch_heads(model, clean, corrupt, metric, "z"))

    def tl():
        with torch.no_grad():
            _, cache = model.run_with_cache(clean)
            return tlp.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric)

    theirs, rows["tl_head_out_all_pos_s"], rows["tl_head_out_all_pos_cpu_s"] = timed(tl)
    rows["max_abs_diff"] = float((ours - theirs.cpu()).abs().max())

    def ablations():
        with torch.no_grad():
            return [float(model.run_with_hooks(corrupt, fwd_hooks=head_hooks(model, [h]))[0, -1, pair.gold])
                    for h in all_heads(model)]

    _, rows["zero_ablations_by_hand_s"], rows["zero_ablations_by_hand_cpu_s"] = timed(ablations)
    _, rows["dla_per_prompt_s"], _ = timed(lambda: direct_logit_attribution(model, prompts))
    rows["dla_per_prompt_s"] = round(rows["dla_per_prompt_s"] / len(prompts), 2)
    _, rows["label_attention_per_prompt_s"], _ = timed(lambda: label_attention(model, prompts))
    rows["label_attention_per_prompt_s"] = round(rows["label_attention_per_prompt_s"] / len(prompts), 2)
    _, rows["ig_heads_fast_m20_per_prompt_s"], _ = timed(lambda: head_integrated_gradients(model, prompts[:2], steps=20))
    rows["ig_heads_fast_m20_per_prompt_s"] = round(rows["ig_heads_fast_m20_per_prompt_s"] / 2, 2)
    rows["speedup_patch_vs_tl"] = round(rows["tl_head_out_all_pos_s"] / rows["ours_patch_heads_s"], 1)
    out = {"model": model_fingerprint(model), "threads": args.threads, "machine": platform.machine(),
           "cpu_count": __import__("os").cpu_count(), "command": f"python benchmarks/head_speed.py --model {args.model} "
           f"--threads {args.threads}", **rows}
    print(json.dumps(out, indent=1))
    write_json_atomic(args.out, out)
    return 0 if rows["max_abs_diff"] < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
