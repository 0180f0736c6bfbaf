"""``flip_flop``: the flip-flop language (Liu et al., "Exposing Attention Glitches with Flip-Flop
Language Modeling", NeurIPS 2023), with a single read at the end.

A sequence is instruction-bit pairs: ``w b`` writes bit ``b`` to a one-bit memory, ``i b``
is ignored; it starts with a write and ends with the read instruction ``r``, whose answer is the
bit of the *last* write::

    w 1 i 0 i 1 w 0 i 1 i 1 r     -> 0
                ^ ^

There are no intermediate reads (a read would repeat the bit and blur the ground truth).

**Ground truth** (``evidence``): the positions of the last ``w`` and its bit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mamba_lrp.tasks.base import Task

WRITE, IGNORE, READ = "w", "i", "r"
BITS = ("0", "1")


@dataclass(frozen=True)
class FlipFlopTask(Task):
    """``min_instructions`` to ``max_instructions`` instruction-bit pairs (the first a write), each
    later one a write with probability ``write_rate``; length ``2 * n + 1`` tokens."""

    min_instructions: int = 8
    max_instructions: int = 24
    write_rate: float = 0.2

    name = "flip_flop"

    def __post_init__(self) -> None:
        if not 1 <= self.min_instructions <= self.max_instructions:
            raise ValueError(
                f"need 1 <= min_instructions <= max_instructions, got {self.min_instructions}, {self.max_instructions}"
            )
        if not 0.0 <= self.write_rate <= 1.0:
            raise ValueError(f"`write_rate` must be in [0, 1], got {self.write_rate!r}")

    def answers(self) -> list[str]:
        return list(BITS)

    def vocabulary(self) -> list[str]:
        return [WRITE, IGNORE, READ, *BITS]

    def sample(self, rng: random.Random) -> tuple[list[str], str, list[int], dict[str, Any]]:
        n = rng.randint(self.min_instructions, self.max_instructions)
        tokens: list[str] = []
        last_write = 0
        for index in range(n):
            write = index == 0 or rng.random() < self.write_rate
            if write:
                last_write = len(tokens)
            tokens += [WRITE if write else IGNORE, rng.choice(BITS)]
        tokens.append(READ)
        return tokens, tokens[last_write + 1], [last_write, last_write + 1], {"n_instructions": n}
