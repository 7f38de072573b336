"""ICL accuracy, copy-error rates with bootstrap intervals, and perplexity, under any forward hooks.

Prompts of any lengths share a batch, left-padded with an attention mask; the architecture's decoder
keeps the padding out of every real position (transformers: masked attention, rotary positions
counted from each row's first token; Mamba: padding leaves the recurrent state empty), so the answers
equal unpadded runs. `predict(..., pad=False)` keeps the reference path where only prompts of equal
token length share a batch. Every forward pass runs inside `model.hooks(fwd_hooks=...)`, so pruning
and other interventions compose with the evaluator. Conditions (`mechcopy.conditions.Condition`: zero
or mean ablation of any component kind, at every position or the last) run in one pass
(`evaluate_conditions`): each batch shares the blocks before the first ablated layer, then forks into
one row group per condition, ablated by one hook per site (`pruning.grouped_hooks`). Single-token
answers are scored by the argmax of the next token, multi-token answers by greedy generation up to
the separator; a condition whose `Readout` says `labels` is read over the task's label set instead
(`scoring.score_labels_conditions`, each label's full token sequence, then the condition's
calibration), in the same call. What a prediction is (correct, a copy error: a wrong prediction equal
to one of the demo labels) is `mechcopy.tasks.outcomes`'s rule; beside the copy rate, the copy effect
and the demo-share test (`mechcopy.copy_effect`) where the task's label set is given.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Int
from pydoc_data.topics import topics
from torch import Tensor

from mechcopy.arch import Decoder, HookedModel, arch_of
from mechcopy.batching import left_pad, token_batches
from mechcopy.conditions import OTHER_ATTENTION, Condition
from mechcopy.copy_effect import copy_effect, demo_share
from mechcopy.errors import FieldError, check_items, check_number
from mechcopy.hooks import check_hook_points
from mechcopy.progress import tqdm
from mechcopy.pruning import grouped_hooks
from mechcopy.scoring import CONTENT_FREE, LabelScores, score_labels_conditions
from mechcopy.stats import bootstrap_ci, rate_interval
from mechcopy.tasks.outcomes import classify
from mechcopy.tasks.prompts import ICLPrompt, PromptSet


@dataclass(frozen=True)
class TaskResult:
    """Accuracy and error breakdown of one task under one condition (rates are shares of all n), and
    each prompt's outcome in prompt order (`correct`, `copy`: what paired comparisons need).

    Beside the copy rate, where the task's label set was given: `copy_effect` (`copy_effect.CopyEffect`
    as JSON: does a label's presence among the demos make it the answer, preference aside; its
    `effect` is null, with the `reason`, where the prompts cannot estimate it) and `demo_share` (the
    probe's demo-share test against chance); both None where no label set was given."""

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
    copy_effect: dict[str, Any] | None = None
    demo_share: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("accuracy_ci", "copy_rate_ci", "predictions", "correct", "copy"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TaskResult":
        """The result `to_json` wrote (other keys, e.g. a result row's `spec`, are left out)."""
        return cls(obj["task"], obj["condition"], obj["n"], obj["accuracy"], obj["copy_rate"],
                   obj["copy_share_of_errors"], obj["other_rate"], _pair(obj["accuracy_ci"]),
                   _pair(obj["copy_rate_ci"]), tuple(obj["predictions"]), tuple(map(bool, obj["correct"])),
                   tuple(map(bool, obj["copy"])), obj.get("copy_effect"), obj.get("demo_share"))


def _pair(x: Sequence[float]) -> tuple[float, float]:
    return (float(x[0]), float(x[1]))


#: what every function that takes an evaluation's prompts accepts: the prompts, or their `PromptSet`
Prompts = Sequence[ICLPrompt] | PromptSet


def _as_list(prompts: Any) -> list[ICLPrompt]:
    return check_items(prompts.prompts if isinstance(prompts, PromptSet) else prompts, ICLPrompt, "prompts",
                       "tasks.prompts.build_prompts(...).prompts")


def _steps(p: ICLPrompt) -> int:
    """1 (next-token argmax) when the answer and every demo label are one token, else the
    generation budget: the longest of them + 2 tokens."""
    longest = max([len(p.answer_ids), *map(len, p.demo_label_ids)])
    return 1 if longest == 1 else longest + 2


def prompt_tokens(model: HookedModel, prompt: ICLPrompt, index: int = 0) -> Int[Tensor, "1 pos"]:
    """The prompt's tokens, refused when they and the tokens to generate exceed the model's context."""
    return arch_of(model).tokens(model, prompt.text, extra=_steps(prompt) - 1,
                                 what=f"prompt {index} of task {prompt.task!r}")


def check_context(model: HookedModel, prompts: Prompts) -> None:
    """Refuse, before any work, a prompt that does not fit the model's context (`prompt_tokens`)."""
    for i, p in enumerate(_as_list(prompts)):
        prompt_tokens(model, p, i)


def _tokens(model: HookedModel, prompts: Sequence[ICLPrompt]) -> list[Int[Tensor, "_pos"]]:
    """Each prompt's tokens, checked against the context length with its generation budget."""
    return [prompt_tokens(model, p, i)[0] for i, p in enumerate(prompts)]


def _greedy(decode: Decoder, tokens: Tensor, mask: Tensor, budgets: Sequence[int], tok,
            seps: Sequence[str]) -> list[str]:
    """Each row's answer: the next token's argmax if its budget is 1, else greedy generation that
    stops per row at its separator `seps[r]`, EOS or the row's budget (the decoder runs until every
    row stopped)."""
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
            if len(generated[r]) >= budgets[r] or seps[r] in tok.decode(generated[r]):
                done[r] = True
        if all(done):
            return [tok.decode(g).split(sep)[0].strip() for g, sep in zip(generated, seps)]
        logits = decode(nxt[:, None])


def _predict(model: HookedModel, prompts: Prompts, fwd_hooks, batch_size: int, groups: int,
             fork_at: int, sep: str | None, progress: bool, pad: bool) -> list[list[str]]:
    """Answers per row group (`Arch.decoder`'s fork) under `fwd_hooks`; `batch_size` rows per pass;
    generation stops at `sep`, or (None) at each prompt's own separator."""
    prompts = _as_list(prompts)
    check_number(batch_size, "batch_size", low=1, integer=True)
    if sep is not None and (not isinstance(sep, str) or not sep):
        raise ValueError(f"sep must be a non-empty string (None: each prompt's own separator), got {sep!r}")
    fwd_hooks = list(fwd_hooks)
    check_hook_points(model, fwd_hooks)
    arch, tok = arch_of(model), model.tokenizer
    ids, budgets = _tokens(model, prompts), [_steps(p) for p in prompts]
    seps = [sep or p.sep for p in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[list[str]] = [[""] * len(prompts) for _ in range(groups)]
    batches = token_batches(ids, budgets, max(1, batch_size // groups), pad)
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        for batch in tqdm(batches, desc="predict", disable=not progress, leave=False):
            tokens, mask = left_pad([ids[i] for i in batch], pad_id)
            answers = _greedy(arch.decoder(model, groups, fork_at), tokens, mask,
                              [budgets[i] for i in batch] * groups, tok, [seps[i] for i in batch] * groups)
            for r, answer in enumerate(answers):
                out[r // len(batch)][batch[r % len(batch)]] = answer
    return out


def predict(model: HookedModel, prompts: Prompts, fwd_hooks=(), batch_size: int = 32,
            sep: str | None = None, progress: bool = False, pad: bool = True) -> list[str]:
    """The model's answer to each prompt (decoded text, stripped), under `fwd_hooks`.

    Prompts whose answer and demo labels are all one token: argmax of the next token. Otherwise greedy
    generation until the generated text contains the prompt's separator (`ICLPrompt.sep`, the one it was
    built with; `sep` overrides it), the EOS token, or max(answer, demo label
    lengths) + 2 tokens, continuing the architecture's decoder (a key/value cache on transformers, the
    recurrent state on Mamba). With `pad` (default) prompts of any lengths share a batch, left-padded;
    `pad=False` batches only prompts of equal length (the reference). Hooks run on every pass: a hook
    that acts on one position sees the prompt on the first pass and one new token on each later pass;
    with `pad` it sees the padding too, so it must index positions from the end (e.g. -1), not the start.
    """
    return _predict(model, prompts, fwd_hooks, batch_size, 1, 0, sep, progress, pad)[0]


def predict_conditions(model: HookedModel, prompts: Prompts, conditions: Sequence[Condition],
                       batch_size: int = 128, sep: str | None = None, progress: bool = False,
                       labels: Sequence[str] | None = None,
                       references: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """`predict` under every condition in one pass: {condition label: answers}.

    Each batch runs once through the blocks before the first ablated layer, then forks into one row
    group per condition, each ablated by its own hooks (`pruning.grouped_hooks`: zero or mean, at every
    position or the last, any component kind); answers equal separate `predict` runs with
    `pruning.condition_hooks`. `batch_size` counts forked rows (prompts x conditions), so memory stays
    bounded however many conditions there are.

    Conditions whose `readout` scores labels are read over `labels` (the task's label set,
    `Task.require_labels()`) instead: one forked pass of `scoring.score_labels_conditions` per distinct
    ablation among them (calibrations of one ablation share its label scores), then each condition's
    calibration (`scoring.LabelScores.predict`; batch calibration takes `prompts` as its batch, so
    pass one task's prompts). `references` gives the reference queries of `contextual` and `domain`
    calibration (default: `scoring.CONTENT_FREE` for contextual; domain's must be given,
    `scoring.reference_queries`).
    """
    conditions = check_items(conditions, Condition, "conditions", "mechcopy.conditions.UNPRUNED, standard_conditions(...)")
    if not conditions:
        raise ValueError("no conditions to evaluate: pass e.g. [mechcopy.conditions.UNPRUNED]")
    names = [c.label for c in conditions]
    repeated = sorted({x for x in names if names.count(x) > 1})
    if repeated:
        raise ValueError(f"conditions must have distinct labels; {repeated} appear more than once")
    out: dict[str, list[str]] = {}
    generated = [c for c in conditions if not c.readout.labels]
    if generated:
        fork_at, hooks = grouped_hooks(model, generated)
        answers = _predict(model, prompts, hooks, batch_size, len(generated), fork_at, sep, progress, True)
        out.update(zip([c.label for c in generated], answers))
    scored = [c for c in conditions if c.readout.labels]
    if scored:
        out.update(_read_labels(model, _as_list(prompts), scored, labels, references, batch_size, progress))
    return {name: out[name] for name in names}


def _ablation_key(c: Condition) -> tuple:
    """What a condition's label scores depend on: its ablation, not its readout."""
    comps = (c.components.kind, c.components.pairs) if c.ablates and c.components is not None else None
    drawn = c.seed if c.ablates and c.ablation == OTHER_ATTENTION else None    # its keys are drawn with the seed
    return comps, c.ablation if c.ablates else None, c.positions if c.ablates else None, id(c.means), c.factor, drawn


def _read_labels(model: HookedModel, prompts: list[ICLPrompt], conditions: Sequence[Condition],
                 labels: Sequence[str] | None, references: Mapping[str, Sequence[str]] | None, batch_size: int,
                 progress: bool) -> dict[str, list[str]]:
    """Label-scored conditions' answers: each distinct ablation scored once (with the reference
    queries only where one of its conditions calibrates with them), then each condition's readout."""
    if labels is None:
        raise ValueError(f"conditions {[c.label for c in conditions]} score labels: pass the task's label set "
                         "(labels=task.require_labels())")
    refs = dict(references) if references is not None else {"contextual": CONTENT_FREE}
    by_ablation: dict[tuple, list[Condition]] = {}
    for c in conditions:
        by_ablation.setdefault(_ablation_key(c), []).append(c)
    needs = {key: sorted({x for x in (c.readout.calibration for c in cs) if x is not None and x in ("contextual", "domain")})
             for key, cs in by_ablation.items()}
    missing = sorted({x for xs in needs.values() for x in xs} - set(refs))
    if missing:
        raise ValueError(f"{missing[0]} calibration needs its reference queries: pass references="
                         f"scoring.reference_queries({missing}, task inputs)")
    scores: dict[tuple, LabelScores] = {}
    for kinds in {tuple(x) for x in needs.values()}:
        keys = [key for key, x in needs.items() if tuple(x) == kinds]
        got = score_labels_conditions(model, prompts, labels, [by_ablation[k][0] for k in keys],
                                      {x: refs[x] for x in kinds}, batch_size=batch_size, progress=progress)
        scores.update({k: got[by_ablation[k][0].label] for k in keys})
    return {c.label: scores[key].predict(c.readout.calibration or "labels")
            for key, cs in by_ablation.items() for c in cs}


def summarize(prompts: Prompts, predictions: Sequence[str], condition: str = "unpruned",
              seed: int = 0, n_boot: int = 1000, labels: Sequence[str] | None | Literal[False] = False) -> TaskResult:
    """Score predictions against prompts (no model needed): rates and 95% bootstrap intervals (exact
    Clopper-Pearson intervals where every prompt has the same outcome and the bootstrap degenerates).
    With `labels` (the task's label set, `Task.label_set()`; None for an open task) also the copy
    effect and the demo-share test (`mechcopy.copy_effect`); the default False leaves them out."""
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
    name = tasks[0] if len(tasks) == 1 else ",".join(tasks)
    extra = {} if labels is False else {
        "copy_effect": copy_effect(prompts, predictions, labels, name, seed=seed).to_json(),
        "demo_share": demo_share(prompts, predictions, labels, name).to_json()}
    return TaskResult(
        task=name, condition=condition, n=n,
        accuracy=float(correct.mean()), copy_rate=float(copy.mean()),
        copy_share_of_errors=float(copy.sum() / n_err) if n_err else 0.0,
        other_rate=float((~correct & ~copy).mean()),
        accuracy_ci=(float(ci[0, 0]), float(ci[0, 1])), copy_rate_ci=(float(ci[1, 0]), float(ci[1, 1])),
        predictions=tuple(predictions), correct=tuple(map(bool, correct)), copy=tuple(map(bool, copy)), **extra,
    )


def evaluate(model: HookedModel, prompts: Prompts, fwd_hooks=(), condition: str = "unpruned", seed: int = 0,
             n_boot: int = 1000, batch_size: int = 32, progress: bool = False) -> TaskResult:
    """Predict every prompt under `fwd_hooks` and score it (accuracy, copy rate, 95% bootstrap CIs)."""
    prompts = _as_list(prompts)
    preds = predict(model, prompts, fwd_hooks=fwd_hooks, batch_size=batch_size, progress=progress)
    return summarize(prompts, preds, condition=condition, seed=seed, n_boot=n_boot)


def evaluate_conditions(model: HookedModel, prompts: Prompts, conditions: Sequence[Condition],
                        seed: int = 0, n_boot: int = 1000, batch_size: int = 128, progress: bool = False,
                        labels: Sequence[str] | None | Literal[False] = False,
                        references: Mapping[str, Sequence[str]] | None = None) -> dict[str, TaskResult]:
    """`evaluate` under every condition, in one pass (`predict_conditions`): {condition label: TaskResult}.
    `labels` (the task's label set; None: an open task) is what label-scored conditions choose from, and
    gives every result its copy effect and demo share (`summarize`)."""
    prompts = _as_list(prompts)
    preds = predict_conditions(model, prompts, conditions, batch_size=batch_size, progress=progress,
                               labels=labels or None, references=references)
    return {label: summarize(prompts, p, condition=label, seed=seed, n_boot=n_boot, labels=labels)
            for label, p in preds.items()}


def default_text() -> str:
    """Held-out English text available offline everywhere: the standard library's pydoc topics."""
    return "\n\n".join(topics.values())


def held_out_ids(tokenizer, text: str | None, n_tokens: int, text_name: str | None = None,
                 field: str = "n_tokens") -> list[int]:
    """The first `n_tokens` token ids of `text` (None: `default_text()`), refused (naming `field` and the
    text) when the text holds fewer: a perplexity of fewer tokens than asked would be recorded as if it
    were of `n_tokens`."""
    check_number(n_tokens, field, low=2, integer=True)
    if text is not None and not isinstance(text, str):
        raise TypeError(f"text must be a string (None: the default held-out text), got {type(text).__name__}")
    name = text_name or ("the default held-out text" if text is None else "the text")
    text = default_text() if text is None else text
    ids = list(tokenizer(text[: max(n_tokens * 12, 1000)], add_special_tokens=False)["input_ids"])
    if len(ids) < n_tokens:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < n_tokens:
        raise FieldError(field, f"= {n_tokens} tokens of held-out text asked, but {name} holds only {len(ids)}; "
                                "give a longer text or ask for fewer tokens")
    return ids[:n_tokens]


def perplexity(model: HookedModel, text: str | None = None, fwd_hooks=(), n_tokens: int = 4096, window: int = 256,
               batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the first `n_tokens` tokens of `text`, in non-overlapping windows.

    Each window is fed as BOS + window tokens (when the tokenizer has a BOS) and every window token is
    predicted; without a BOS the first token of each window is context only. Windows are cut to the
    model's context.
    """
    check_number(window, "window", low=1, integer=True)
    check_number(batch_size, "batch_size", low=1, integer=True)
    fwd_hooks = list(fwd_hooks)
    check_hook_points(model, fwd_hooks)
    limit = arch_of(model).context_limit(model)
    window = min(window, limit - 1) if limit else window
    tok = model.tokenizer
    ids = held_out_ids(tok, text, n_tokens)
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
