"""Three synthetic skills, each a prompt and an answer ended by a newline.

- ``add``:  ``12+34=46`` (two-digit operands; three-digit did not train in the time budget)
- ``rev``:  ``rev:abc=cba``
- ``sort``: ``sort:cab=abc``

A fixed, seed-independent set of test prompts per skill is drawn first and excluded from every
training draw, so exact match is measured on prompts never seen in pretraining or fine-tuning.
Training rows pack examples back to back, each starting a line, with a mask that marks the
answer bytes (and the newline that ends them) for answer-only loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

SKILLS = ("add", "rev", "sort")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 3, 6
TEST_SEED = 1234


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", f"{a + b}"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _rev(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"rev:{w}=", w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"sort:{w}=", "".join(sorted(w))


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"add": _add, "rev": _rev, "sort": _sort}


def distinct_pairs(draw: Callable[[random.Random], tuple[str, str]], rng: random.Random,
                   n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs from ``draw`` with distinct prompts, in draw order."""
    seen: dict[str, str] = {}
    while len(seen) < n:
        p, a = draw(rng)
        seen.setdefault(p, a)
    return list(seen.items())


def test_set(skill: str, n: int) -> list[tuple[str, str]]:
    """``n`` distinct held-out (prompt, answer) pairs, the same on every run and seed."""
    return distinct_pairs(GENERATORS[skill], random.Random(f"{TEST_SEED}-{skill}"), n)


class SkillSampler:
    """Draws training examples of the given skills, never a held-out test prompt."""

    def __init__(self, skills: tuple[str, ...], held_out: set[str], seed: int) -> None:
        self.skills = skills
        self.held_out = held_out
        self.rng = random.Random(seed)

    def example(self) -> tuple[str, str]:
        skill = self.rng.choice(self.skills)
        while True:
            p, a = GENERATORS[skill](self.rng)
            if p not in self.held_out:
                return p, a

    def row(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed row of ``length`` byte ids and its answer mask (1 on answer bytes and newline)."""
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < length:
            p, a = self.example()
            pb, ab = p.encode(), (a + "\n").encode()
            ids += list(pb) + list(ab)
            mask += [0] * len(pb) + [1] * len(ab)
        return torch.tensor(ids[:length]), torch.tensor(mask[:length])

    def batch(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(length) for _ in range(n)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def held_out_prompts(n: int) -> set[str]:
    """All test prompts of all skills (excluded from every training draw)."""
    return {p for s in SKILLS for p, _ in test_set(s, n)}
