"""The result of every attribution method: :class:`Explanation`.

An explanation of one sequence holds 1-D tensors ``(L,)``; of a batch, ``(B, L)``. It saves
itself to a directory (``explanation.json`` + ``tensors.safetensors``), loads back, aggregates
subword tokens into words, and says what it is in its ``repr``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_TENSOR_FIELDS = ("relevance", "output", "target", "position", "input_ids", "conservation_error", "layer_sums",
                  "attention_mask")
#: Markers that begin a new word in subword vocabularies: GPT-2 byte-level BPE, SentencePiece, spaces.
WORD_START_MARKERS = ("Ġ", "▁", " ", "Ċ", "\n")


@dataclass
class Explanation:
    """Relevance of each input token for one explained output per sequence.

    Shapes, for ``B`` sequences of length ``L`` (no batch axis when one unbatched sequence was
    explained): ``relevance`` (B, L) float; ``output`` (B,) the explained value ``f`` (the target
    logit at ``position``); ``target``, ``position`` (B,) long; ``input_ids`` (B, L);
    ``conservation_error`` (B,) ``|sum_t R_t - f| / |f|``; ``layer_sums`` (B, n_layer + 1) the
    relevance summed at the input of each block and of the final norm (None for methods without
    layers); ``attention_mask`` (B, L) or None; ``tokens`` the token strings when a tokenizer was known.
    ``layer`` is the block at whose input ``relevance`` was taken (None: the embeddings).
    """

    relevance: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor
    position: torch.Tensor
    method: str
    input_ids: torch.Tensor
    conservation_error: torch.Tensor
    layer_sums: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    tokens: list[str] | list[list[str]] | None = None
    layer: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_batched(self) -> bool:
        return self.relevance.dim() == 2

    def __len__(self) -> int:
        return self.relevance.shape[0] if self.is_batched else 1

    def __getitem__(self, index: int) -> Explanation:
        """The explanation of sequence ``index`` of a batch, unbatched."""
        if not self.is_batched:
            raise IndexError("an unbatched Explanation has no items; it is one sequence")
        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]
        return Explanation(
            relevance=self.relevance[index], output=self.output[index], target=self.target[index],
            position=self.position[index], method=self.method, input_ids=self.input_ids[index],
            conservation_error=self.conservation_error[index], layer_sums=pick(self.layer_sums),
            attention_mask=pick(self.attention_mask), tokens=None if self.tokens is None else self.tokens[index],
            layer=self.layer, extra=dict(self.extra),
        )

    def __repr__(self) -> str:
        shape = "x".join(str(size) for size in self.relevance.shape)
        where = "embeddings" if self.layer is None else f"input of block {self.layer}"
        def short(tensor: torch.Tensor, digits: int = 4) -> str:
            values = tensor.flatten().tolist()
            text = ", ".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in values[:4])
            return f"[{text}{', ...' if len(values) > 4 else ''}]" if tensor.dim() else text
        return (f"Explanation(method={self.method!r}, relevance {shape} at the {where}, "
                f"target={short(self.target)}, position={short(self.position)}, output={short(self.output)}, "
                f"max conservation_error={float(self.conservation_error.max()):.2e})")

    # ---------------------------------------------------------------- display
    def _repr_html_(self) -> str:
        """The HTML token heatmap (:func:`mamba_lrp.viz.html_heatmap`), for notebooks."""
        from mamba_lrp.viz import html_heatmap

        return html_heatmap(self)

    def show(self) -> None:
        """Show the heatmap: HTML in a notebook (IPython), else printed to the terminal."""
        from mamba_lrp.viz import show

        show(self)

    # ------------------------------------------------------------------ words
    def to_words(self) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """Sum the relevance of subword tokens into words.

        When the tokens carry word markers (``Ġ``, ``▁``, a space or newline: byte-level BPE and
        SentencePiece), a token with a marker begins a new word and one without continues the
        current word; WordPiece's ``##`` prefix always continues. Without any marker (word-level
        vocabularies) each token is a word. Returns ``[(word, relevance), ...]`` (one list per
        sequence for a batch). Padding is dropped."""
        if self.tokens is None:
            raise ValueError("to_words() needs token strings: explain with `tokenizer=` to get them")
        if self.is_batched:
            return [self[index].to_words() for index in range(len(self))]
        mask = self.attention_mask.tolist() if self.attention_mask is not None else [1] * len(self.tokens)
        has_markers = any(token.startswith(WORD_START_MARKERS) for token in self.tokens[1:])
        words: list[tuple[str, float]] = []
        for token, score, keep in zip(self.tokens, self.relevance.tolist(), mask, strict=True):
            if not keep:
                continue
            if token.startswith("##"):
                starts_word, token = not words, token[2:]
            else:
                starts_word = not words or not has_markers or token.startswith(WORD_START_MARKERS)
            text = token
            for marker in ("Ġ", "▁"):
                text = text.replace(marker, " ")
            if starts_word:
                words.append((text.strip() or text, score))
            else:
                words[-1] = (words[-1][0] + text, words[-1][1] + score)
        return words

    # -------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Write the explanation to directory ``path`` (created; replaced atomically if it exists)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            tensors = {name: getattr(self, name).detach().cpu().contiguous()
                       for name in _TENSOR_FIELDS if getattr(self, name) is not None}
            save_file(tensors, str(staging / "tensors.safetensors"))
            meta = {"format_version": FORMAT_VERSION, "method": self.method, "tokens": self.tokens,
                    "layer": self.layer, "extra": self.extra}
            (staging / "explanation.json").write_text(json.dumps(meta, indent=1) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return target

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        """Read an explanation written by :meth:`save`."""
        directory = Path(path)
        meta_path, tensor_path = directory / "explanation.json", directory / "tensors.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(
                f"{directory}: not a saved Explanation (expected explanation.json and tensors.safetensors)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported explanation format {meta.get('format_version')!r}")
        tensors = load_file(str(tensor_path))
        return cls(method=meta["method"], tokens=meta["tokens"], layer=meta["layer"], extra=meta.get("extra", {}),
                   **{name: tensors.get(name) for name in _TENSOR_FIELDS})
