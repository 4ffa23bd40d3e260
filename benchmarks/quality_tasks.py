"""The quality benchmark's tasks: six instruction-style tasks made by code with fixed seeds.

Each task draws prompts from its own generator; a prompt appears in one split only (train,
validation or test), so the test split holds prompts no adapter saw. Answers are short (one to
five words) and exact: a prediction counts when every answer token and the end-of-text token
are right.

| task | prompt | answer |
|---|---|---|
| ``reverse`` | ``Reverse the words: red fox sky`` | ``sky fox red`` |
| ``sort`` | ``Sort the numbers: 42 7 19`` | ``7 19 42`` |
| ``add`` | ``Add the numbers: 37 + 45`` | ``82`` |
| ``shift`` | ``Shift each letter forward by one: c f a`` | ``d g b`` |
| ``count`` | ``Count the words: cup pen key map`` | ``4`` |
| ``category`` | ``Name the category of the word: banana`` | ``fruit`` |
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

__all__ = ["TASKS", "Example", "make_splits"]

WORDS = ("red fox sky cup pen key map sun car hat dog box egg ice jar kit leg mud net oak pig "
         "rat sea tea toy van web zoo arm bed bus cow day ear fan gum hen ink jam lip log mat").split()

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum melon kiwi apricot lime papaya".split(),
    "animal": "horse tiger zebra rabbit monkey donkey camel wolf bear lion sheep goat mouse eagle whale".split(),
    "color": "purple yellow green blue brown pink violet crimson scarlet indigo beige maroon teal amber navy".split(),
    "tool": ("hammer wrench saw drill chisel shovel rake screwdriver pliers axe spanner trowel ladder file "
             "clamp").split(),
    "country": ("france spain italy germany japan china brazil canada egypt india kenya mexico peru norway "
                "chile").split(),
}


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 4))
    return f"Sort the numbers: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"Add the numbers: {a} + {b}", str(a + b)


def _shift(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(string.ascii_lowercase[:-1], 3)
    return (f"Shift each letter forward by one: {' '.join(letters)}",
            " ".join(chr(ord(c) + 1) for c in letters))


def _count(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 7))
    return f"Count the words: {' '.join(words)}", str(len(words))


def _category(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(sorted(CATEGORIES))
    return f"Name the category of the word: {rng.choice(CATEGORIES[name])}", name


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "sort": _sort, "add": _add, "shift": _shift, "count": _count, "category": _category,
}


def _category_splits(rng: random.Random, sizes: tuple[int, int, int]) -> list[list[Example]]:
    """The category task has 75 words, split 45 / 12 / 18 between train, validation and test:
    test words are never trained on, so the task measures what the model knows of the
    categories once it has learned the format. Train cycles through its words; validation and
    test use each of theirs once (at most ``sizes[i]``)."""
    pairs = [(w, c) for c, ws in sorted(CATEGORIES.items()) for w in ws]
    rng.shuffle(pairs)
    words = (pairs[:45], pairs[45:57], pairs[57:])
    out = []
    for i, (n, chunk) in enumerate(zip(sizes, words)):
        chosen = [chunk[j % len(chunk)] for j in range(n)] if i == 0 else chunk[:n]
        out.append([Example("category", f"Name the category of the word: {w}", c) for w, c in chosen])
    return out


def make_splits(train: int, validation: int, test: int, seed: int = 0) -> dict[str, list[Example]]:
    """``{"train", "validation", "test"}``: per task ``train`` / ``validation`` / ``test`` examples
    with no prompt in two splits; the same seed gives the same splits."""
    sizes = (train, validation, test)
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for t, (name, make) in enumerate(TASKS.items()):
        rng = random.Random(seed * 1000 + t)
        if name == "category":
            parts = _category_splits(rng, sizes)
        else:
            seen: set[str] = set()
            parts = []
            for n in sizes:
                part = []
                while len(part) < n:
                    prompt, answer = make(rng)
                    if prompt not in seen:
                        seen.add(prompt)
                        part.append(Example(name, prompt, answer))
                parts.append(part)
        for key, part in zip(splits, parts):
            splits[key] += part
    return splits
