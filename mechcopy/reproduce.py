"""`mechcopy reproduce`: the main job, from model to report.

probe -> attribution -> selection (k sweep on the probe's dev split) -> evaluation of every task
with baselines -> task vectors -> activation patching -> one offline HTML report.

Every stage writes its result to OUT/<stage>.json (atomically). A stage whose result exists is
skipped, so an interrupted run resumes where it stopped (and `find` itself resumes per prompt).
Settings live in a frozen `ReproduceConfig`; changing them needs a fresh OUT folder.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mechcopy.sites import NeuronSet, is_mamba, model_fingerprint, write_json_atomic

# tasks with enough single-token answers on SmolLM2 and Gemma (task vectors score single tokens)
TV_TASKS = ("person_language", "to_lower", "next_letter", "present_past", "antonyms", "fr_en")


@dataclass(frozen=True)
class ReproduceConfig:
    """Every setting of the main job (defaults sized for ~15 minutes on 2 CPU cores)."""

    model: str = "smollm2-135m"
    n_probe: int = 40            # attribution prompts of the probe (fast IG: ~6 s CPU each on SmolLM2)
    n_dev: int = 50              # dev prompts of the probe (the k sweep)
    steps: int = 20              # IG steps
    method: str = "ig"           # ig | gradxact
    target: str = "contrast"
    tasks: str = "all"
    shots: int = 4
    n_eval: int = 20             # prompts per task in the evaluation (`mechcopy evaluate` for more)
    n_random: int = 2            # random-neuron baselines
    tv_tasks: tuple[str, ...] = TV_TASKS
    n_tv: int = 30               # zero-shot test prompts per task for task vectors
    n_tv_dev: int = 15           # zero-shot dev prompts per task (choose the layer)
    tv_layer_step: int = 2       # task vectors after every 2nd layer (and the last)
    patch_task: str = "antonyms"
    patch_corruption: str = "shuffled_labels"
    patch_shots: int = 3
    n_patch: int = 4
    seed: int = 0


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ stages


def stage_find(model, cfg: ReproduceConfig, out: Path) -> dict:
    """Copy neurons: IG on the probe's attribution split, k chosen on its dev split."""
    from mechcopy.find_cli import find

    neurons = find(model, out / "neurons.json", n=cfg.n_probe, n_dev=cfg.n_dev, shots=cfg.shots,
                   steps=cfg.steps, attribution=cfg.method, target=cfg.target, seed=cfg.seed)
    return {"neurons_path": str(out / "neurons.json"), "n_neurons": len(neurons),
            "layer_counts": neurons.layer_counts(model.cfg.n_layers)}


def stage_evaluate(model, cfg: ReproduceConfig, out: Path) -> dict:
    """Every task: unpruned, pruned, random-matched baselines and the bottom-score set."""
    from mechcopy.evaluate_cli import run_evaluation
    from mechcopy.pruning import conditions
    from mechcopy.tasks import load_tasks

    neurons = NeuronSet.load(out / "neurons.json")
    conds = [("unpruned", [])] + conditions(model, neurons, cfg.n_random, cfg.seed)
    rows, dropped = run_evaluation(model, load_tasks(cfg.tasks), cfg.shots, cfg.n_eval, cfg.seed, conds)
    return {"results": rows, "dropped": dropped}


def stage_task_vectors(model, cfg: ReproduceConfig, out: Path) -> dict:
    """Task vectors per layer, unpruned vs pruned (pruning active in extraction and injection)."""
    from mechcopy.task_vectors import TaskVectorConfig, run_task_vectors
    from mechcopy.tasks import load_task

    neurons = NeuronSet.load(out / "neurons.json")
    n = model.cfg.n_layers
    layers = tuple(sorted(set(range(0, n, cfg.tv_layer_step)) | {n - 1}))
    tv_cfg = TaskVectorConfig(shots=cfg.shots, n_dev=cfg.n_tv_dev, n_test=cfg.n_tv, seed=cfg.seed, layers=layers)
    results = run_task_vectors(model, [load_task(t) for t in cfg.tv_tasks], tv_cfg, neurons)
    return {"results": [r.to_json() for r in results]}


def stage_patching(model, cfg: ReproduceConfig, out: Path) -> dict:
    """Clean-into-corrupted patching of the residual stream on one task, and of the copy neurons."""
    from mechcopy.patching import activation_patching
    from mechcopy.tasks import load_task

    neurons = NeuronSet.load(out / "neurons.json")
    res = activation_patching(model, load_task(cfg.patch_task), cfg.patch_corruption, n=cfg.n_patch,
                              shots=cfg.patch_shots, seed=cfg.seed, neurons=neurons, comps=["resid_pre"],
                              progress=True)
    return res.to_json()


def _stage_result(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())["result"]


def _copy_error_prompt(model, cfg: ReproduceConfig):
    """A dev probe prompt on which the unpruned model copies a demo label (else the first one)."""
    from mechcopy.evaluation import predict
    from mechcopy.tasks.probe import probe_splits

    _, dev = probe_splits(model.tokenizer, n_attr=cfg.n_probe, n_dev=cfg.n_dev, k=cfg.shots, seed=cfg.seed)
    preds = predict(model, dev[:16])
    for prompt, pred in zip(dev, preds):
        if pred != prompt.answer and pred in prompt.demo_labels:
            return prompt, pred
    return dev[0], preds[0]


def stage_report(model, cfg: ReproduceConfig, out: Path) -> dict:
    """Figures (PNG too) and circuitsvis views, assembled into OUT/report.html."""
    import pandas as pd

    from mechcopy import viz
    from mechcopy.report import Section, write_report

    fig_dir = out / "figures"
    neurons = NeuronSet.load(out / "neurons.json")
    evaluation = _stage_result(out, "evaluate")["results"]
    tv = _stage_result(out, "task_vectors")["results"]
    patch = _stage_result(out, "patching")
    sections = []

    # 1. the headline: per-task bars and the mean over tasks per condition family
    df = viz.task_results_df(evaluation)
    df["family"] = df["condition"].map(viz.condition_family)
    means = df.groupby("family")[["accuracy", "copy_rate"]].mean().round(3).reset_index()
    bars = viz.save_figure(viz.plot_task_bars(df), fig_dir / "tasks.png")
    unp = means.set_index("family")
    text = (f"{len(neurons)} copy neurons pruned on {model.cfg.model_name}; {df['task'].nunique()} tasks, "
            f"{cfg.n_eval} prompts each (fewer where the data or tokenisation allow fewer), {cfg.shots} shots. "
            f"Mean over tasks: accuracy {unp.loc['unpruned', 'accuracy']:.3f} unpruned vs "
            f"{unp.loc['pruned', 'accuracy']:.3f} pruned vs {unp.loc['random', 'accuracy']:.3f} random; "
            f"copy rate {unp.loc['unpruned', 'copy_rate']:.3f} vs {unp.loc['pruned', 'copy_rate']:.3f} vs "
            f"{unp.loc['random', 'copy_rate']:.3f}. Random = mean over {cfg.n_random} random neuron sets of the "
            "same size per layer; bottom = the lowest-scoring neurons.")
    table = df.pivot_table(index="task", columns="family", values=["accuracy", "copy_rate"]).round(3)
    table.columns = [f"{m} {c}" for m, c in table.columns]
    sections.append(Section("Accuracy and copy rate per task, before and after pruning", text, [bars],
                            table=table.reset_index()))

    # 2. selection: the k sweep and where the neurons are
    sweep = neurons.meta.get("sweep", {})
    figs = []
    if sweep.get("rows"):
        sdf = pd.DataFrame([sweep["baseline"], *sweep["rows"]])
        figs.append(viz.save_figure(viz.plot_k_sweep(sdf, sweep.get("chosen_k")), fig_dir / "k_sweep.png"))
    counts = neurons.layer_counts(model.cfg.n_layers)
    figs.append(viz.save_figure(viz.plot_layer_distribution(counts), fig_dir / "layers.png"))
    sections.append(Section(
        "Selecting the copy neurons",
        f"Integrated Gradients ({cfg.steps} steps, target `{cfg.target}`) on {cfg.n_probe} probe prompts; "
        f"k chosen on {cfg.n_dev} dev prompts of the probe, never on the evaluation tasks "
        f"(chosen k = {sweep.get('chosen_k')}, perplexity bound {sweep.get('max_ppl_increase')}).", figs))

    # 3. task vectors
    rows = [{"layer": layer, "task": r["task"], "condition": r["condition"], "accuracy": acc}
            for r in tv for layer, acc in zip(r["layers"], r["dev_accuracy"])]
    tv_fig = viz.save_figure(viz.plot_tv_by_layer(pd.DataFrame(rows)), fig_dir / "task_vectors.png")
    tv_table = pd.DataFrame([{k: r[k] for k in ("task", "condition", "best_layer", "test_accuracy",
                                                 "zero_shot_accuracy", "icl_accuracy", "copy_rate")} for r in tv])
    sections.append(Section("Task vectors by layer, unpruned vs pruned",
                            "Dev accuracy by injection layer; the table gives test accuracy at the best dev "
                            "layer beside zero-shot and ICL accuracy.", [tv_fig], table=tv_table.round(3)))

    # 4. patching heatmap (residual stream)
    comp = patch["components"].index("resid_pre") if "resid_pre" in patch["components"] else 0
    heat = viz.plot_patching_heatmap(patch["values"][comp], patch["tokens"][: len(patch["values"][comp][0])],
                                     f"{patch['task']} / {patch['corruption']}: {patch['components'][comp]}")
    heat_png = viz.save_figure(heat, fig_dir / "patching.png")
    sections.append(Section("Activation patching",
                            f"Normalised logit difference when patching clean into corrupted "
                            f"({patch['corruption']}), averaged over {patch['n_pairs']} prompt pairs. "
                            f"Copy neurons patched at all positions: {patch.get('neuron_all_positions')}.",
                            [heat_png]))

    # 5. circuitsvis on a copy-error prompt
    prompt, pred = _copy_error_prompt(model, cfg)
    layer = max(range(len(counts)), key=counts.__getitem__)
    views = [viz.neuron_activations_view(model, prompt.text, neurons, max_neurons=50)]
    if not is_mamba(model):  # Mamba has no attention to show
        views.insert(0, viz.attention_view(model, prompt.text, layer))
    sections.append(Section("A copy error up close",
                            f"Gold answer {prompt.answer!r}, demo labels {list(prompt.demo_labels)}, model says "
                            f"{pred!r}. Attention of layer {layer} (the layer with the most copy neurons) and "
                            "the copy neurons' activations over the prompt's tokens.", html=views))

    meta = json.loads((out / "settings.json").read_text())
    path = write_report(out / "report.html", f"mechcopy: copy neurons of {model.cfg.model_name}", sections, meta)
    return {"report": str(path), "figures": sorted(str(p) for p in fig_dir.glob("*.png")),
            "mean_over_tasks": means.to_dict("records")}


STAGES = [
    ("find", stage_find),
    ("evaluate", stage_evaluate),
    ("task_vectors", stage_task_vectors),
    ("patching", stage_patching),
    ("report", stage_report),
]


def reproduce(cfg: ReproduceConfig, out: str | Path) -> Path:
    """Run every stage not already done in `out`; return the report's path."""
    import torch

    from mechcopy.models import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.exists():
        before = json.loads(settings_path.read_text())["config"]
        if before != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"{out} holds a run with other settings ({settings_path}); "
                             "use a fresh --out folder, or delete it to start over")
    model = load_model(cfg.model)
    torch.set_grad_enabled(True)
    write_json_atomic(settings_path, {"config": asdict(cfg), "model": model_fingerprint(model),
                                      "git_revision": git_revision()})
    for name, stage in STAGES:
        path = out / f"{name}.json"
        if path.exists():
            print(f"[{name}] done already ({path.name}); skipping")
            continue
        print(f"[{name}] running ...", flush=True)
        t0 = time.time()
        result = stage(model, cfg, out)
        seconds = round(time.time() - t0, 1)
        write_json_atomic(path, {"stage": name, "seconds": seconds, "result": result})
        print(f"[{name}] {seconds} s -> {path.name}", flush=True)
    report = out / "report.html"
    print(f"\nreport: {report}")
    return report


def _run(args) -> int:
    cfg = ReproduceConfig(model=args.model, n_probe=args.n_probe, n_eval=args.n_eval, n_random=args.n_random,
                          steps=args.steps, seed=args.seed)
    reproduce(cfg, args.out or f"results/{args.model}")
    return 0


def register(sub) -> None:
    d = ReproduceConfig()
    p = sub.add_parser("reproduce", help="the main job: copy neurons -> pruning -> evaluation -> task vectors "
                                         "-> patching -> HTML report (resumes if interrupted)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--out", default=None, help="output folder (default results/MODEL)")
    p.add_argument("--n-probe", type=int, default=d.n_probe, help="probe prompts for attribution")
    p.add_argument("--n-eval", type=int, default=d.n_eval, help="prompts per task in the evaluation")
    p.add_argument("--n-random", type=int, default=d.n_random, help="random-neuron baseline seeds")
    p.add_argument("--steps", type=int, default=d.steps, help="Integrated Gradients steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_run)
