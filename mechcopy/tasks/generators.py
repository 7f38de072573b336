"""Seeded generators of synthetic ICL tasks (built in memory, never stored as data files).

Each generator returns a `mechcopy.tasks.Task`; `GENERATORS` maps a task name to its generator so that
`load_task("object_counting")` works like a built-in JSON task.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mechcopy.tasks.task import Task

#: Common, concrete, single-word objects (lower case) used by `object_counting`.
OBJECTS: tuple[str, ...] = (
    "apple", "chair", "book", "table", "cup", "pen", "lamp", "shoe", "hat", "ball",
    "box", "bottle", "spoon", "fork", "knife", "plate", "bowl", "clock", "phone", "key",
    "bag", "coat", "sock", "bed", "door", "window", "pencil", "brush", "comb", "towel",
    "pillow", "candle", "mirror", "basket", "bucket", "ladder", "hammer", "rope", "coin", "ring",
    "banana", "orange", "lemon", "carrot", "potato", "tomato", "egg", "cake", "bread", "drum",
)


def object_counting(n: int = 200, seed: int = 0, max_count: int = 9, min_count: int = 1) -> Task:
    """Count the items of a comma-separated list of common objects ("apple, chair, apple" -> "3").

    Objects may repeat within a list (so the answer is the number of items, not of distinct objects).
    Counts are drawn uniformly from [min_count, max_count]; answers are single digits, which is why
    max_count may be at most 9. Inputs are distinct; the same seed always gives the same task.
    """
    if not 1 <= min_count <= max_count <= 9:
        raise ValueError(
            f"object_counting needs 1 <= min_count <= max_count <= 9 (single-digit answers), "
            f"got min_count={min_count}, max_count={max_count}"
        )
    if n < 1:
        raise ValueError(f"object_counting needs n >= 1, got n={n}")
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(
                f"object_counting could not draw {n} distinct lists with counts in "
                f"[{min_count}, {max_count}]; ask for fewer pairs or a wider count range"
            )
        count = rng.randint(min_count, max_count)
        items = [rng.choice(OBJECTS) for _ in range(count)]
        text = ", ".join(items)
        if text in seen:
            continue
        seen.add(text)
        pairs.append((text, str(count)))
    return Task(name="object_counting", pairs=tuple(pairs), kind="counting")


GENERATORS: dict[str, Callable[..., "Task"]] = {"object_counting": object_counting}
