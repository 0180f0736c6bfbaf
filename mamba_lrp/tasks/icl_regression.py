"""``icl_regression``: in-context linear regression with quantised (integer) tokens.

Each example draws a hidden line ``y = w * x + b`` (integers ``w`` in ``[-max_slope, max_slope]``,
``b`` in ``[-max_intercept, max_intercept]``), shows ``n_pairs`` points with integer ``x`` in
``[-max_x, max_x]`` (at least two distinct ``x``, so the line is determined), and asks for ``y``
at a query ``x``; the answer is an integer token such as ``-5``::

    x 2 y 5 ; x -1 y -1 ; x 0 y 1 ; x 3 y      -> 7        (w = 2, b = 1)

**Representation.** Numbers are tokens (``"-5"``, ``"0"``, ``"7"``: the pre-tokenizer splits on
whitespace only, so a sign stays with its digits), not vectors through ``inputs_embeds``: the task
then has a tokenizer, runs through the same trainer, batching and ``explain()`` as the others,
and the answer is one of the ``2 * max_number + 1`` number tokens. The price is a small integer range.

**Ground truth** (``evidence``): every in-context ``x`` and ``y`` value token and the query ``x``
value. No single position determines the answer (any two points with distinct ``x`` do, jointly),
so an explanation should spread relevance over the in-context examples rather than peak on one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mamba_lrp.tasks.base import Task

X_MARK, Y_MARK, SEPARATOR = "x", "y", ";"


@dataclass(frozen=True)
class ICLRegressionTask(Task):
    """``min_pairs`` to ``max_pairs`` points of an integer line; see the module docstring."""

    min_pairs: int = 2
    max_pairs: int = 6
    max_x: int = 3
    max_slope: int = 2
    max_intercept: int = 2

    name = "icl_regression"
    pre_tokenizer = "whitespace_split"

    def __post_init__(self) -> None:
        if not 2 <= self.min_pairs <= self.max_pairs:
            raise ValueError(f"need 2 <= min_pairs <= max_pairs, got {self.min_pairs}, {self.max_pairs}")
        for name in ("max_x", "max_slope", "max_intercept"):
            if getattr(self, name) < (1 if name == "max_x" else 0):
                raise ValueError(f"`{name}` is too small: {getattr(self, name)!r}")

    @property
    def max_number(self) -> int:
        """The largest |x| or |y|: number tokens run from ``-max_number`` to ``max_number``."""
        return max(self.max_slope * self.max_x + self.max_intercept, self.max_x)

    def answers(self) -> list[str]:
        return [str(value) for value in range(-self.max_number, self.max_number + 1)]

    def vocabulary(self) -> list[str]:
        return [X_MARK, Y_MARK, SEPARATOR, *self.answers()]  # the answers are every number token

    def sample(self, rng: random.Random) -> tuple[list[str], str, list[int], dict[str, Any]]:
        slope = rng.randint(-self.max_slope, self.max_slope)
        intercept = rng.randint(-self.max_intercept, self.max_intercept)
        n_pairs = rng.randint(self.min_pairs, self.max_pairs)
        while True:
            xs = [rng.randint(-self.max_x, self.max_x) for _ in range(n_pairs)]
            if len(set(xs)) >= 2:
                break
        query = rng.randint(-self.max_x, self.max_x)
        tokens: list[str] = []
        evidence: list[int] = []
        for index, x in enumerate(xs):
            if index:
                tokens.append(SEPARATOR)
            evidence += [len(tokens) + 1, len(tokens) + 3]
            tokens += [X_MARK, str(x), Y_MARK, str(slope * x + intercept)]
        tokens.append(SEPARATOR)
        evidence.append(len(tokens) + 1)
        tokens += [X_MARK, str(query), Y_MARK]
        info = {"slope": slope, "intercept": intercept}
        return tokens, str(slope * query + intercept), evidence, info
