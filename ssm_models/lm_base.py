"""What every language model of ``ssm_models`` shares: input checks, the block loop, the head,
padding masks, greedy decoding with a recurrent cache, saving and loading.

A model subclasses :class:`SequenceLM` and provides

* ``embedding`` (an ``nn.Embedding``), ``blocks`` (an ``nn.ModuleList`` whose items are called as
  ``block(hidden, cache, layer_idx, padding_mask) -> hidden`` with ``hidden`` (B, L, d_model)),
  ``final_norm`` and ``lm_head`` (an ``nn.Linear``, tied to the embedding or not);
* ``new_cache(batch_size)`` and ``step(token_ids, cache) -> logits (B, V)`` for decoding;
* ``config`` with at least ``d_model, n_layer, vocab_size`` and ``architecture``.

``mamba_lrp`` relies on exactly this surface (``embed``, ``hidden_states``, ``head``, ``blocks``,
``final_norm``, ``recompute_blocks``, ``check_input_ids``, ``check_attention_mask``), so an
explanation method written once works on every architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class SequenceLM(nn.Module):
    """Base class of our LMs: ``forward(input_ids=None, *, inputs_embeds=None, attention_mask=None,
    cache=None) -> logits (B, L, V)``."""

    config: Any
    lm_head: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        #: Keep only each block's input for the backward pass and recompute the block's inside
        #: during it (activation memory O(n_layer * B * L * d_model) plus one block's), at the
        #: cost of a second forward. Off by default; ``explain(..., recompute_blocks=True)``.
        self.recompute_blocks = False

    # ------------------------------------------------------- subclass surface
    @property
    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def new_cache(self, batch_size: int) -> Any:
        raise NotImplementedError

    def step(self, token_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ inputs
    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    def check_input_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        """Raise ``ValueError`` unless ``input_ids`` is an integer (B, L) tensor with L >= 1 and
        every id in ``[0, num_embeddings)``."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.LongTensor of shape (batch, L), got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"`{name}` must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"`{name}` must have shape (batch, L), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"`{name}` is empty (shape {tuple(input_ids.shape)}); expected batch >= 1 and L >= 1")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.num_embeddings:
            bad = high if high >= self.num_embeddings else low
            raise ValueError(
                f"`{name}` contains token id {bad}, outside the vocabulary [0, {self.num_embeddings - 1}] of this model"
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, d_model) of ``input_ids`` (B, L)."""
        self.check_input_ids(input_ids)
        return self.embedding(input_ids)

    def check_inputs_embeds(self, inputs_embeds: torch.Tensor) -> None:
        expected = self.config.d_model
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise ValueError("`inputs_embeds` must be a floating-point tensor of shape (batch, L, d_model)")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != expected:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, L, d_model={expected}), got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"`inputs_embeds` is empty (shape {tuple(inputs_embeds.shape)}); expected batch, L >= 1")

    @staticmethod
    def check_attention_mask(attention_mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Validate a 0/1 ``attention_mask`` of ``shape`` (B, L); return it as a bool tensor."""
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(shape):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"`attention_mask` must be a tensor of shape {tuple(shape)} (batch, L), got {got}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (real token)")
        mask = attention_mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("`attention_mask` has a row with no real token (all zeros)")
        return mask

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Logits (B, L, V) of ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, d_model), in
        float32 (float64 for float64 models): ``head(hidden_states(...))``.

        ``attention_mask`` (B, L) of 0/1 marks padding (left or right): each real position gets
        the logits it gets without the padding. With ``cache`` (see :meth:`new_cache`), the final
        recurrent states are stored for :meth:`step`."""
        return self.head(
            self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache)
        )

    def input_hidden(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The checked embeddings (B, L, d_model) from exactly one of the two inputs."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            return self.embed(input_ids)
        self.check_inputs_embeds(inputs_embeds)
        return inputs_embeds

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """The final hidden states (B, L, d_model), after the final norm and before the head. Use
        it with :meth:`head` when logits are needed at a few positions only."""
        hidden = self.input_hidden(input_ids, inputs_embeds)
        padding_mask = None
        if attention_mask is not None:
            padding_mask = self.check_attention_mask(attention_mask, hidden.shape[:2])
        return self.final_norm(self.run_blocks(hidden, padding_mask, cache))

    def run_blocks(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        """``hidden`` (B, L, d_model) through every block, recomputed in the backward pass when
        ``recompute_blocks`` is set (and gradients are on, and no cache is filled)."""
        recompute = self.recompute_blocks and torch.is_grad_enabled() and cache is None
        for index, block in enumerate(self.blocks):
            if recompute:
                hidden = checkpoint(block, hidden, None, index, padding_mask, use_reentrant=False)
            else:
                hidden = block(hidden, cache, index, padding_mask)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final hidden states (..., d_model), in float32 (float64 for float64
        models)."""
        weight = self.lm_head.weight
        logits = self.lm_head(hidden.to(weight.dtype))
        return logits.to(torch.promote_types(weight.dtype, torch.float32))

    # -------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with the recurrent state cache.

        ``input_ids`` (B, L) -> ids (B, L + max_new_tokens). With ``return_logits``, also the
        logits (B, max_new_tokens, V) from which each new token was chosen; step ``k``'s logits
        equal the full forward's logits at position ``L - 1 + k``. Tokens are chosen among the
        ``config.vocab_size`` real ids (padding rows of the vocabulary are never produced).
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be a non-negative integer, got {max_new_tokens!r}")
        self.check_input_ids(input_ids)
        if max_new_tokens == 0:
            empty = torch.empty(input_ids.shape[0], 0, self.num_embeddings)
            return (input_ids, empty) if return_logits else input_ids
        cache = self.new_cache(input_ids.shape[0])
        logits = self.head(self.hidden_states(input_ids, cache=cache)[:, -1])
        tokens, step_logits = [], []
        for index in range(max_new_tokens):
            step_logits.append(logits)
            next_token = logits[:, : self.config.vocab_size].argmax(-1)
            tokens.append(next_token)
            if index + 1 < max_new_tokens:
                logits = self.step(next_token, cache)
        ids = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
        return (ids, torch.stack(step_logits, dim=1)) if return_logits else ids

    # --------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically); see
        :func:`ssm_models.loading.save_pretrained`."""
        from ssm_models.loading import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, **kwargs: Any) -> SequenceLM:
        """Load with :func:`ssm_models.loading.load_pretrained`; the checkpoint must hold a ``cls``."""
        from ssm_models.loading import load_pretrained

        model = load_pretrained(path_or_hub_id, **kwargs)
        if not isinstance(model, cls):
            raise ValueError(f"{path_or_hub_id} holds a {type(model).__name__}, not a {cls.__name__}")
        return model
