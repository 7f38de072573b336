"""`mechcopy patch`: activation patching, clean into corrupted ICL prompts (layers x positions), or per
attention head (`--per-head`: layers x heads, all aligned positions at once or role by role)."""

from __future__ import annotations

import time
from pathlib import Path

from mechcopy.commands.common import (add_model_args, add_out_args, at_least, files_in, load_neurons, model_path,
                                      open_model, prepare_out, write_result)
from mechcopy.head_patching import ACTIVATIONS, task_head_patching
from mechcopy.patching import activation_patching
from mechcopy.tasks import check_shots, list_tasks, load_task
from mechcopy.tasks.pairs import CORRUPTIONS


def run(args) -> int:
    t0 = time.time()
    task = load_task(args.task)
    if args.other_task and args.corruption != "other_task":
        raise ValueError(f"--other-task is used only with --corruption other_task (got --corruption {args.corruption})")
    if args.corruption == "shuffled_labels" and args.shots < 2:
        raise ValueError("--corruption shuffled_labels permutes the demo labels: it needs --shots >= 2, "
                         f"got {args.shots}")
    other = None
    if args.corruption == "other_task":
        other = load_task(args.other_task or next(t for t in list_tasks() if t != task.name))
        if other.name == task.name or set(other.pairs) == set(task.pairs):
            raise ValueError(f"--other-task {args.other_task or other.name} is the --task {args.task} itself: its "
                             "demos would not corrupt anything; name another task")
    check_shots([t for t in (task, other) if t is not None], args.shots, "--shots")
    if args.per_head and (args.neurons or args.method != "own"):
        raise ValueError("--per-head patches every head with its own loop: it takes neither --neurons nor --method tl")
    if not args.per_head and (args.activation != "z" or args.by_role):
        raise ValueError("--activation and --by-role choose what --per-head patches: add --per-head")
    neurons, read = load_neurons("--neurons", args.neurons)
    out = prepare_out(args.out, {"--task": files_in(args.task), "--other-task": files_in(args.other_task), **read,
                                 "--model": model_path(args.model)}, args.force)
    assert out is not None      # --out is required
    model = open_model(args)
    if args.per_head:
        return _per_head(args, model, task, other, out, t0)
    if neurons is not None:
        neurons.check(model)
        if not neurons.pairs:
            print(f"{args.neurons} holds no neurons ({neurons.why_empty}): no neuron patching")
    res = activation_patching(model, task, args.corruption, n=args.n, shots=args.shots, seed=args.seed,
                              other_task=other, neurons=neurons, method=args.method, progress=True)
    arr = res.array()
    print(f"{res.task} / {res.corruption}: {res.n_pairs} pairs ({res.n_dropped} dropped), "
          f"LD clean {res.ld_clean:.3f}, corrupted {res.ld_corrupt:.3f}")
    for ci, comp in enumerate(res.components):
        l, p = divmod(int(arr[ci].argmax()), arr.shape[2])
        print(f"  {comp:9s} max {float(arr[ci].max()):.3f} at layer {l}, position {p} ({res.roles[p]})")
    if res.neurons:
        print(f"  neurons ({res.neurons}) all positions: {res.neuron_all_positions:.3f}")
    print(f"-> {write_result(out, model, {'command': 'patch', 'seconds': round(time.time() - t0, 1), **res.to_json()})}")
    return 0


def _per_head(args, model, task, other, out, t0: float) -> int:
    res = task_head_patching(model, task, args.corruption, n=args.n, shots=args.shots, seed=args.seed,
                             other_task=other, activation=args.activation, by_role=args.by_role, progress=True)
    arr = res.array()                                                     # [layer, column, head]
    print(f"{res.task} / {res.corruption}, per head ({res.activation}): {res.n_pairs} pairs ({res.n_dropped} dropped), "
          f"LD clean {sum(res.ld_clean) / len(res.ld_clean):.3f}, corrupted {sum(res.ld_corrupt) / len(res.ld_corrupt):.3f}")
    if res.warning:
        print(f"  warning: {res.warning}")
    for ci, col in enumerate(res.columns):
        flat = arr[:, ci].flatten()
        top = flat.abs().argsort(descending=True)[:5]
        heads = ", ".join(f"L{int(i) // arr.shape[2]}H{int(i) % arr.shape[2]} {float(flat[i]):+.3f}" for i in top)
        print(f"  {col}: largest |normalised| {heads}")
    print(f"-> {write_result(out, model, {'command': 'patch --per-head', 'seconds': round(time.time() - t0, 1), **res.to_json()})}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("patch", help="activation patching, clean into corrupted ICL prompts (layers x positions)")
    add_model_args(p)
    p.add_argument("--task", required=True, help="built-in task name or task JSON file")
    p.add_argument("--corruption", choices=CORRUPTIONS, default="shuffled_labels")
    p.add_argument("--other-task", help="for --corruption other_task (default: the first other built-in task)")
    p.add_argument("--n", type=at_least(1), default=10, help="prompt pairs averaged (default 10)")
    p.add_argument("--shots", type=at_least(1), default=4, help="demonstrations per prompt (default 4)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--neurons", type=Path, help="neurons.json: also patch this neuron set")
    p.add_argument("--method", choices=["own", "tl"], default="own",
                   help="own loop (any model) or transformer_lens.patching (HookedTransformer)")
    p.add_argument("--per-head", action="store_true",
                   help="patch every attention head (layers x heads; transformers only), on pairs of any lengths "
                        "aligned by role")
    p.add_argument("--activation", choices=ACTIVATIONS, default="z",
                   help="with --per-head: what is patched (k and v per query head on grouped-query models)")
    p.add_argument("--by-role", action="store_true",
                   help="with --per-head: one role at a time (the demo labels, the query, ...) instead of every "
                        "aligned position at once")
    add_out_args(p, "results JSON", required=True)
    p.set_defaults(run=run)
