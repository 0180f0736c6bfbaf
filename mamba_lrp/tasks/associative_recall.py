"""``associative_recall``: key-value pairs, then a query key; the answer is the key's value.

Keys are letters (``a``, ``b``, ...), values digit words (``0``, ``1``, ...). An example with
``n_pairs`` pairs (distinct keys, values drawn with repetition) is::

    c 7 a 3 f 0 e 1 ? a      -> 3
      .   ^ ^         .

**Ground truth** (``evidence``): the positions of the matching key and its value (``a`` and ``3``
above). The query key at the end is the explained position itself and is not evidence. The other
keys never equal the query, so the evidence is unambiguous; a value digit may appear for other keys.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from mamba_lrp.tasks.base import Task

QUERY_MARK = "?"


@dataclass(frozen=True)
class AssociativeRecallTask(Task):
    """``min_pairs`` to ``max_pairs`` pairs over ``n_keys`` letter keys and ``n_values`` digit values."""

    n_keys: int = 16
    n_values: int = 10
    min_pairs: int = 4
    max_pairs: int = 8

    name = "associative_recall"

    def __post_init__(self) -> None:
        if not 1 <= self.n_keys <= 26:
            raise ValueError(f"`n_keys` must be in [1, 26], got {self.n_keys!r}")
        if not 1 <= self.n_values <= 10:
            raise ValueError(f"`n_values` must be in [1, 10], got {self.n_values!r}")
        if not 1 <= self.min_pairs <= self.max_pairs <= self.n_keys:
            raise ValueError(
                f"need 1 <= min_pairs <= max_pairs <= n_keys, got {self.min_pairs}, {self.max_pairs}, {self.n_keys}"
            )

    def keys(self) -> list[str]:
        return list(string.ascii_lowercase[: self.n_keys])

    def answers(self) -> list[str]:
        return [str(value) for value in range(self.n_values)]

    def vocabulary(self) -> list[str]:
        return self.keys() + self.answers() + [QUERY_MARK]

    def sample(self, rng: random.Random) -> tuple[list[str], str, list[int], dict[str, Any]]:
        n_pairs = rng.randint(self.min_pairs, self.max_pairs)
        keys = rng.sample(self.keys(), n_pairs)
        values = [rng.choice(self.answers()) for _ in keys]
        match = rng.randrange(n_pairs)
        tokens = [token for pair in zip(keys, values, strict=True) for token in pair] + [QUERY_MARK, keys[match]]
        return tokens, values[match], [2 * match, 2 * match + 1], {"query": keys[match], "pair_index": match}
