"""ICL accuracy, copy-error rates with bootstrap intervals, and perplexity, under any forward hooks.

Prompts are batched only with prompts of the same token length, so no padding or attention mask is
needed and the numbers are exact for transformers and Mamba alike. Every forward pass runs inside
`model.hooks(fwd_hooks=...)`, so pruning and other interventions compose with the evaluator.
Single-token answers are scored by the argmax of the next token; multi-token answers by greedy
generation up to the separator. A copy error is a wrong prediction equal to one of the demo labels.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.stats import bootstrap_ci
from mechcopy.tasks.prompts import SEPARATOR, ICLPrompt, PromptSet


@dataclass(frozen=True)
class TaskResult:
    """Accuracy and error breakdown of one task under one condition (rates are shares of all n)."""

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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_ci"], d["copy_rate_ci"] = list(self.accuracy_ci), list(self.copy_rate_ci)
        d["predictions"] = list(self.predictions)
        return d


def _as_list(prompts) -> list[ICLPrompt]:
    return list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)


def _steps(p: ICLPrompt) -> int:
    """1 (next-token argmax) when the answer and every demo label are one token, else the
    generation budget: the longest of them + 2 tokens."""
    longest = max([len(p.answer_ids), *map(len, p.demo_label_ids)])
    return 1 if longest == 1 else longest + 2


def predict(model: HookedModel, prompts: Sequence[ICLPrompt], fwd_hooks=(), batch_size: int = 32,
            sep: str = SEPARATOR, progress: bool = False, kv_cache: bool = True) -> list[str]:
    """The model's answer to each prompt (decoded text, stripped), under `fwd_hooks`.

    Prompts whose answer and demo labels are all one token: argmax of the next token. Otherwise greedy
    generation until the generated text contains `sep`, the EOS token, or max(answer, demo label
    lengths) + 2 tokens. Only prompts of equal token length share a batch. Generation continues the
    architecture's decoder (`kv_cache=True`: a key/value cache on transformers, the recurrent state on
    Mamba) or re-runs the full sequence (`kv_cache=False`); both are exact. Hooks run on every pass: a hook that acts on one position (e.g. the
    last) sees the prompt on the first pass and one new token on each cached pass.
    """
    from tqdm.auto import tqdm

    prompts = _as_list(prompts)
    arch = arch_of(model)
    tok = model.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    groups: dict[tuple[int, int], list[tuple[int, Tensor]]] = defaultdict(list)
    for i, p in enumerate(prompts):
        ids = model.to_tokens(p.text)[0]
        steps = _steps(p)
        if n_ctx is not None and len(ids) + steps > n_ctx:
            raise ValueError(f"prompt {i} of task {p.task!r} has {len(ids)} tokens (+{steps} to generate), "
                             f"longer than the model's context of {n_ctx}; use fewer shots")
        groups[(len(ids), steps == 1)].append((i, ids))
    out: list[str | None] = [None] * len(prompts)
    batches = [items[s:s + batch_size] for items in groups.values() for s in range(0, len(items), batch_size)]
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in tqdm(batches, desc="predict", disable=not progress, leave=False):
            index = [i for i, _ in batch]
            tokens = torch.stack([ids for _, ids in batch])
            budget = [_steps(prompts[i]) for i in index]
            steps = max(budget)
            generated = [[] for _ in index]
            done = [False] * len(index)
            decode = arch.decoder(model, len(index)) if kv_cache and steps > 1 else None
            inp = tokens
            for _ in range(steps):
                nxt = (decode(inp) if decode is not None else arch.last_logits(model, inp)).argmax(-1)
                for r, t in enumerate(nxt.tolist()):
                    if done[r]:
                        continue
                    if t == eos and steps > 1:
                        done[r] = True
                        continue
                    generated[r].append(t)
                    if len(generated[r]) >= budget[r] or sep in tok.decode(generated[r]):
                        done[r] = True
                if all(done) or steps == 1:
                    break
                nxt = nxt[:, None].to(tokens.device)
                inp = nxt if decode is not None else torch.cat([inp, nxt], dim=1)
            for r, i in enumerate(index):
                out[i] = tok.decode(generated[r]).split(sep)[0].strip()
    return out  # type: ignore[return-value]


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
    """Score predictions against prompts (no model needed): rates and 95% bootstrap intervals."""
    prompts = _as_list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate (did every pair get dropped? see PromptSet.dropped)")
    correct, copy = classify(prompts, predictions)
    n, n_err = len(prompts), int((~correct).sum())
    ci = bootstrap_ci(np.stack([correct, copy], axis=1), n_boot=n_boot, seed=seed)
    tasks = sorted({p.task for p in prompts})
    return TaskResult(
        task=tasks[0] if len(tasks) == 1 else ",".join(tasks), condition=condition, n=n,
        accuracy=float(correct.mean()), copy_rate=float(copy.mean()),
        copy_share_of_errors=float(copy.sum() / n_err) if n_err else 0.0,
        other_rate=float((~correct & ~copy).mean()),
        accuracy_ci=(float(ci[0, 0]), float(ci[0, 1])), copy_rate_ci=(float(ci[1, 0]), float(ci[1, 1])),
        predictions=tuple(predictions),
    )


def evaluate(model: HookedModel, prompts: Sequence[ICLPrompt], fwd_hooks=(), condition: str = "unpruned", seed: int = 0,
             n_boot: int = 1000, batch_size: int = 32, progress: bool = False) -> TaskResult:
    """Predict every prompt under `fwd_hooks` and score it (accuracy, copy rate, 95% bootstrap CIs)."""
    prompts = _as_list(prompts)
    preds = predict(model, prompts, fwd_hooks=fwd_hooks, batch_size=batch_size, progress=progress)
    return summarize(prompts, preds, condition=condition, seed=seed, n_boot=n_boot)


def default_text() -> str:
    """Held-out English text available offline everywhere: the standard library's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def perplexity(model: HookedModel, text: str | None = None, fwd_hooks=(), n_tokens: int = 4096, window: int = 256,
               batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the first `n_tokens` tokens of `text`, in non-overlapping windows.

    Each window is fed as BOS + window tokens (when the tokenizer has a BOS) and every window token is
    predicted; without a BOS the first token of each window is context only.
    """
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
                   conditions=(("unpruned", []),), progress: bool = True) -> tuple[list[dict], dict]:
    """Build prompts for every task and evaluate each condition; returns (result rows, dropped pairs).

    `conditions` is a list of (name, fwd_hooks). Each row is `TaskResult.to_json()` plus the task kind,
    the number of dropped pairs and the seconds the evaluation took.
    """
    import time

    from tqdm.auto import tqdm

    from mechcopy.tasks.prompts import build_prompts

    rows, dropped = [], {}
    bar = tqdm(total=len(tasks) * len(conditions), desc="evaluate", disable=not progress)
    for task in tasks:
        ps = build_prompts(task, model.tokenizer, k=shots, n=n, seed=seed)
        dropped[task.name] = [[list(pair), reason] for pair, reason in ps.dropped]
        for name, hooks in conditions:
            bar.set_postfix_str(f"{task.name} / {name}")
            t0 = time.perf_counter()
            result = evaluate(model, ps.prompts, fwd_hooks=hooks, condition=name, seed=seed)
            rows.append({**result.to_json(), "kind": task.kind, "n_dropped": len(ps.dropped),
                         "seconds": round(time.perf_counter() - t0, 2)})
            bar.update()
    bar.close()
    return rows, dropped


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
