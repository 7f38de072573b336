"""ICL accuracy, copy-error rates with bootstrap intervals, and perplexity, under any forward hooks.

Prompts of any lengths share a batch, left-padded with an attention mask; the architecture's decoder
keeps the padding out of every real position (transformers: masked attention, rotary positions
counted from each row's first token; Mamba: padding leaves the recurrent state empty), so the answers
equal unpadded runs. `predict(..., pad=False)` keeps the reference path where only prompts of equal
token length share a batch. Every forward pass runs inside `model.hooks(fwd_hooks=...)`, so pruning
and other interventions compose with the evaluator. Pruning conditions given as neuron sets run in one
pass (`evaluate_conditions`): each batch shares the blocks before the first pruned layer, then forks
into one row group per condition, pruned by one hook per neuron site. Single-token answers are scored
by the argmax of the next token; multi-token answers by greedy generation up to the separator. A copy
error is a wrong prediction equal to one of the demo labels.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechcopy.arch import Decoder, HookedModel, arch_of
from mechcopy.neurons import NeuronSet
from mechcopy.stats import bootstrap_ci, rate_interval
from mechcopy.tasks.prompts import SEPARATOR, ICLPrompt, PromptSet


@dataclass(frozen=True)
class TaskResult:
    """Accuracy and error breakdown of one task under one condition (rates are shares of all n), and
    each prompt's outcome in prompt order (`correct`, `copy`: what paired comparisons need)."""

    task: str
    condition: str
    n: int
    accuracy: float
    copy_rate: float
    copy_share_of_errors: float
    other_rate: float
    accuracy_ci: tuple[float, float]
    copy_rate_ci: tuple[float, float]
    predictions: tuple[str, ...]
    correct: tuple[bool, ...]
    copy: tuple[bool, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("accuracy_ci", "copy_rate_ci", "predictions", "correct", "copy"):
            d[key] = list(d[key])
        return d


#: the most padding a batch may hold, as a share of its tokens (more batches cost less than padding)
MAX_PADDING = 0.1


def _as_list(prompts) -> list[ICLPrompt]:
    return list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)


def _steps(p: ICLPrompt) -> int:
    """1 (next-token argmax) when the answer and every demo label are one token, else the
    generation budget: the longest of them + 2 tokens."""
    longest = max([len(p.answer_ids), *map(len, p.demo_label_ids)])
    return 1 if longest == 1 else longest + 2


def prompt_tokens(model: HookedModel, prompt: ICLPrompt, index: int = 0) -> Int[Tensor, "1 pos"]:
    """The prompt's tokens, refused when they and the tokens to generate exceed the model's context."""
    return arch_of(model).tokens(model, prompt.text, extra=_steps(prompt) - 1,
                                 what=f"prompt {index} of task {prompt.task!r}")


def check_context(model: HookedModel, prompts: Sequence[ICLPrompt]) -> None:
    """Refuse, before any work, a prompt that does not fit the model's context (`prompt_tokens`)."""
    for i, p in enumerate(_as_list(prompts)):
        prompt_tokens(model, p, i)


def _tokens(model: HookedModel, prompts: Sequence[ICLPrompt]) -> list[Int[Tensor, "pos"]]:
    """Each prompt's tokens, checked against the context length with its generation budget."""
    return [prompt_tokens(model, p, i)[0] for i, p in enumerate(prompts)]


def token_batches(ids: Sequence[Tensor], budgets: Sequence[int], size: int, pad: bool) -> list[list[int]]:
    """Prompt indices per batch of at most `size`, shortest first: single-token and generated answers
    apart; with `pad` a batch ends before padding would exceed MAX_PADDING of its tokens, without
    it only prompts of equal length share one."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        groups[(budgets[i] == 1, pad or len(ids[i]))].append(i)
    out = []
    for items in groups.values():
        batch, total = [], 0
        for i in items:
            width = len(ids[i]) * (len(batch) + 1)    # the padded size if prompt i (the longest) joins
            if batch and (len(batch) == size or width - total - len(ids[i]) > MAX_PADDING * width):
                out.append(batch)
                batch, total = [], 0
            batch.append(i)
            total += len(ids[i])
        out.append(batch)
    return out


def left_pad(ids: Sequence[Int[Tensor, "pos"]], pad_id: int = 0
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack token rows of any lengths, padded on the left with `pad_id`; and the mask (1 = token)."""
    width = max(len(t) for t in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long, device=ids[0].device)
    mask = torch.zeros_like(tokens)
    for r, t in enumerate(ids):
        tokens[r, width - len(t):], mask[r, width - len(t):] = t, 1
    return tokens, mask


def _greedy(decode: Decoder, tokens: Tensor, mask: Tensor, budgets: Sequence[int], tok, sep: str) -> list[str]:
    """Each row's answer: the next token's argmax if its budget is 1, else greedy generation that
    stops per row at `sep`, EOS or the row's budget (the decoder runs until every row stopped)."""
    eos = getattr(tok, "eos_token_id", None)
    generated: list[list[int]] = [[] for _ in budgets]
    done = [False] * len(budgets)
    logits = decode(tokens, mask)
    while True:
        nxt = logits.argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if t == eos and budgets[r] > 1:
                done[r] = True
                continue
            generated[r].append(t)
            if len(generated[r]) >= budgets[r] or sep in tok.decode(generated[r]):
                done[r] = True
        if all(done):
            return [tok.decode(g).split(sep)[0].strip() for g in generated]
        logits = decode(nxt[:, None])


def _predict(model: HookedModel, prompts: Sequence[ICLPrompt], fwd_hooks, batch_size: int, groups: int,
             fork_at: int, sep: str, progress: bool, pad: bool) -> list[list[str]]:
    """Answers per row group (`Arch.decoder`'s fork) under `fwd_hooks`; `batch_size` rows per pass."""
    from mechcopy.progress import tqdm

    prompts = _as_list(prompts)
    arch, tok = arch_of(model), model.tokenizer
    ids, budgets = _tokens(model, prompts), [_steps(p) for p in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[list[str]] = [[""] * len(prompts) for _ in range(groups)]
    batches = token_batches(ids, budgets, max(1, batch_size // groups), pad)
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in tqdm(batches, desc="predict", disable=not progress, leave=False):
            tokens, mask = left_pad([ids[i] for i in batch], pad_id)
            answers = _greedy(arch.decoder(model, groups, fork_at), tokens, mask,
                              [budgets[i] for i in batch] * groups, tok, sep)
            for r, answer in enumerate(answers):
                out[r // len(batch)][batch[r % len(batch)]] = answer
    return out


def predict(model: HookedModel, prompts: Sequence[ICLPrompt], fwd_hooks=(), batch_size: int = 32,
            sep: str = SEPARATOR, progress: bool = False, pad: bool = True) -> list[str]:
    """The model's answer to each prompt (decoded text, stripped), under `fwd_hooks`.

    Prompts whose answer and demo labels are all one token: argmax of the next token. Otherwise greedy
    generation until the generated text contains `sep`, the EOS token, or max(answer, demo label
    lengths) + 2 tokens, continuing the architecture's decoder (a key/value cache on transformers, the
    recurrent state on Mamba). With `pad` (default) prompts of any lengths share a batch, left-padded;
    `pad=False` batches only prompts of equal length (the reference). Hooks run on every pass: a hook
    that acts on one position sees the prompt on the first pass and one new token on each later pass;
    with `pad` it sees the padding too, so it must index positions from the end (e.g. -1), not the start.
    """
    return _predict(model, prompts, fwd_hooks, batch_size, 1, 0, sep, progress, pad)[0]


def predict_conditions(model: HookedModel, prompts: Sequence[ICLPrompt], conditions: Mapping[str, NeuronSet | None],
                       batch_size: int = 128, sep: str = SEPARATOR, progress: bool = False) -> dict[str, list[str]]:
    """`predict` under every condition (a neuron set to prune, None: unpruned) in one pass.

    Each batch runs once through the blocks before the first pruned layer, then forks into one row
    group per condition, each pruned by its own zero mask (`pruning.grouped_pruning_hooks`); answers
    equal separate `predict` runs with `pruning_hooks`. `batch_size` counts forked rows (prompts x
    conditions), so memory stays bounded however many conditions there are.
    """
    from mechcopy.pruning import grouped_pruning_hooks

    if not conditions:
        raise ValueError("no conditions to evaluate: pass e.g. {'unpruned': None}")
    fork_at, hooks = grouped_pruning_hooks(model, list(conditions.values()))
    answers = _predict(model, prompts, hooks, batch_size, len(conditions), fork_at, sep, progress, True)
    return dict(zip(conditions, answers))


def copy_error(prediction: str, answer: str, labels) -> bool:
    """The copy-error rule: a wrong prediction equal to one of `labels` (all compared after strip())."""
    pred = prediction.strip()
    return pred != answer.strip() and pred in {label.strip() for label in labels}


def classify(prompts: Sequence[ICLPrompt], predictions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean arrays (correct, copy): correct = prediction equals the answer (stripped); copy =
    `copy_error` against the prompt's demo labels."""
    if len(predictions) != len(prompts):
        raise ValueError(f"{len(predictions)} predictions for {len(prompts)} prompts; they must pair up one to one")
    correct = np.array([pred.strip() == p.answer.strip() for p, pred in zip(prompts, predictions)], dtype=bool)
    copy = np.array([copy_error(pred, p.answer, p.demo_labels) for p, pred in zip(prompts, predictions)], dtype=bool)
    return correct, copy


def summarize(prompts: Sequence[ICLPrompt], predictions: Sequence[str], condition: str = "unpruned",
              seed: int = 0, n_boot: int = 1000) -> TaskResult:
    """Score predictions against prompts (no model needed): rates and 95% bootstrap intervals (exact
    Clopper-Pearson intervals where every prompt has the same outcome and the bootstrap degenerates)."""
    prompts = _as_list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate (did every pair get dropped? see PromptSet.dropped)")
    correct, copy = classify(prompts, predictions)
    n, n_err = len(prompts), int((~correct).sum())
    ci = bootstrap_ci(np.stack([correct, copy], axis=1), n_boot=n_boot, seed=seed)
    for j, outcome in enumerate((correct, copy)):
        if outcome.all() or not outcome.any():  # every resample equal: the bootstrap says [p, p]
            ci[j] = rate_interval(int(outcome.sum()), n)
    tasks = sorted({p.task for p in prompts})
    return TaskResult(
        task=tasks[0] if len(tasks) == 1 else ",".join(tasks), condition=condition, n=n,
        accuracy=float(correct.mean()), copy_rate=float(copy.mean()),
        copy_share_of_errors=float(copy.sum() / n_err) if n_err else 0.0,
        other_rate=float((~correct & ~copy).mean()),
        accuracy_ci=(float(ci[0, 0]), float(ci[0, 1])), copy_rate_ci=(float(ci[1, 0]), float(ci[1, 1])),
        predictions=tuple(predictions), correct=tuple(map(bool, correct)), copy=tuple(map(bool, copy)),
    )


def evaluate(model: HookedModel, prompts: Sequence[ICLPrompt], fwd_hooks=(), condition: str = "unpruned", seed: int = 0,
             n_boot: int = 1000, batch_size: int = 32, progress: bool = False) -> TaskResult:
    """Predict every prompt under `fwd_hooks` and score it (accuracy, copy rate, 95% bootstrap CIs)."""
    prompts = _as_list(prompts)
    preds = predict(model, prompts, fwd_hooks=fwd_hooks, batch_size=batch_size, progress=progress)
    return summarize(prompts, preds, condition=condition, seed=seed, n_boot=n_boot)


def evaluate_conditions(model: HookedModel, prompts: Sequence[ICLPrompt], conditions: Mapping[str, NeuronSet | None],
                        seed: int = 0, n_boot: int = 1000, batch_size: int = 128,
                        progress: bool = False) -> dict[str, TaskResult]:
    """`evaluate` under every condition (name -> neuron set to prune, None: unpruned), in one pass
    (`predict_conditions`): {name: TaskResult}."""
    prompts = _as_list(prompts)
    preds = predict_conditions(model, prompts, conditions, batch_size=batch_size, progress=progress)
    return {name: summarize(prompts, p, condition=name, seed=seed, n_boot=n_boot) for name, p in preds.items()}


def default_text() -> str:
    """Held-out English text available offline everywhere: the standard library's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def perplexity(model: HookedModel, text: str | None = None, fwd_hooks=(), n_tokens: int = 4096, window: int = 256,
               batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the first `n_tokens` tokens of `text`, in non-overlapping windows.

    Each window is fed as BOS + window tokens (when the tokenizer has a BOS) and every window token is
    predicted; without a BOS the first token of each window is context only. Windows are cut to the
    model's context.
    """
    limit = arch_of(model).context_limit(model)
    window = min(window, limit - 1) if limit else window
    tok = model.tokenizer
    text = default_text() if text is None else text
    ids = list(tok(text[: max(n_tokens * 12, 1000)], add_special_tokens=False)["input_ids"])
    if len(ids) < n_tokens:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    ids = ids[:n_tokens]
    bos = getattr(tok, "bos_token_id", None)
    windows = [([bos] if bos is not None else []) + ids[s:s + window] for s in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("the text is too short to measure perplexity (needs at least 2 tokens)")
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for w in windows:
        by_len[len(w)].append(w)
    device = getattr(model.cfg, "device", "cpu")
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0     # summed on the device
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for ws in by_len.values():
            for s in range(0, len(ws), batch_size):
                tokens = torch.tensor(ws[s:s + batch_size], device=device)
                logp = torch.log_softmax(model(tokens).float(), dim=-1)[:, :-1]
                nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
                total += nll.sum()
                count += nll.numel()
    return float(np.exp(float(total) / count))


def run_evaluation(model: HookedModel, tasks, shots: int = 4, n: int = 100, seed: int = 0,
                   conditions: Mapping[str, NeuronSet | None] | None = None, progress: bool = True,
                   batch_size: int = 128, checkpoint: str | Path | None = None,
                   gold_in_demos: bool = True) -> tuple[list[dict], dict]:
    """Build prompts for every task and evaluate every condition; returns (result rows, dropped pairs).

    `conditions` maps a name to the neuron set pruned under it (None: unpruned; default: unpruned
    only); each task evaluates them all in one pass (`evaluate_task`), `batch_size` rows (prompts x
    conditions) at a time. Arbitrary hooks go through `evaluate(model, prompts, fwd_hooks=...)`.
    Every task's prompts are built and checked against the context before the first evaluation; with
    `gold_in_demos=False` no demo carries its query's gold label (`tasks.prompts.build_prompts`), so
    every prediction equal to a demo label is a copy error.

    With `checkpoint` (a JSON-lines file), every finished (task, condition) row is appended to it at
    once, keyed by the model's fingerprint, the settings, the task's pairs and the condition's
    neurons; rows found there under the same key are reused, so a killed run started again redoes
    none of them and returns what an uninterrupted run returns.
    """
    from mechcopy.progress import tqdm

    from mechcopy.io import append_jsonl
    from mechcopy.tasks.prompts import build_prompts

    conditions = {"unpruned": None} if conditions is None else dict(conditions)
    prompt_sets = {task.name: build_prompts(task, model.tokenizer, k=shots, n=n, seed=seed, gold_in_demos=gold_in_demos)
                   for task in tasks}
    for ps in prompt_sets.values():
        check_context(model, ps.prompts)
    keys = _row_keys(model, tasks, shots, n, seed, conditions, gold_in_demos) if checkpoint else {}
    done = _read_journal(Path(checkpoint), keys) if checkpoint else {}
    rows, dropped = [], {}
    with tqdm(total=len(tasks) * len(conditions), initial=len(done), desc="evaluate", disable=not progress) as bar:
        for task in tasks:
            ps = prompt_sets[task.name]
            dropped[task.name] = [[list(pair), reason] for pair, reason in ps.dropped]
            todo = {name: ns for name, ns in conditions.items() if keys.get((task.name, name)) not in done}
            bar.set_postfix_str(task.name)
            fresh = {r["condition"]: r for r in evaluate_task(model, task, ps, todo, seed, batch_size)} if todo else {}
            for name in conditions:
                key = keys.get((task.name, name))
                if name in fresh and checkpoint:
                    append_jsonl(checkpoint, {"key": key, "task": task.name, "condition": name, "row": fresh[name]})
                rows.append(fresh[name] if name in fresh else done[key])
            bar.update(len(todo))
    return rows, dropped


def evaluate_task(model: HookedModel, task, prompts: PromptSet, conditions: Mapping[str, NeuronSet | None],
                  seed: int = 0, batch_size: int = 128) -> list[dict]:
    """One task's result rows, one per condition, from one pass: `TaskResult.to_json()` plus the task
    kind, the number of dropped pairs and the seconds (the pass's time, shared equally by the rows)."""
    import time

    t0 = time.perf_counter()
    results = evaluate_conditions(model, prompts.prompts, conditions, seed=seed, batch_size=batch_size)
    seconds = round((time.perf_counter() - t0) / len(results), 2)
    return [{**r.to_json(), "kind": task.kind, "n_dropped": len(prompts.dropped), "seconds": seconds}
            for r in results.values()]


def _row_keys(model: HookedModel, tasks, shots: int, n: int, seed: int, conditions: Mapping[str, NeuronSet | None],
              gold_in_demos: bool = True) -> dict[tuple[str, str], str]:
    """(task, condition) -> a hash of everything its row depends on: model, settings, pairs and neurons."""
    import hashlib
    import json

    from mechcopy.neurons import model_fingerprint

    common = {"model": model_fingerprint(model), "shots": shots, "n": n, "seed": seed, "gold_in_demos": gold_in_demos}
    keys = {}
    for task in tasks:
        for name, ns in conditions.items():
            what = {**common, "task": task.to_json(), "condition": name,
                    "neurons": None if ns is None else [list(x) for x in ns.neurons]}
            keys[(task.name, name)] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return keys


def _read_journal(path: Path, keys: dict[tuple[str, str], str]) -> dict[str, dict]:
    """Rows of `path` whose key is one of `keys` (key -> row). The file is rewritten with those rows
    only, so lines under other keys, and a last line a kill cut short, do not stay in the way."""
    from mechcopy.errors import note
    from mechcopy.io import read_jsonl, write_jsonl_atomic

    wanted = set(keys.values())
    entries = {e["key"]: e for e in read_jsonl(path) if isinstance(e, dict) and e.get("key") in wanted and "row" in e}
    if path.exists():
        write_jsonl_atomic(path, entries.values())
    if entries:
        note(f"resuming from {path}: {len(entries)} of {len(keys)} (task, condition) rows already done")
    return {key: e["row"] for key, e in entries.items()}


def results_table(rows: list[dict]):
    """A pandas table: task, condition, n, accuracy and copy rate with their 95% intervals."""
    import pandas as pd

    def fmt(x, ci):
        return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    return pd.DataFrame([{
        "task": r["task"], "condition": r["condition"], "n": r["n"],
        "accuracy [95% CI]": fmt(r["accuracy"], r["accuracy_ci"]),
        "copy rate [95% CI]": fmt(r["copy_rate"], r["copy_rate_ci"]),
        "copy/errors": round(r["copy_share_of_errors"], 2), "other": round(r["other_rate"], 2),
    } for r in rows])


def compare_rows(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict[str, list[dict]]:
    """Paired comparisons of the conditions in `rows` (from `run_evaluation`), per task and pooled.

    For each task: every condition against `unpruned`, the random sets as one family against
    `unpruned`, and `pruned` against the random sets (`mechcopy.stats.compare_task`), on accuracy and
    on copy rate. "pooled" weighs every task the same and leaves out the probe (`kind == "probe"`),
    on which the neurons were chosen. Returns {task or "pooled": [Comparison.to_json(), ...]}.
    """
    from mechcopy import stats

    by_task: dict[str, dict[str, dict]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    for r in rows:
        by_task[r["task"]][r["condition"]] = r
        kinds[r["task"]] = r.get("kind", "")
    out: dict[str, list[dict]] = {}
    for metric, key in (("accuracy", "correct"), ("copy_rate", "copy")):
        outcomes = {t: {c: np.asarray(r[key], dtype=bool) for c, r in conds.items()} for t, conds in by_task.items()}
        held_out = {t: o for t, o in outcomes.items() if kinds[t] != "probe"}
        for t, o in outcomes.items():
            if t not in held_out:
                out.setdefault(t, []).extend(c.to_json() for c in stats.compare_task(t, o, metric, n_boot=n_boot,
                                                                                       seed=seed))
        for c in stats.compare_all(held_out, metric, n_boot=n_boot, seed=seed):
            out.setdefault(c.task, []).append(c.to_json())
    return out


def comparisons_table(comparisons: list[dict]):
    """A pandas table of comparisons (`compare_rows` values): difference, 95% interval, p, MDE, n."""
    import pandas as pd

    return pd.DataFrame([{
        "comparison": f"{c['condition']} - {c['baseline']}", "metric": c["metric"], "diff": f"{c['diff']:+.3f}",
        "95% CI": f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]", "p": f"{c['p_value']:.3g}", "MDE": f"{c['mde']:.3f}",
        "n": c["n"], **({"tasks up/down (Holm)": f"{c['n_up']}/{c['n_down']}"} if "n_up" in c else {}),
    } for c in comparisons])
