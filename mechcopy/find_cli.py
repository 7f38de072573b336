"""`mechcopy find`: probe -> neuron attribution -> copy scores -> k sweep on dev -> neuron file.

Per-prompt attributions are checkpointed to `<out>.attributions.safetensors` every few prompts, so an
interrupted run started again with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

CHECKPOINT_FORMAT = 1


def _side(out: Path, suffix: str) -> Path:
    stem = out.name[:-5] if out.name.endswith(".json") else out.name
    return out.with_name(stem + suffix)


def _prompts_hash(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.text.encode() + b"\x00" + p.answer.encode() + b"\x01")
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, att, config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {"values": att.values.contiguous(), "target_clean": att.target_clean.contiguous(),
               "target_zero": att.target_zero.contiguous(),
               "copy_tokens": torch.tensor([-1 if c is None else c for c in att.copy_tokens]),
               "gold_tokens": torch.tensor(list(att.gold_tokens))}
    meta = {**config, "method": att.method, "rule": att.rule, "layers": list(att.layers)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"mechcopy": json.dumps(meta, default=str)})
    tmp.replace(path)


def _load_checkpoint(path: Path, config: dict[str, Any]):
    """The attributions saved at `path` if they were made with `config`, else None."""
    from safetensors import safe_open

    from mechcopy.attribution import Attributions

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("mechcopy", "{}"))
        if any(meta.get(k) != v for k, v in config.items()):
            return None
        t = {k: f.get_tensor(k) for k in f.keys()}
    return Attributions(t["values"], t["target_clean"], t["target_zero"], meta["target"], meta["attribution"],
                        meta["method"], meta["steps"], meta["rule"],
                        tuple(None if c < 0 else int(c) for c in t["copy_tokens"].tolist()),
                        tuple(int(g) for g in t["gold_tokens"].tolist()), tuple(meta["layers"]))


def attribute_with_checkpoints(model, prompts: Sequence, checkpoint: Path, config: dict[str, Any],
                               attribution: str = "ig", target: str = "contrast", steps: int = 20,
                               method: str = "fast", rule: str = "gauss-legendre", every: int = 10,
                               progress: bool = True):
    """Attribute `prompts` in chunks, saving after each chunk; resume from a matching checkpoint."""
    from tqdm.auto import tqdm

    from mechcopy.attribution import Attributions, grad_x_act, integrated_gradients

    done = _load_checkpoint(checkpoint, config)
    parts = [done] if done is not None else []
    start = 0 if done is None else done.values.shape[0]
    bar = tqdm(total=len(prompts), initial=start, desc=f"{attribution} attribution", disable=not progress)
    for s in range(start, len(prompts), every):
        chunk = prompts[s:s + every]
        if attribution == "ig":
            part = integrated_gradients(model, chunk, target=target, steps=steps, method=method, rule=rule)
        else:
            part = grad_x_act(model, chunk, target=target, method=method)
        parts.append(part)
        _save_checkpoint(checkpoint, Attributions.cat(parts), config)
        parts = [Attributions.cat(parts)]
        bar.update(len(chunk))
    bar.close()
    return Attributions.cat(parts)


def find(model, out: Path, n: int = 200, n_dev: int = 50, shots: int = 4, steps: int = 20,
         attribution: str = "ig", target: str = "contrast", method: str = "fast",
         rule: str = "gauss-legendre", normalisation: str = "minmax", mode: str = "global",
         ks: Sequence[int] | None = None, max_ppl_increase: float = 0.05, text_file: Path | None = None,
         ppl_tokens: int = 4096, seed: int = 0, every: int = 10, progress: bool = True):
    """The whole pipeline; writes the neuron file, the scores and the attributions; returns the NeuronSet."""
    from mechcopy.attribution import copy_scores
    from mechcopy.pruning import DEFAULT_KS, select, sweep_k
    from mechcopy.sites import model_fingerprint
    from mechcopy.tasks.probe import probe_splits

    if attribution not in ("ig", "gradxact"):
        raise ValueError(f"unknown attribution method {attribution!r}; choose ig or gradxact")
    out = Path(out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    attr_prompts, dev_prompts = probe_splits(model.tokenizer, n_attr=n, n_dev=n_dev, k=shots, seed=seed)
    fp = model_fingerprint(model)
    config = {"format": CHECKPOINT_FORMAT, "model": fp["name"], "weight_hash": fp["weight_hash"],
              "attribution": attribution, "target": target, "steps": steps if attribution == "ig" else 1,
              "prompts": _prompts_hash(attr_prompts), "n": n}
    att = attribute_with_checkpoints(model, attr_prompts, _side(out, ".attributions.safetensors"), config,
                                     attribution, target, steps, method, rule, every, progress)
    times["attribution_s"] = round(time.perf_counter() - t0, 1)

    scores = copy_scores(model, att, normalisation, prompts=attr_prompts, seed=seed, shots=shots)
    scores_path = scores.save(_side(out, ".scores.safetensors"))

    t1 = time.perf_counter()
    text, text_name = None, "pydoc_data.topics"
    if text_file is not None:
        text, text_name = Path(text_file).read_text(), str(text_file)
    sweep = sweep_k(model, scores, dev_prompts, ks or DEFAULT_KS, mode, max_ppl_increase, text, text_name,
                    ppl_tokens, seed, progress)
    times["sweep_s"] = round(time.perf_counter() - t1, 1)
    if sweep.chosen_k is None:
        raise RuntimeError(
            f"no k in {[r['k'] for r in sweep.rows]} keeps the perplexity increase within "
            f"{max_ppl_increase:.0%} (smallest increase {min(r['ppl_increase'] for r in sweep.rows):.1%}); "
            "pass smaller --ks or a larger --max-ppl-increase")
    chosen = select(scores, mode, k=sweep.chosen_k)
    meta = {**chosen.meta, "attribution": attribution, "target": target, "steps": config["steps"],
            "method": att.method, "rule": att.rule, "normalisation": normalisation, "n_attr": n,
            "n_dev": n_dev, "shots": shots, "seed": seed, "scores_path": str(scores_path.resolve()),
            "completeness_error_median": float(att.completeness_error().median()),
            "sweep": sweep.to_json(), "times": times, "layer_counts": chosen.layer_counts(model.cfg.n_layers)}
    neurons = type(chosen)(chosen.neurons, fp, meta)
    neurons.save(out)
    return neurons


def _run(args) -> int:
    from mechcopy import load_model

    t0 = time.perf_counter()
    model = load_model(args.model)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    neurons = find(model, args.out, n=args.n, n_dev=args.n_dev, shots=args.shots, steps=args.steps,
                   attribution=args.method, target=args.target, method=args.path, rule=args.rule,
                   normalisation=args.normalisation, mode=args.mode, ks=ks,
                   max_ppl_increase=args.max_ppl_increase, text_file=args.text, ppl_tokens=args.ppl_tokens,
                   seed=args.seed, every=args.checkpoint_every)
    sw = neurons.meta["sweep"]
    print(f"k sweep on {sw['n_dev']} dev prompts (perplexity bound +{sw['max_ppl_increase']:.0%}):")
    print(f"  k=0: dev accuracy {sw['baseline']['dev_accuracy']:.3f}, copy rate "
          f"{sw['baseline']['dev_copy_rate']:.3f}, ppl {sw['baseline']['ppl']:.2f}")
    for r in sw["rows"]:
        mark = "  <- chosen" if r["k"] == sw["chosen_k"] else ("" if r["feasible"] else "  (ppl bound)")
        print(f"  k={r['k']}: dev accuracy {r['dev_accuracy']:.3f}, copy rate {r['dev_copy_rate']:.3f}, "
              f"ppl {r['ppl']:.2f} ({r['ppl_increase']:+.1%}){mark}")
    counts = {l: c for l, c in enumerate(neurons.meta["layer_counts"]) if c}
    print(f"{len(neurons)} neurons, by layer {counts}")
    print(f"wrote {args.out} (scores: {neurons.meta['scores_path']}) in {time.perf_counter() - t0:.0f} s")
    return 0


def register(sub) -> None:
    from mechcopy.models.zoo import DEFAULT_MODEL

    p = sub.add_parser("find", help="find copy neurons: IG attribution on the probe, k chosen on its dev split")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo model name or model folder (default {DEFAULT_MODEL})")
    p.add_argument("--n", type=int, default=200, help="probe prompts for attribution (default 200)")
    p.add_argument("--n-dev", type=int, default=50, help="probe dev prompts for the k sweep (default 50)")
    p.add_argument("--shots", type=int, default=4, help="demonstrations per probe prompt (default 4)")
    p.add_argument("--steps", type=int, default=20, help="IG integration steps (default 20)")
    p.add_argument("--method", choices=["ig", "gradxact"], default="ig", help="attribution (default ig)")
    p.add_argument("--target", choices=["contrast", "gold_logprob", "copy_prob"], default="contrast")
    p.add_argument("--path", choices=["fast", "reference"], default="fast", help="IG implementation")
    p.add_argument("--rule", choices=["gauss-legendre", "midpoint"], default="gauss-legendre")
    p.add_argument("--normalisation", choices=["minmax", "none", "zscore"], default="minmax")
    p.add_argument("--mode", choices=["global", "per-layer"], default="global", help="top-k selection")
    p.add_argument("--ks", default=None, help="comma-separated k grid (default 5,10,20,50,100,200,500,1000)")
    p.add_argument("--max-ppl-increase", type=float, default=0.05, help="relative bound (default 0.05)")
    p.add_argument("--text", type=Path, default=None, help="held-out text file for perplexity "
                   "(default: the standard library's pydoc_data.topics)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of held-out text (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10, help="prompts between checkpoints")
    p.add_argument("--out", type=Path, required=True, help="neuron file to write (JSON)")
    p.set_defaults(func=_run)
