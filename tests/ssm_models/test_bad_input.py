"""Bad input gives a ValueError that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from ssm_models import MambaConfig, MambaLM
from ssm_models.ops import causal_conv1d, selective_scan


def scan_inputs(batch: int = 1, dim: int = 4, n: int = 2, length: int = 5) -> dict[str, torch.Tensor]:
    return {
        "u": torch.randn(batch, dim, length),
        "delta": torch.randn(batch, dim, length),
        "A": -torch.rand(dim, n),
        "B": torch.randn(batch, n, length),
        "C": torch.randn(batch, n, length),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"u": torch.randn(4, 5)}, "`u` must have shape"),
        ({"delta": torch.randn(1, 4, 6)}, "`delta` must have the shape"),
        ({"A": torch.randn(3, 2)}, "`A` must have shape"),
        ({"B": torch.randn(1, 3, 5)}, "`B` must have shape"),
        ({"C": torch.randn(1, 3, 2, 5)}, "`C` has G=3 groups"),
        ({"D": torch.randn(5)}, "`D` must have shape"),
        ({"z": torch.randn(1, 4, 4)}, "`z` must have the shape"),
        ({"delta_bias": torch.randn(4, 1)}, "`delta_bias` must have shape"),
        ({"u": torch.randint(0, 3, (1, 4, 5))}, "`u` must be a floating-point tensor"),
        ({"backend": "cuda"}, "unknown backend"),
    ],
)
def test_selective_scan_rejects(change: dict, message: str) -> None:
    arguments = scan_inputs()
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        selective_scan(**arguments)


def test_selective_scan_rejects_empty_sequence() -> None:
    with pytest.raises(ValueError, match="empty sequence"):
        selective_scan(**scan_inputs(length=0))


def test_causal_conv_rejects() -> None:
    with pytest.raises(ValueError, match="`weight` must have shape"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="empty sequence"):
        causal_conv1d(torch.randn(1, 4, 0), torch.randn(4, 4))


@pytest.fixture
def model() -> MambaLM:
    return MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=10, pad_vocab_size_multiple=8))


@pytest.mark.parametrize(
    ("input_ids", "message"),
    [
        (torch.tensor([[1, 2, 16]]), "token id 16, outside the vocabulary \\[0, 15\\]"),
        (torch.tensor([[-1, 2]]), "token id -1"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(3, dtype=torch.long), "shape \\(batch, L\\)"),
        (torch.zeros(1, 3), "integer token ids"),
        ([[1, 2]], "torch.LongTensor"),
    ],
)
def test_model_rejects_bad_input_ids(model: MambaLM, input_ids, message: str) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model(input_ids)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_model_rejects_bad_inputs_embeds(model: MambaLM) -> None:
    with pytest.raises(ValueError, match="d_model=8"):
        model(inputs_embeds=torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="exactly one"):
        model()


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"d_model": 0}, "`d_model`"), ({"dt_rank": -2}, "`dt_rank`"), ({"norm_eps": 0.0}, "`norm_eps`"),
     ({"dt_init": "zeros"}, "`dt_init`"), ({"n_layer": 1.5}, "`n_layer`")],
)
def test_config_rejects(fields: dict, message: str) -> None:
    base = {"d_model": 8, "n_layer": 1, "vocab_size": 10}
    base.update(fields)
    with pytest.raises(ValueError, match=message):
        MambaConfig(**base)


def test_set_backend_rejects_unknown(model: MambaLM) -> None:
    with pytest.raises(ValueError, match="`scan` must be one of"):
        model.set_backend(scan="fast")
