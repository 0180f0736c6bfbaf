"""``sentiment``: short English reviews of films and products, labelled by a stated rule.

A review is a few clauses ``<subject> <verb> <phrase>`` joined by ``and`` / ``but`` / ``.``,
optionally opened by ``honestly ,`` or ``overall ,``, and followed by the prompt
``. the review is``; the label is the next word, ``positive`` or ``negative``. Example::

    the plot was not very good and the camera was new but the ending was dull . the review is
                 ^^^      ^^^^                                            ^^^^    -> negative

Phrases:

* a *polarity phrase* is ``[not | never] [very | really] <polarity adjective>``; its value is the
  adjective's polarity (+1 for a positive word, -1 for a negative word), flipped by the negator.
  A negator is only ever followed by a polarity phrase, so "negation flips the next polarity
  word" and it never reaches further;
* a *neutral phrase* is ``[very | really] <neutral adjective>`` (``long``, ``new``, ...): a distractor.

**Rule.** A review has an odd number of polarity phrases (1 or 3 by default) and any number of
neutral ones (0 to 2); the label is the sign of the sum of the polarity values (the majority).

**Ground truth** (``evidence``): the adjective and the negator (when present) of every polarity
phrase whose value agrees with the label: the words that decide it. Intensifiers, subjects and
neutral phrases are never evidence. The positions of the phrases that argue against the label (in
a 2-to-1 review) are in ``info["opposing"]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mamba_lrp.tasks.base import Task

POSITIVE_WORDS = ("good", "great", "excellent", "wonderful", "brilliant", "amazing", "fun", "charming", "lovely",
                  "superb", "enjoyable", "solid")
NEGATIVE_WORDS = ("bad", "awful", "terrible", "boring", "dull", "poor", "weak", "horrible", "disappointing", "bland",
                  "annoying", "mediocre")
NEUTRAL_WORDS = ("long", "short", "new", "old", "big", "small", "black", "modern", "french", "loud")
NEGATORS = ("not", "never")
INTENSIFIERS = ("very", "really")
SUBJECTS = (("the", "film"), ("the", "movie"), ("the", "plot"), ("the", "acting"), ("the", "ending"),
            ("the", "soundtrack"), ("the", "phone"), ("the", "camera"), ("the", "battery"), ("the", "screen"),
            ("the", "service"), ("this", "product"), ("this", "film"), ("the", "design"))
VERBS = ("was", "is", "felt", "seemed")
JOINERS = (("and",), ("but",), (".",), (",", "and"))
OPENERS = ((), (), ("honestly", ","), ("overall", ","), ("i", "think"))
PROMPT = (".", "the", "review", "is")
ANSWERS = ("positive", "negative")


@dataclass(frozen=True)
class SentimentTask(Task):
    """Reviews with ``polarity_counts`` polarity phrases (odd numbers) and ``min_neutral`` to
    ``max_neutral`` neutral ones; ``negation_rate`` and ``intensifier_rate`` are per phrase."""

    polarity_counts: tuple[int, ...] = (1, 3)
    min_neutral: int = 0
    max_neutral: int = 2
    negation_rate: float = 0.3
    intensifier_rate: float = 0.3

    name = "sentiment"

    def __post_init__(self) -> None:
        counts = tuple(self.polarity_counts)
        if not counts or any(not isinstance(c, int) or c < 1 or c % 2 == 0 for c in counts):
            raise ValueError(f"`polarity_counts` must be odd positive integers, got {self.polarity_counts!r}")
        object.__setattr__(self, "polarity_counts", counts)
        if not 0 <= self.min_neutral <= self.max_neutral:
            raise ValueError(f"need 0 <= min_neutral <= max_neutral, got {self.min_neutral}, {self.max_neutral}")
        for name in ("negation_rate", "intensifier_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)!r}")

    def vocabulary(self) -> list[str]:
        words: list[str] = []
        groups = (POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS, NEGATORS, INTENSIFIERS, VERBS, ANSWERS)
        groups += (tuple(w for s in SUBJECTS for w in s), tuple(w for j in JOINERS for w in j))
        groups += (tuple(w for o in OPENERS for w in o), PROMPT)
        for group in groups:
            for word in group:
                if word not in words:
                    words.append(word)
        return words

    def answers(self) -> list[str]:
        return list(ANSWERS)

    def sample(self, rng: random.Random) -> tuple[list[str], str, list[int], dict[str, Any]]:
        n_polarity = rng.choice(self.polarity_counts)
        n_neutral = rng.randint(self.min_neutral, self.max_neutral)
        kinds = ["polarity"] * n_polarity + ["neutral"] * n_neutral
        rng.shuffle(kinds)
        tokens: list[str] = list(rng.choice(OPENERS))
        phrases: list[tuple[int, list[int]]] = []  # (value, [negator position,] adjective position)
        for index, kind in enumerate(kinds):
            if index:
                tokens += rng.choice(JOINERS)
            tokens += rng.choice(SUBJECTS)
            tokens.append(rng.choice(VERBS))
            if kind == "polarity":
                value, positions = 1, []
                if rng.random() < self.negation_rate:
                    positions.append(len(tokens))
                    tokens.append(rng.choice(NEGATORS))
                    value = -value
                if rng.random() < self.intensifier_rate:
                    tokens.append(rng.choice(INTENSIFIERS))
                positive = rng.random() < 0.5
                positions.append(len(tokens))
                tokens.append(rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS))
                phrases.append((value if positive else -value, positions))
            else:
                if rng.random() < self.intensifier_rate:
                    tokens.append(rng.choice(INTENSIFIERS))
                tokens.append(rng.choice(NEUTRAL_WORDS))
        tokens += PROMPT
        total = sum(value for value, _ in phrases)
        label = "positive" if total > 0 else "negative"
        sign = 1 if total > 0 else -1
        evidence = [p for value, positions in phrases if value == sign for p in positions]
        opposing = [p for value, positions in phrases if value != sign for p in positions]
        return tokens, label, evidence, {"polarity_sum": total, "opposing": opposing}
