"""The copy probe: count the vowels of a common word ("lemon -> 2"), with k demonstrations whose
labels never include the query's gold label, so every prediction equal to a demo label is a copy
error by construction. Attribution and dev splits are disjoint by query word.
"""

from __future__ import annotations

import random

from mechcopy.tasks import PROBE_NAME, Task
from mechcopy.tasks.prompts import ICLPrompt, PromptSet, build_prompts

VOWELS = "aeiou"

#: Common English single words (lower case, letters only), chosen for this project.
WORDS: tuple[str, ...] = tuple("""
apple table river mountain garden window lemon doctor pencil flower orange banana house water
chair bottle forest island summer winter spring autumn yellow purple green black white brown
silver golden music paper letter number animal family friend mother father sister brother
teacher student school market village city country ocean desert valley castle bridge tower
road street train plane boat ship truck bicycle engine rocket planet moon star cloud storm
thunder rain snow wind fire stone metal glass wood cotton leather button pocket jacket shirt
dress shoe hat glove scarf blanket pillow candle mirror picture camera radio phone computer
keyboard screen kitchen bedroom bathroom garage office library museum theater hospital airport
station factory farm barn horse cow sheep goat pig chicken duck rabbit tiger lion monkey
elephant giraffe zebra kangaroo dolphin whale shark turtle snake spider butterfly bee ant
eagle parrot penguin potato tomato carrot onion garlic pepper cucumber pumpkin melon cherry
grape peach pear plum coconut avocado bread butter cheese honey sugar salt coffee tea juice
cookie pizza pasta noodle rice soup salad sandwich dinner lunch breakfast picnic holiday
birthday journey adventure story history science language nature energy people animal idea
problem answer question reason moment minute second hour morning evening evening afternoon
tomorrow yesterday today calendar umbrella envelope elevator vegetable tornado volcano
hurricane potato diamond emerald ruby pearl crystal magnet battery rainbow shadow silence
voice song dance party game puzzle riddle secret treasure pirate captain soldier police
farmer baker painter writer singer dancer pilot sailor hunter king queen prince princess
giant dragon monster robot wizard angel hero hand foot head nose mouth ear eye finger
shoulder elbow knee ankle tooth heart brain stomach blood bone skin hair beard
circle square triangle line point corner edge center middle bottom top side front back
happy sad angry funny quiet loud gentle brave clever lazy busy easy heavy light dark bright
cold warm hot cool dry wet clean dirty empty full early late fast slow young old new
open close begin finish travel visit remember forget imagine discover explore protect
decide create describe listen answer repeat notice follow borrow deliver continue
radio video piano guitar violin trumpet drum ticket basket bucket hammer ladder rope
coin ring necklace bracelet tunnel canal harbor lighthouse meadow prairie jungle canyon
glacier lagoon galaxy universe education information television university celebration
dictionary refrigerator opportunity imagination definition population organization
calculator helicopter motorcycle submarine caterpillar alligator avocado banana
""".split())
WORDS = tuple(dict.fromkeys(w for w in WORDS if 1 <= sum(c in VOWELS for c in w) <= 9))


def vowel_count(word: str) -> int:
    return sum(c in VOWELS for c in word.lower())


def probe_task(words: tuple[str, ...] = WORDS) -> Task:
    """The vowel-counting task: (word, number of vowels as one digit) for every word."""
    return Task(name=PROBE_NAME, pairs=tuple((w, str(vowel_count(w))) for w in words), kind="probe")


def probe_prompts(tokenizer, n: int = 150, k: int = 4, seed: int = 0) -> PromptSet:
    """`n` probe prompts (distinct query words), k demos each; the gold label is never a demo label."""
    return build_prompts(probe_task(), tokenizer, k=k, n=n, seed=seed)


def probe_splits(tokenizer, n_attr: int = 100, n_dev: int = 50, k: int = 4,
                 seed: int = 0) -> tuple[list[ICLPrompt], list[ICLPrompt]]:
    """Attribution and dev prompts whose query words are disjoint (demos come from all words)."""
    full = probe_prompts(tokenizer, n=len(WORDS), k=k, seed=seed)
    prompts = list(full.prompts)
    random.Random(seed + 1).shuffle(prompts)
    if len(prompts) < n_attr + n_dev:
        raise ValueError(f"the probe has {len(prompts)} usable query words for this tokenizer; "
                         f"n_attr + n_dev = {n_attr + n_dev} is too many")
    return prompts[:n_attr], prompts[n_attr:n_attr + n_dev]
