"""What every built-in task shares: :class:`Example`, the :class:`Task` base class, the word-level
tokenizer, the train/test split rule and batching.

A task is a *seeded generator* of examples with a known answer and known evidence:

* ``tokens`` / ``input_ids`` (L,): the input, which ends where the answer is to be predicted;
* ``label`` / ``label_id``: the answer, always one token of the task's vocabulary, so that any LM
  is a classifier by its logits at the last position (``logits[:, -1]``, argmax over the whole
  vocabulary);
* ``evidence``: the ground-truth positions (indices into the L tokens) that determine the label.

**Splits.** ``train`` and ``test`` are drawn from the same distribution and are disjoint: an
example belongs to ``test`` exactly when the MD5 of its text is 0 modulo 5 (a fifth of the space),
and each split's generator rejects the other split's examples. ``examples(split, n, seed)`` is a
pure function of its arguments: ``random.Random(f"{task}/{split}/{seed}")`` (string seeds are
hashed with SHA-512 by Python, so they do not depend on ``PYTHONHASHSEED``).

**Tokenizer.** A Hugging Face ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model:
``[PAD]`` = 0, ``[UNK]`` = 1, then the task's vocabulary in its fixed order; a whitespace
pre-tokenizer (``Whitespace``: words and runs of punctuation, so ``"great."`` is two tokens; or
``WhitespaceSplit`` for tasks whose tokens mix signs and digits, such as ``"-2"``); no special
tokens are added; padding on the left, so that the last position of a padded batch is every
example's last real token. ``task.save_tokenizer(dir)`` writes files that
``transformers.AutoTokenizer.from_pretrained(dir)`` loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)
SPLITS = ("train", "test")
TEST_BUCKETS = 5  # one bucket of five is the test split
PRE_TOKENIZERS = ("whitespace", "whitespace_split")


@dataclass(frozen=True)
class Example:
    """One example of a task.

    ``tokens`` and ``input_ids``: (L,) the input; ``label`` / ``label_id``: the answer token to be
    predicted after the last input token; ``evidence``: sorted ground-truth positions in [0, L);
    ``info``: task-specific details (e.g. the query key, the needle's depth).
    """

    tokens: tuple[str, ...]
    input_ids: tuple[int, ...]
    label: str
    label_id: int
    evidence: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        """The input as text: the tokens joined by single spaces (the tokenizer maps it back)."""
        return " ".join(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def evidence_mask(self) -> torch.Tensor:
        """(L,) bool: True at the ground-truth positions."""
        mask = torch.zeros(len(self.tokens), dtype=torch.bool)
        mask[list(self.evidence)] = True
        return mask


def text_bucket(tokens: Sequence[str]) -> int:
    """The split bucket in [0, TEST_BUCKETS) of a token sequence: MD5 of its text (stable across runs)."""
    digest = hashlib.md5(" ".join(tokens).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % TEST_BUCKETS


def split_of(tokens: Sequence[str]) -> str:
    """``"test"`` for bucket 0, else ``"train"``."""
    return "test" if text_bucket(tokens) == 0 else "train"


def build_tokenizer(vocabulary: Sequence[str], pre_tokenizer: str = "whitespace"):
    """A ``PreTrainedTokenizerFast`` with ids ``[PAD]`` 0, ``[UNK]`` 1, then ``vocabulary`` in order.

    Raises ``ValueError`` for repeated words or words that the pre-tokenizer would split.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if pre_tokenizer not in PRE_TOKENIZERS:
        raise ValueError(f"`pre_tokenizer` must be one of {PRE_TOKENIZERS}, got {pre_tokenizer!r}")
    words = list(SPECIAL_TOKENS) + list(vocabulary)
    if len(set(words)) != len(words):
        repeated = sorted({word for word in words if words.count(word) > 1})
        raise ValueError(f"the vocabulary repeats words: {repeated}")
    splitter = pre_tokenizers.Whitespace() if pre_tokenizer == "whitespace" else pre_tokenizers.WhitespaceSplit()
    for word in vocabulary:
        pieces = [piece for piece, _ in splitter.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(f"the {pre_tokenizer} pre-tokenizer splits the vocabulary word {word!r} into {pieces}")
    model = models.WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token=UNK_TOKEN)
    backend = Tokenizer(model)
    backend.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, with ``tokenizer_class`` written as
    ``PreTrainedTokenizerFast`` (the name every ``transformers`` version >= 4 resolves; version 5
    writes its own alias ``TokenizersBackend``, which older versions do not know)."""
    tokenizer.save_pretrained(str(directory))
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


class Task:
    """A seeded generator of examples with a known answer and ground-truth positions.

    Subclasses are dataclasses whose fields are the task's options; they set ``name`` and
    ``pre_tokenizer`` and implement :meth:`vocabulary`, :meth:`answers` and :meth:`sample`.
    """

    name: ClassVar[str] = ""
    pre_tokenizer: ClassVar[str] = "whitespace"

    # ------------------------------------------------------------------ to implement
    def vocabulary(self) -> list[str]:
        """Every word of the task (answers included, special tokens excluded), in a fixed order."""
        raise NotImplementedError

    def answers(self) -> list[str]:
        """The possible labels, each a word of :meth:`vocabulary`."""
        raise NotImplementedError

    def sample(self, rng: random.Random) -> tuple[list[str], str, list[int], dict[str, Any]]:
        """One raw example from ``rng``: ``(tokens, label, evidence positions, info)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def options(self) -> dict[str, Any]:
        """The task's options (its dataclass fields), enough to rebuild it with :func:`get_task`."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def tokenizer(self):
        """The task's ``PreTrainedTokenizerFast`` (built once per task object)."""
        cached = self.__dict__.get("_tokenizer")
        if cached is None:
            cached = build_tokenizer(self.vocabulary(), self.pre_tokenizer)
            self.__dict__["_tokenizer"] = cached
        return cached

    def save_tokenizer(self, directory: str | Path) -> None:
        """Write the tokenizer's files to ``directory`` (see :func:`save_tokenizer`)."""
        save_tokenizer(self.tokenizer(), directory)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(SPECIAL_TOKENS) + len(self.vocabulary())

    def token_to_id(self) -> dict[str, int]:
        cached = self.__dict__.get("_token_to_id")
        if cached is None:
            cached = {word: index for index, word in enumerate(list(SPECIAL_TOKENS) + self.vocabulary())}
            self.__dict__["_token_to_id"] = cached
        return cached

    def answer_ids(self) -> list[int]:
        """Token ids of :meth:`answers`."""
        lookup = self.token_to_id()
        return [lookup[answer] for answer in self.answers()]

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens`` (``[UNK]`` for unknown words); the same as the tokenizer on the joined text."""
        lookup = self.token_to_id()
        return [lookup.get(token, lookup[UNK_TOKEN]) for token in tokens]

    def make_example(self, tokens: Sequence[str], label: str, evidence: Sequence[int],
                     info: dict[str, Any] | None = None) -> Example:
        lookup = self.token_to_id()
        unknown = sorted({token for token in list(tokens) + [label] if token not in lookup})
        if unknown:
            raise ValueError(f"task {self.name!r}: words outside the vocabulary: {unknown}")
        return Example(tokens=tuple(tokens), input_ids=tuple(self.encode(tokens)), label=label,
                       label_id=lookup[label], evidence=tuple(sorted(evidence)), info=dict(info or {}))

    def stream(self, split: str, seed: int = 0) -> Iterator[Example]:
        """An endless, reproducible stream of ``split`` examples for ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        while True:
            tokens, label, evidence, info = self.sample(rng)
            if split_of(tokens) == split:
                yield self.make_example(tokens, label, evidence, info)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """The first ``n`` examples of ``stream(split, seed)``."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"`n` must be a non-negative integer, got {n!r}")
        stream = self.stream(split, seed)
        return [next(stream) for _ in range(n)]

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({options})"


def collate(examples: Sequence[Example], pad_id: int = 0, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Pad ``examples`` into a batch.

    Returns ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long (1 = real token),
    ``labels`` (B,) long and ``evidence_mask`` (B, L) bool. With ``padding_side="left"`` (the
    default) position ``-1`` is every example's last real token.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise ValueError("`examples` is empty")
    length = max(len(example) for example in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    evidence = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        size = len(example)
        start = length - size if padding_side == "left" else 0
        ids[row, start:start + size] = torch.tensor(example.input_ids, dtype=torch.long)
        mask[row, start:start + size] = 1
        evidence[row, [start + position for position in example.evidence]] = True
    labels = torch.tensor([example.label_id for example in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "evidence_mask": evidence}
