"""Recurrent decoding with the conv/SSM state cache equals the full forward at every step."""

from __future__ import annotations

import pytest
import torch

from ssm_models import MambaConfig, MambaLM
from tests.helpers import relative_error


@pytest.mark.parametrize("prompt_length", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_logits_equal_full_forward(prompt_length: int, dtype: torch.dtype) -> None:
    torch.manual_seed(prompt_length)
    model = MambaLM(MambaConfig(d_model=16, n_layer=3, vocab_size=50, d_state=8)).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    prompt = torch.randint(0, 50, (2, prompt_length))
    ids, step_logits = model.generate(prompt, max_new_tokens=8, return_logits=True)
    assert ids.shape == (2, prompt_length + 8)
    assert torch.equal(ids[:, :prompt_length], prompt)
    with torch.no_grad():
        full = model(ids[:, :-1])[:, prompt_length - 1 :]
    assert step_logits.shape == full.shape
    assert relative_error(step_logits, full) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.equal(ids[:, prompt_length:], step_logits[..., :50].argmax(-1))


def test_generate_validates_arguments() -> None:
    model = MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=10))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=-1)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    assert model.generate(torch.ones(1, 2, dtype=torch.long), max_new_tokens=0).shape == (1, 2)
