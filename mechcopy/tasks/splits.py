"""Task-vector splits (Hendel et al. 2023): extraction prompts with dummy queries, zero-shot dev and
test queries, and the few-shot ICL baseline on the test queries; all disjoint from the extraction pairs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mechcopy.tasks.prompts import ICLPrompt, make_prompt


@dataclass(frozen=True)
class TaskVectorSplit:
    """The prompts of one task-vector experiment; the query sets are disjoint from the extraction pairs."""

    task: str
    extraction: tuple        # few-shot prompts with dummy queries (ICLPrompt)
    dev: tuple               # zero-shot prompts
    test: tuple              # zero-shot prompts
    test_icl: tuple          # few-shot prompts with the test queries (demos from the extraction pool)
    dropped: tuple[tuple[tuple[str, str], str], ...] = ()

    @property
    def extraction_labels(self) -> frozenset[str]:
        """The labels of the extraction prompts' demos (what a copying prediction would repeat)."""
        return frozenset(lab.strip() for p in self.extraction for lab in p.demo_labels)



def split_task(task, tokenizer, shots: int = 4, n_extract: int = 5, n_dev: int = 20, n_test: int = 50,
               seed: int = 0) -> TaskVectorSplit:
    """Shuffle the task's pairs (seeded) into an extraction pool and dev/test queries, and build prompts.

    The pool (shots + n_extract pairs) gives the extraction prompts (prompt i: dummy query pool[i],
    `shots` demos drawn from the rest of the pool) and the ICL baseline's demos. Dev and test queries
    come from the remaining pairs, keeping only those whose zero-shot and few-shot prompts both tokenise
    with a single-token answer, so every condition sees the same queries.
    """
    n_pool = shots + n_extract
    rng = random.Random(seed)
    pairs, dropped = task.distinct_pairs()
    rng.shuffle(pairs)
    if len(pairs) < n_pool + 2:
        raise ValueError(f"task {task.name!r} has {len(pairs)} distinct pairs; task vectors with "
                         f"shots={shots}, n_extract={n_extract} need at least {n_pool + 2}")

    def single(pair, demos):
        try:
            p = make_prompt(demos, pair, tokenizer, task=task.name)
        except ValueError as e:
            dropped.append((pair, str(e)))
            return None
        if len(p.answer_ids) != 1:
            dropped.append((pair, "multi-token answer (task vectors use single-token answers)"))
            return None
        return p

    # extraction: take pool pairs as dummy queries until n_extract prompts tokenise
    pool, rest = pairs[:n_pool], pairs[n_pool:]
    extraction: list[ICLPrompt] = []
    for i, query in enumerate(pool):
        if len(extraction) == n_extract:
            break
        others = [p for p in pool if p != query]
        try:
            extraction.append(make_prompt(rng.sample(others, shots), query, tokenizer, task=task.name))
        except ValueError as e:
            dropped.append((query, str(e)))
    if not extraction:
        raise ValueError(f"task {task.name!r}: no extraction prompt could be built ({dropped[:3]})")

    queries: list[tuple[str, str]] = []
    for pair in rest:
        if len(queries) == n_dev + n_test:
            break
        zs = single(pair, ())
        if zs is None:
            continue
        icl = single(pair, rng.sample(pool, shots))
        if icl is not None:
            queries.append((zs, icl))
    if len(queries) < 2:
        raise ValueError(f"task {task.name!r}: only {len(queries)} usable queries with single-token answers "
                         f"after the extraction pool; use a task with more pairs")
    n_dev = min(n_dev, len(queries) // 2) if len(queries) < n_dev + n_test else n_dev
    dev, test = queries[:n_dev], queries[n_dev:]
    return TaskVectorSplit(task.name, tuple(extraction), tuple(z for z, _ in dev), tuple(z for z, _ in test),
                           tuple(i for _, i in test), tuple(dropped))
