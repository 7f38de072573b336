"""The Python half of `benchmarks/gpu_check.sh`: IG and evaluation on a CUDA GPU against float32 on the CPU.

    python benchmarks/gpu_check.py run --out PART.json [--cpu-dry-run]
    python benchmarks/gpu_check.py merge --out gpu_check.json --steps STEPS.jsonl PART.json ...

`run`, for SmolLM2 in float32 and in bfloat16 on the GPU:
  * IG (fast path, m = 20) on 2 probe prompts against float32 IG on this machine's CPU: max relative
    difference (per prompt and per layer), rank correlation, completeness;
  * IG throughput (prompts per second) for several `batch_size` values (prompts per batch of rows);
  * predictions on 50 antonym prompts against the CPU's float32 predictions (share equal), and
    evaluation throughput for several batch sizes;
  * peak GPU memory.
`--cpu-dry-run` runs the same code on the CPU with a tiny random model (checks this script, not a GPU).
`merge` joins the parts and the shell's step log into one JSON file. Only the standard library is
imported at module level, so `merge` runs even where the virtual environment could not be built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # (IG agreement prompts, IG throughput prompts, IG batch sizes, eval agreement, eval throughput, eval batch sizes)
    "gpu": (2, 32, (1, 8, 32), 50, 150, (32, 150)),
    "dry": (2, 4, (1, 2), 6, 10, (4, 10)),
}


def _loader(dry: bool):
    """(device, dtype) -> model: SmolLM2 from the zoo, or a tiny random model for the dry run."""
    if dry:
        from mechcopy.models.tiny import tiny_transformer

        return lambda device, dtype: tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0, n_key_value_heads=2,
                                                      device=device, dtype=dtype)
    from mechcopy import load_model

    return lambda device, dtype: load_model("smollm2-135m", device=device, dtype=dtype)


def _timed(fn, device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _ig_agreement(att, ref) -> dict:
    from mechcopy.attribution import rank_correlation

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return {"max_rel_diff": max(rel(a, b) for a, b in zip(att.values, ref.values)),
            "max_rel_diff_per_layer": max(rel(a, b) for x, r in zip(att.values, ref.values) for a, b in zip(x, r)),
            "rank_correlation": [rank_correlation(a, b) for a, b in zip(att.values, ref.values)],
            "completeness_error": {"median": float(att.completeness_error().median()),
                                   "max": float(att.completeness_error().max())},
            "target_clean_max_abs_diff": float((att.target_clean - ref.target_clean).abs().max()),
            "values_dtype": str(att.values.dtype)}


def run(args) -> dict:
    import torch

    from mechcopy.attribution import integrated_gradients
    from mechcopy.evaluation import predict
    from mechcopy.tasks import load_task
    from mechcopy.tasks.probe import probe_splits
    from mechcopy.tasks.prompts import build_prompts

    n_ig, n_ig_speed, ig_batches, n_eval, n_eval_speed, eval_batches = SIZES["dry" if args.cpu_dry_run else "gpu"]
    device = "cpu" if args.cpu_dry_run else "cuda"
    load = _loader(args.cpu_dry_run)
    torch.set_num_threads(1 if args.cpu_dry_run else min(8, os.cpu_count() or 1))
    out: dict = {"device": device, "cpu_dry_run": args.cpu_dry_run, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                 "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "steps": args.steps}
    if device == "cuda":
        if not torch.cuda.is_available():
            out["error"] = "torch sees no CUDA device"
            return out
        out["gpu"] = torch.cuda.get_device_name(0)

    cpu = load("cpu", torch.float32)
    probe, _ = probe_splits(cpu.tokenizer, n_attr=n_ig_speed, n_dev=1, shots=4, seed=0)
    antonyms = build_prompts(load_task("antonyms"), cpu.tokenizer, shots=4, n=n_eval_speed, seed=0).prompts
    out["model"] = cpu.cfg.model_name
    ref_ig, t_ig = _timed(lambda: integrated_gradients(cpu, probe[:n_ig], steps=args.steps), "cpu")
    ref_pred, t_pred = _timed(lambda: predict(cpu, antonyms[:n_eval]), "cpu")
    out["cpu_float32_reference"] = {"ig_prompts": n_ig, "ig_s_per_prompt": t_ig / n_ig, "eval_prompts": n_eval,
                                    "eval_s_per_prompt": t_pred / n_eval}
    del cpu
    for name in ("float32", "bfloat16"):
        model = load(device, getattr(torch, name))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        part: dict = {}
        part["ig_vs_cpu_float32"] = _ig_agreement(
            integrated_gradients(model, probe[:n_ig], steps=args.steps, batch_size=n_ig), ref_ig)
        integrated_gradients(model, probe[:1], steps=2)                               # warm-up
        part["ig_prompts_per_s"] = {}
        for b in ig_batches:
            _, t = _timed(lambda: integrated_gradients(model, probe, steps=args.steps, batch_size=b), device)
            part["ig_prompts_per_s"][str(b)] = len(probe) / t
        preds = predict(model, antonyms[:n_eval])
        part["predictions_equal_to_cpu_float32"] = sum(a == b for a, b in zip(preds, ref_pred)) / n_eval
        part["eval_prompts_per_s"] = {}
        for b in eval_batches:
            _, t = _timed(lambda: predict(model, antonyms, batch_size=b), device)
            part["eval_prompts_per_s"][str(b)] = len(antonyms) / t
        if device == "cuda":
            part["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[name] = part
        del model
    out["sizes"] = {"ig_agreement_prompts": n_ig, "ig_throughput_prompts": len(probe),
                    "eval_agreement_prompts": n_eval, "eval_throughput_prompts": len(antonyms)}
    return out


def merge(args) -> dict:
    """The step log and every part, under their file names; `ok` when every step and part says so."""
    steps = [json.loads(line) for line in Path(args.steps).read_text().splitlines() if line.strip()] \
        if args.steps and Path(args.steps).exists() else []
    out: dict = {"check": "benchmarks/gpu_check.sh", "steps": steps, "parts": {}}
    for path in map(Path, args.parts):
        out["parts"][path.stem] = json.loads(path.read_text()) if path.exists() else {"error": "not written"}
    out["ok"] = all(s.get("ok") for s in steps) and all(
        "error" not in p and p.get("ok", True) for p in out["parts"].values())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=20, help="IG steps")
    r.add_argument("--cpu-dry-run", action="store_true", help="CPU and a tiny model: checks this script only")
    m = sub.add_parser("merge")
    m.add_argument("--out", required=True)
    m.add_argument("--steps", default=None, help="the shell's step log (JSON lines)")
    m.add_argument("parts", nargs="*")
    args = p.parse_args(argv)
    t = time.perf_counter()
    res = run(args) if args.command == "run" else merge(args)
    res["seconds"] = round(time.perf_counter() - t, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(f".{os.getpid()}.tmp")          # the shell may merge from two processes
    tmp.write_text(json.dumps(res, indent=2, default=str))
    tmp.replace(args.out)
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
