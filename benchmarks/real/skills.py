"""The skills the experts learn: short prompts with one exact answer, generated from a seed.

Each skill is something SmolLM2-135M-Instruct does poorly (measured: see ``README.md``) and a
135M model learns within a few dozen full-parameter steps. Training and test prompts come from
disjoint generator streams and the test set is fixed (seed independent), so every seed of the
experiment is graded on the same prompts and no test prompt is ever trained on.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from benchmarks.quality.skills import distinct_pairs

SYSTEM = "Answer with the result only."
LETTERS = string.ascii_lowercase


def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(5)]
    return f"Reverse the order of these letters: {' '.join(letters)}", " ".join(reversed(letters))


def _shift(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(LETTERS[:-1]) for _ in range(4)]
    shifted = [LETTERS[LETTERS.index(c) + 1] for c in letters]
    return (f"Replace each letter by the next letter of the alphabet: {' '.join(letters)}",
            " ".join(shifted))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} + {b}?", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(10, 100), 5)
    return f"Sort from smallest to largest: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "shift": _shift, "add": _add, "sort": _sort,
}
TEST_SEED = 1_000_003


def test_set(skill: str, n: int) -> list[tuple[str, str]]:
    """The fixed held-out prompts of ``skill`` (the same for every seed), without duplicates."""
    return distinct_pairs(SKILLS[skill], random.Random(f"{skill}/{TEST_SEED}"), n)


def training_stream(skill: str, seed: int, exclude: set[str]) -> Callable[[], tuple[str, str]]:
    """An endless source of training pairs for ``skill``, never a prompt in ``exclude``."""
    rng = random.Random(f"{skill}/train/{seed}")

    def draw() -> tuple[str, str]:
        while True:
            prompt, answer = SKILLS[skill](rng)
            if prompt not in exclude:
                return prompt, answer
    return draw
