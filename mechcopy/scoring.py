"""Label scoring and calibrated readouts for closed-label tasks.

Greedy generation asks what a model writes; label scoring asks which of the task's labels it finds
likeliest: each label's full token sequence after the prompt is scored (the sum of its tokens'
log-probabilities) and the best one is the prediction. The prompt runs once; every label continues its
key/value cache (transformers) or recurrent state (Mamba) through the architecture's `run_blocks` and
`select_rows`, batched, under any forward hooks (so pruning composes with it), and with the one-pass
fork of `Arch.decoder` (`groups`, `fork_at`: one row group per condition, `score_labels_conditions`).
The evaluator reads a condition's answer this way when its `Readout` says `labels`
(`evaluation.predict_conditions`).

Calibration re-weights the label probabilities (normalised over the label set) before the argmax:

- *contextual* (Zhao et al. 2021): the same demos with content-free queries ("N/A", "", "[MASK]"); the
  mean of their label-normalised probabilities divides the prompt's, then renormalise;
- *domain* (Fei et al. 2023): the same, with random in-domain words (the task's own input words) as
  the queries;
- *batch* (Zhou et al. 2024): per task, the mean label probability over the task's prompts is
  subtracted before the argmax (as the reference implementation StaICC states it).

The reference queries share their prompt's demo prefix: one pass over the tokens the prompt and its
reference queries have in common, then each query and label as one continuation of it.

Token-exact as `mechcopy.tasks.prompts` is: a label's tokens are what follows the prompt text (with
the text the gold answer needs in between, e.g. " " unless the prompt already ends with SmolLM2's
separate " " token), checked so that the prompt's tokens are a prefix of the prompt + label tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float

from mechcopy.arch import HookedModel, arch_of
from mechcopy.batching import left_pad, token_batches
from mechcopy.conditions import Condition
from mechcopy.errors import check_items, check_number
from mechcopy.hooks import check_hook_points
from mechcopy.label_attention import AttentionEdits, attention_edits
from mechcopy.progress import tqdm
from mechcopy.pruning import grouped_hooks
from mechcopy.tasks.prompts import TEMPLATE, ICLPrompt, PromptSet, _continuation, encode, make_prompt

#: Zhao et al.'s content-free queries
CONTENT_FREE = ("N/A", "", "[MASK]")
#: readouts: the plain argmax over labels, and the three calibrations
READOUTS = ("labels", "contextual", "domain", "batch")
#: text that may stand between a prompt and its answer (the template's space, unless the prompt
#: already ends with a whitespace token): the one that reproduces the gold answer's ids is used
GAPS = ("", " ")


# ---------------------------------------------------------------- tokens


def _prompts(prompts) -> list[ICLPrompt]:
    return list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)


def label_ids(tokenizer, prompt: ICLPrompt, labels: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each label's token ids after `prompt.text`: the tokens that `text + gap + label` adds to the
    prompt's, where `gap` is the text that makes the gold answer's ids come out as `answer_ids`.
    ValueError when no gap does, or a label merges with the end of the prompt."""
    for gap in GAPS:
        try:
            if tuple(_continuation(tokenizer, prompt.text, gap + prompt.answer, "answer")) == prompt.answer_ids:
                break
        except ValueError:
            continue
    else:
        raise ValueError(f"cannot tell which text stands between prompt {prompt.text[-40:]!r} and its answer "
                         f"{prompt.answer!r}: none of {GAPS} gives its answer_ids {prompt.answer_ids}")
    return tuple(tuple(_continuation(tokenizer, prompt.text, gap + y, f"label {y!r}")) for y in labels)


def with_queries(prompt: ICLPrompt, queries: Sequence[str], tokenizer, template: str = TEMPLATE,
                 sep: str | None = None) -> list[ICLPrompt]:
    """`prompt` with the same demos and each of `queries` instead of its own (content-free or in-domain
    queries); refused unless `template` and `sep` (None: the prompt's own, `ICLPrompt.sep`) rebuild
    `prompt` itself exactly (pass the ones it was built with)."""
    sep = prompt.sep if sep is None else sep
    same = make_prompt(prompt.demos, (prompt.query, prompt.answer), tokenizer, template, sep, prompt.task)
    if same.text != prompt.text:
        raise ValueError(f"prompt of task {prompt.task!r} was not built with template {template!r} and separator "
                         f"{sep!r}; pass the ones it was built with")
    return [make_prompt(prompt.demos, (q, prompt.answer), tokenizer, template, sep, prompt.task) for q in queries]


def with_query(prompt: ICLPrompt, query: str, tokenizer, template: str = TEMPLATE,
               sep: str | None = None) -> ICLPrompt:
    """`prompt` with another query (`with_queries` for one)."""
    return with_queries(prompt, [query], tokenizer, template, sep)[0]


def domain_queries(inputs: Sequence[str], n: int = 4, n_words: int | None = None, seed: int = 0) -> tuple[str, ...]:
    """`n` queries of `n_words` words each, drawn at random (seeded) from the words of `inputs` (a
    task's own inputs): Fei et al.'s in-domain random text. `n_words` defaults to the mean number of
    words of an input, at least 1 (Fei et al.'s rule; the reference implementation StaICC uses 64 words,
    for long-text tasks)."""
    inputs = check_items(inputs, str, "inputs", "a task's inputs")
    check_number(n, "n", low=1, integer=True)
    if n_words is not None:
        check_number(n_words, "n_words", low=1, integer=True)
    check_number(seed, "seed", low=0, integer=True)
    words = [w for x in inputs for w in x.split()]
    if not words or n < 1:
        raise ValueError(f"domain queries need n >= 1 (got {n}) and inputs with words (got {len(words)} words)")
    if n_words is None:
        n_words = max(1, round(len(words) / len(inputs)))
    rng = random.Random(seed)
    return tuple(" ".join(rng.choice(words) for _ in range(n_words)) for _ in range(n))


# ---------------------------------------------------------------- the scorer


@dataclass(frozen=True)
class _Stem:
    """What follows prompt `prompt`'s shared prefix for one query (`variant`): its query part
    `tokens` (empty for the prompt's own query when it has no references) and each label's ids."""

    prompt: int
    variant: int
    tokens: tuple[int, ...]
    labels: tuple[tuple[int, ...], ...]


def _score_tree(model: HookedModel, prefixes: Sequence[Sequence[int]], stems: Sequence[_Stem], n_variants: int,
                n_labels: int, fwd_hooks=(), batch_size: int = 32, groups: int = 1, fork_at: int = 0,
                progress: bool = False, edits: AttentionEdits | None = None) -> np.ndarray:
    """Summed log-probabilities of every stem's labels [groups, prompts, variants, labels], as a tree:
    each prompt's prefix once (left-padded batches, forked into `groups` row groups as `Arch.decoder`
    forks them), each query part once as a continuation of it (stems of one length together, so no
    padding enters a state that is continued again), and each label of two or more tokens as a
    continuation of its stem (right-padded: padding after a row's last token changes none of its
    positions). A label's first token is read from its stem's last position. `edits` (label-attention
    conditions) act on the passes that end at an answer position: the prefix pass of the prompts whose
    stems are bare, and every query part's pass; never on a label's later tokens."""
    arch = arch_of(model)
    device = getattr(model.cfg, "device", "cpu")
    ids = [torch.tensor(list(p), dtype=torch.long, device=device) for p in prefixes]
    by_prompt: dict[int, list[_Stem]] = {}
    for st in stems:
        by_prompt.setdefault(st.prompt, []).append(st)
    bare_of = {i: [st for st in sts if not st.tokens] for i, sts in by_prompt.items()}
    if edits is not None and any(bare_of[i] and len(bare_of[i]) < len(sts) for i, sts in by_prompt.items()):
        raise ValueError("a prompt's own query is a prefix of one of its reference queries: the shared prefix would "
                         "end at one variant's answer position and not the other's, so label-attention conditions "
                         "cannot be scored exactly on it; use other reference queries")
    if edits is not None and any(k >= len(prefixes[i]) for group in edits.keys for i, keys in enumerate(group) for k in keys):
        raise ValueError("a demo label lies after the prefix its prompt shares with its reference queries")
    out = np.full((groups, len(prefixes), n_variants, n_labels), np.nan)
    per_group = max(1, batch_size // groups)
    run = _Runner(model, arch, groups, out)
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in tqdm(token_batches(ids, [1] * len(ids), per_group, True), desc="label scores",
                          disable=not progress, leave=False):
            tokens, mask = left_pad([ids[i] for i in batch], run.pad_id)
            width = tokens.shape[1]
            pads = {i: width - len(ids[i]) for i in batch}
            # the prefix pass ends at the answer position of the prompts with a bare stem (no query part)
            edit = [] if edits is None else edits.hooks(batch, [pads[i] for i in batch], width,
                                                        [bool(bare_of[i]) for i in batch])
            with model.hooks(fwd_hooks=edit):
                resid, state = arch.run_blocks(model, tokens, mask, None, stop=fork_at)
                fork = torch.arange(len(batch), device=resid.device).repeat(groups)
                resid, state = arch.run_blocks(model, resid[fork], mask[fork], arch.select_rows(state, fork),
                                               start=fork_at)
            last = run.logprobs(resid[:, -1])                      # [groups * B, vocab]
            where = {i: b for b, i in enumerate(batch)}
            todo = [st for i in batch for st in by_prompt.get(i, [])]
            bare = [st for st in todo if not st.tokens]
            if bare:
                run.labels(state, len(batch), [where[st.prompt] for st in bare], last, bare, per_group)
            lengths = sorted({len(st.tokens) for st in todo if st.tokens})
            for n in lengths:
                same = [st for st in todo if len(st.tokens) == n]
                for s in range(0, len(same), per_group):
                    chunk = same[s:s + per_group]
                    x = torch.tensor([st.tokens for st in chunk], device=device).repeat(groups, 1)
                    rows = run.rows([where[st.prompt] for st in chunk], len(batch))
                    # a query part ends at its variant's answer position
                    edit = [] if edits is None else edits.hooks([st.prompt for st in chunk],
                                                                [pads[st.prompt] for st in chunk], width + n)
                    with model.hooks(fwd_hooks=edit):
                        resid, after = arch.run_blocks(model, x, None, arch.select_rows(state, rows))
                    run.labels(after, len(chunk), list(range(len(chunk))), run.logprobs(resid[:, -1]), chunk, per_group)
    if np.isnan(out).any():
        raise ValueError("some label scores were not computed: every (prompt, query, label) needs a stem")
    return out


class _Runner:
    """The model calls of `_score_tree` that read labels off a state: rows are group-major (row
    g * batch + b is prompt b in group g), as `Arch.decoder`'s fork and the pruning hooks expect."""

    def __init__(self, model: HookedModel, arch, groups: int, out: np.ndarray):
        tok = model.tokenizer
        self.model, self.arch, self.groups, self.out = model, arch, groups, out
        self.device = getattr(model.cfg, "device", "cpu")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def rows(self, at: Sequence[int], batch: int) -> torch.Tensor:
        """Rows of a state of `batch` rows per group for the entries `at`, in every group."""
        return torch.tensor([g * batch + a for g in range(self.groups) for a in at], device=self.device)

    def logprobs(self, resid: Float[torch.Tensor, "rows d_model"]) -> Float[torch.Tensor, "rows d_vocab"]:
        return torch.log_softmax(self.arch.final_logits(self.model, resid[:, None])[:, 0].float(), -1)

    def labels(self, state, batch: int, at: Sequence[int], last: torch.Tensor, stems: Sequence[_Stem],
               per_group: int) -> None:
        """Every label of each stem (entry `at[k]` of a state of `batch` rows per group, whose last
        position's log-probabilities are `last`): its first token from `last`, the rest continued."""
        first = last[self.rows(at, batch)[:, None], torch.tensor([[x[0] for x in st.labels] for st in stems]
                                                                   ).repeat(self.groups, 1)]
        firsts = first.reshape(self.groups, len(stems), -1).cpu().numpy()
        for k, st in enumerate(stems):
            self.out[:, st.prompt, st.variant, :] = firsts[:, k]
        longer = [(k, j) for k, st in enumerate(stems) for j, x in enumerate(st.labels) if len(x) > 1]
        for s in range(0, len(longer), per_group):
            self._rest(state, batch, at, stems, longer[s:s + per_group])

    def _rest(self, state, batch: int, at: Sequence[int], stems: Sequence[_Stem], chunk: Sequence[tuple[int, int]]):
        """Labels `chunk` ((stem, label) pairs, two or more tokens each) continued from their stems:
        the log-probabilities of their tokens after the first are added to `out`."""
        labels = [stems[k].labels[j] for k, j in chunk]
        tokens = torch.full((self.groups * len(chunk), max(map(len, labels)) - 1), self.pad_id, dtype=torch.long,
                            device=self.device)
        for g in range(self.groups):
            for r, x in enumerate(labels):
                tokens[g * len(chunk) + r, :len(x) - 1] = torch.tensor(x[:-1])
        resid, _ = self.arch.run_blocks(self.model, tokens, None,
                                        self.arch.select_rows(state, self.rows([at[k] for k, _ in chunk], batch)))
        # position t predicts token t + 1: only the positions whose next token is scored are unembedded
        picks = [(g * len(chunk) + r, t - 1, x[t]) for g in range(self.groups) for r, x in enumerate(labels)
                 for t in range(1, len(x))]
        row, pos, target = (torch.tensor(v, device=self.device) for v in zip(*picks))
        values = self.logprobs(resid[row, pos])[torch.arange(len(picks), device=self.device), target].cpu().numpy()
        for (r, _, _), v in zip(picks, values):
            g, i = divmod(r, len(chunk))
            k, j = chunk[i]
            self.out[g, stems[k].prompt, stems[k].variant, j] += float(v)


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _check_labels(labels: Sequence[str], prompts: Sequence[ICLPrompt]) -> tuple[str, ...]:
    labels = tuple(check_items(labels, str, "labels", "task.require_labels()"))
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"label scoring needs at least two distinct labels, got {list(labels)}")
    outside = sorted({p.answer for p in prompts} - set(labels))
    if outside:
        raise ValueError(f"answers {outside[:3]} are not among the labels {list(labels)}; give the task's full label set")
    return labels


def _score(model: HookedModel, prompts, labels: Sequence[str], references: Mapping[str, Sequence[str]] | None,
           fwd_hooks, template: str, sep: str | None, batch_size: int, groups: int, fork_at: int,
           progress: bool, conditions: Sequence[Condition] = ()) -> list[LabelScores]:
    """One LabelScores per row group: every prompt, and every reference query with its demos, scored
    over `labels` in one pass per batch of prompts (their common token prefix runs once)."""
    prompts = check_items(_prompts(prompts), ICLPrompt, "prompts", "tasks.prompts.build_prompts(...).prompts")
    labels = _check_labels(labels, prompts)
    check_number(batch_size, "batch_size", low=1, integer=True)
    fwd_hooks = list(fwd_hooks)
    check_hook_points(model, fwd_hooks)
    references = {kind: tuple(qs) for kind, qs in (references or {}).items()}
    for kind, qs in references.items():
        if kind not in ("contextual", "domain") or not qs:
            raise ValueError(f"reference queries are 'contextual' or 'domain', each a non-empty list; got {kind!r}: {qs}")
    queries = [q for qs in references.values() for q in qs]
    edits = attention_edits(model, conditions, prompts)
    arch, tok = arch_of(model), model.tokenizer
    prefixes, stems = [], []
    for i, p in enumerate(prompts):
        variants = [p] + (with_queries(p, queries, tok, template, sep) if queries else [])
        ids = [label_ids(tok, v, labels) for v in variants]
        extra = max(len(x) for lids in ids for x in lids) - 1
        toks = [arch.tokens(model, v.text, extra=extra, what=f"prompt {i} of task {p.task!r}")[0].tolist()
                for v in variants]
        cut = _common_prefix(toks)
        if cut == 0:
            raise ValueError(f"prompt {i} of task {p.task!r} and its reference queries share no first token; "
                             "give the tokenizer a BOS token or the prompts demos")
        prefixes.append(toks[0][:cut])
        stems += [_Stem(i, v, tuple(t[cut:]), lids) for v, (t, lids) in enumerate(zip(toks, ids))]
    out = _score_tree(model, prefixes, stems, 1 + len(queries), len(labels), fwd_hooks, batch_size, groups, fork_at,
                      progress, edits)
    results = []
    for g in range(groups):
        ref, at = {}, 1
        for kind, qs in references.items():
            ref[kind] = out[g, :, at:at + len(qs)]
            at += len(qs)
        results.append(LabelScores(labels, out[g, :, 0], ref, {k: tuple(v) for k, v in references.items()}))
    return results


def score_labels(model: HookedModel, prompts, labels: Sequence[str], fwd_hooks=(),
                 references: Mapping[str, Sequence[str]] | None = None, template: str = TEMPLATE,
                 sep: str | None = None, batch_size: int = 32, progress: bool = False) -> LabelScores:
    """Every prompt's summed log-probability of each label's tokens, under `fwd_hooks`.

    `references` maps a calibration ("contextual", "domain") to its queries (e.g. `CONTENT_FREE`,
    `domain_queries(...)`): each is scored with the prompt's own demos, sharing the prompt's prefix
    (`template` must be the one the prompts were built with; `sep` defaults to each prompt's own). Hooks run on every pass and see
    the prefix, then right-padded continuations: a hook must act at every position, as pruning does.
    """
    return _score(model, prompts, labels, references, fwd_hooks, template, sep, batch_size, 1, 0, progress)[0]


def score_labels_conditions(model: HookedModel, prompts, labels: Sequence[str], conditions: Sequence[Condition],
                            references: Mapping[str, Sequence[str]] | None = None, template: str = TEMPLATE,
                            sep: str | None = None, batch_size: int = 128,
                            progress: bool = False) -> dict[str, LabelScores]:
    """`score_labels` under every condition's ablation in one pass ({condition label: LabelScores}; the
    conditions' readouts play no part here): the blocks before the first ablated layer run once, then
    one row group per condition (`pruning.grouped_hooks`, as `evaluation.predict_conditions` does;
    label-attention conditions by `label_attention.attention_edits`, at the answer position)."""
    conditions = list(conditions)
    if not conditions:
        raise ValueError("no conditions to score: pass e.g. [mechcopy.conditions.UNPRUNED]")
    fork_at, hooks = grouped_hooks(model, conditions)
    scores = _score(model, prompts, labels, references, hooks, template, sep, batch_size, len(conditions), fork_at,
                    progress, conditions)
    return dict(zip([c.label for c in conditions], scores))


def reference_queries(calibrations: Collection[str | None], inputs: Sequence[str] = (), seed: int = 0
                      ) -> dict[str, tuple[str, ...]]:
    """The reference queries `calibrations` need (None, no calibration, needs none): `contextual` the content-free queries (`CONTENT_FREE`),
    `domain` in-domain ones drawn from `inputs` (a task's inputs: `domain_queries`, seeded); `batch`
    needs none."""
    calibrations = check_items(calibrations, (str, type(None)), "calibrations", "e.g. ['contextual', 'batch']")
    out: dict[str, tuple[str, ...]] = {}
    if "contextual" in calibrations:
        out["contextual"] = CONTENT_FREE
    if "domain" in calibrations:
        out["domain"] = domain_queries(inputs, seed=seed)
    return out


# ---------------------------------------------------------------- readouts


def normalise(logprobs: Float[np.ndarray, "... labels"]) -> Float[np.ndarray, "... labels"]:
    """Probabilities over the label set: softmax of the labels' summed log-probabilities."""
    x = np.asarray(logprobs, dtype=float)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def contextual_weights(probs: Float[np.ndarray, "n labels"], reference: Float[np.ndarray, "n queries labels"]
                       ) -> Float[np.ndarray, "n labels"]:
    """Zhao et al.: each prompt's label probabilities divided by the mean over its reference queries of
    theirs (all label-normalised), renormalised."""
    w = probs / reference.mean(axis=1)
    return w / w.sum(axis=-1, keepdims=True)


def batch_weights(probs: Float[np.ndarray, "n labels"]) -> Float[np.ndarray, "n labels"]:
    """Zhou et al.: each prompt's label probabilities minus their mean over the batch (one task's prompts)."""
    return probs - probs.mean(axis=0, keepdims=True)


@dataclass(frozen=True)
class LabelScores:
    """One task's prompts scored over its label set: `logprobs[i, j]`, the summed log-probability of
    label j's tokens after prompt i; `reference[kind][i, v, j]`, the same after reference query v of a
    calibration (`queries[kind][v]`) with prompt i's demos."""

    labels: tuple[str, ...]
    logprobs: np.ndarray
    reference: Mapping[str, np.ndarray] = field(default_factory=dict)
    queries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def probs(self) -> np.ndarray:
        """Label probabilities normalised over the label set [n, labels]."""
        return normalise(self.logprobs)

    def weights(self, readout: str = "labels") -> np.ndarray:
        """The scores whose argmax is the prediction under `readout` (one of READOUTS); batch
        calibration takes these prompts as its batch."""
        if readout == "labels":
            return self.probs()
        if readout == "batch":
            return batch_weights(self.probs())
        if readout in ("contextual", "domain"):
            if readout not in self.reference:
                raise ValueError(f"{readout} calibration needs its reference queries: score with "
                                 f"references={{'{readout}': ...}}")
            return contextual_weights(self.probs(), normalise(self.reference[readout]))
        raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")

    def predict(self, readout: str = "labels") -> list[str]:
        """The label with the highest `weights(readout)` for every prompt."""
        return [self.labels[j] for j in self.weights(readout).argmax(axis=-1)]

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "logprobs": np.asarray(self.logprobs).tolist(),
                "reference": {k: np.asarray(v).tolist() for k, v in self.reference.items()},
                "queries": {k: list(v) for k, v in self.queries.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LabelScores":
        return cls(tuple(d["labels"]), np.asarray(d["logprobs"], dtype=float),
                   {k: np.asarray(v, dtype=float) for k, v in d.get("reference", {}).items()},
                   {k: tuple(v) for k, v in d.get("queries", {}).items()})
