"""MambaLRP on H3 and B'MOJO (issue #4 acceptance): conservation in float64 with every bias zeroed,
over random configs and seeds, with and without attention layers; ``gradient_x_input`` misses; and
``explain()`` works unchanged with ``layer=k``, padding and batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mamba_lrp import explain
from ssm_models import H3LM, BMojoConfig, BMojoLM, H3Config
from ssm_models.lm_base import SequenceLM

VOCAB = 37


@torch.no_grad()
def randomised_without_biases(model: SequenceLM, seed: int) -> SequenceLM:
    """Float64; every weight randomised (norm weights, skips, SSM parameters too), every bias zeroed
    except Mamba's ``dt_proj.bias``, which sits inside the SSM's (detached) step size."""
    generator = torch.Generator().manual_seed(seed + 1000)
    model = model.double().eval()
    for name, parameter in model.named_parameters():
        if name.endswith("dt_proj.bias"):
            continue
        if name.endswith("bias"):
            parameter.zero_()
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_f.weight", "norm_f.weight")):
            parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def h3(seed: int, attention: bool, head_dim: int = 1) -> SequenceLM:
    torch.manual_seed(seed)
    config = H3Config(d_model=16, n_layer=3, vocab_size=VOCAB, d_state=8, head_dim=head_dim,
                      attn_layer_idx=(1,) if attention else (), n_head=2)
    return randomised_without_biases(H3LM(config), seed)


def bmojo(seed: int, variant: str, attention: bool = True) -> SequenceLM:
    torch.manual_seed(seed)
    config = BMojoConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4, n_head=2, window=8,
                         n_memory_tokens=2, eidetic_per_chunk=2, eidetic_budget=6, variant=variant,
                         use_attention=attention)
    return randomised_without_biases(BMojoLM(config), seed)


BUILDERS: dict[str, Callable[[int], SequenceLM]] = {
    "h3": lambda seed: h3(seed, attention=False),
    "h3+attention": lambda seed: h3(seed, attention=True),
    "h3 head_dim 2 +attention": lambda seed: h3(seed, attention=True, head_dim=2),
    "bmojo_f": lambda seed: bmojo(seed, "bmojo_f"),
    "bmojo": lambda seed: bmojo(seed, "bmojo"),
}
CASES = [(name, seed, batch, length) for name in BUILDERS
         for seed, batch, length in ((0, 1, 7), (1, 3, 64), (2, 1, 256))]


@pytest.mark.parametrize(("name", "seed", "batch", "length"), CASES)
def test_mamba_lrp_conserves_on_every_architecture(name: str, seed: int, batch: int, length: int) -> None:
    model = BUILDERS[name](seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    explanation = explain(model, ids)
    n_layer = model.config.n_layer
    assert float(explanation.conservation_error.max()) <= 1e-6, explanation.conservation_error
    assert explanation.layer_sums.shape == (batch, n_layer + 1)
    assert torch.allclose(explanation.layer_sums, explanation.output[:, None].expand(-1, n_layer + 1),
                          rtol=1e-6, atol=0)
    plain = explain(model, ids, target=explanation.target, method="gradient_x_input")
    assert float(plain.conservation_error.min()) > 1e-3


@pytest.mark.parametrize("name", ["h3+attention", "bmojo"])
def test_attn_lrp_option_runs_and_keeps_the_output(name: str) -> None:
    model = BUILDERS[name](3)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    default = explain(model, ids)
    attn_lrp = explain(model, ids, target=default.target, method="mamba_lrp_attnlrp")
    torch.testing.assert_close(attn_lrp.output, default.output)
    assert torch.isfinite(attn_lrp.relevance).all()
    assert not torch.allclose(attn_lrp.relevance, default.relevance)  # queries and keys now get relevance


@pytest.mark.parametrize("name", ["h3+attention", "bmojo"])
def test_padding_batches_and_layers(name: str) -> None:
    model = BUILDERS[name](4)
    generator = torch.Generator().manual_seed(4)
    short = torch.randint(1, VOCAB, (13,), generator=generator)
    long = torch.randint(1, VOCAB, (21,), generator=generator)
    alone = [explain(model, sequence, target=4) for sequence in (short, long)]
    left = torch.zeros(2, 21, dtype=torch.long)
    left[0, 8:], left[1] = short, long
    left_mask = (torch.arange(21)[None] >= torch.tensor([[8], [0]])).long()
    right = torch.zeros(2, 21, dtype=torch.long)
    right[0, :13], right[1] = short, long
    right_mask = (torch.arange(21)[None] < torch.tensor([[13], [21]])).long()
    for ids, mask, offset in ((left, left_mask, 8), (right, right_mask, 0)):
        batch = explain(model, ids, target=4, attention_mask=mask)
        torch.testing.assert_close(batch.relevance[0, offset: offset + 13], alone[0].relevance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batch.relevance[1], alone[1].relevance, rtol=1e-9, atol=1e-12)
        assert bool((batch.relevance[0][mask[0] == 0] == 0).all())
        torch.testing.assert_close(batch.output, torch.stack([alone[0].output, alone[1].output]))
    for layer in range(model.config.n_layer + 1):
        at_layer = explain(model, long, layer=layer)
        assert at_layer.layer == layer
        torch.testing.assert_close(at_layer.relevance.sum(), at_layer.output, rtol=1e-6, atol=0)
