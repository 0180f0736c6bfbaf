"""``needle``: a fact hidden at a random depth in long distractor text; the question at the end.

The haystack is a sequence of short English sentences (``the sky was grey .``, ``we walked to
the station .``) and of *distractor facts* about other things (``the door is 4 .``); the needle
``the code is 7 .`` sits at a random sentence boundary (uniform depth); the input ends with
``what is the code ?`` and the answer is the code's digit::

    we walked home . the door is 4 . the code is 7 . the sky was grey . what is the code ?   -> 7
                                     ^^^ ^^^^ ^^ ^

The total length is drawn uniformly from ``[min_length, max_length]`` tokens (any length from 12
on; 4096 and more work) and is met exactly (the haystack has sentences of 2 and 3 tokens too).

**Ground truth** (``evidence``): the needle's four tokens ``the code is 7`` (not its period).
Distractor facts use other nouns and any digit, so the digit alone does not find the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mamba_lrp.tasks.base import Task

FILLER_SENTENCES = tuple(sentence.split() for sentence in (
    "the sky was grey .", "we walked to the station .", "it rained all night .", "the tea was hot .",
    "she read a book by the window .", "the train left late .", "birds sang in the garden .",
    "he fixed the old bike .", "the market was busy today .", "they painted the fence green .",
    "the river runs past the town .", "a cat slept on the chair .", "we had soup for dinner .",
    "the wind moved the trees .", "the shop opens at noon .", "children played in the park .",
    "the lamp was on .", "snow fell .", "we waited .", "it was quiet .", "ok .", "yes .", "then silence .",
))
DISTRACTOR_NOUNS = ("door", "room", "floor", "gate", "page", "box")
DIGITS = tuple(str(digit) for digit in range(10))
QUESTION = ("what", "is", "the", "code", "?")
NEEDLE_LENGTH = 5  # "the code is 7 ."


@dataclass(frozen=True)
class NeedleTask(Task):
    """Inputs of ``min_length`` to ``max_length`` tokens; ``distractor_rate``: the chance that a
    haystack sentence is a distractor fact (``the door is 4 .``)."""

    min_length: int = 32
    max_length: int = 128
    distractor_rate: float = 0.15

    name = "needle"

    def __post_init__(self) -> None:
        shortest = NEEDLE_LENGTH + len(QUESTION) + 2
        if not shortest <= self.min_length <= self.max_length:
            raise ValueError(
                f"need {shortest} <= min_length <= max_length, got {self.min_length}, {self.max_length}"
            )
        if not 0.0 <= self.distractor_rate <= 1.0:
            raise ValueError(f"`distractor_rate` must be in [0, 1], got {self.distractor_rate!r}")

    def answers(self) -> list[str]:
        return list(DIGITS)

    def vocabulary(self) -> list[str]:
        words: list[str] = []
        for sentence in (*FILLER_SENTENCES, DISTRACTOR_NOUNS, DIGITS, QUESTION):
            for word in sentence:
                if word not in words:
                    words.append(word)
        return words

    def _haystack(self, rng: random.Random, size: int) -> list[list[str]]:
        """Sentences totalling exactly ``size`` tokens (``size`` != 1)."""
        sentences: list[list[str]] = []
        remaining = size
        while remaining > 0:
            if rng.random() < self.distractor_rate and remaining - 5 != 1 and remaining >= 5:
                sentences.append(["the", rng.choice(DISTRACTOR_NOUNS), "is", rng.choice(DIGITS), "."])
            else:
                fits = [s for s in FILLER_SENTENCES if len(s) <= remaining and remaining - len(s) != 1]
                sentences.append(list(rng.choice(fits)))
            remaining -= len(sentences[-1])
        return sentences

    def sample(self, rng: random.Random) -> tuple[list[str], str, list[int], dict[str, Any]]:
        length = rng.randint(self.min_length, self.max_length)
        size = length - NEEDLE_LENGTH - len(QUESTION)
        if size == 1:  # no haystack of one token: take one more or one less
            size = 2 if length < self.max_length else 0
        haystack = self._haystack(rng, size)
        depth = rng.randint(0, len(haystack))
        code = rng.choice(DIGITS)
        before = [word for sentence in haystack[:depth] for word in sentence]
        after = [word for sentence in haystack[depth:] for word in sentence]
        tokens = before + ["the", "code", "is", code, "."] + after + list(QUESTION)
        start = len(before)
        info = {"depth": start / max(len(tokens) - len(QUESTION) - NEEDLE_LENGTH, 1), "needle_start": start}
        return tokens, code, [start, start + 1, start + 2, start + 3], info
