"""Shared test helpers: tiny `transformers` Mamba models with randomised weights, and comparisons."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import transformers


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def random_hf_mamba(
    seed: int,
    *,
    hidden_size: int = 16,
    num_hidden_layers: int = 2,
    state_size: int = 4,
    vocab_size: int = 40,
    use_conv_bias: bool = True,
    tie_word_embeddings: bool = True,
    residual_in_fp32: bool = True,
    dtype: torch.dtype = torch.float32,
) -> transformers.MambaForCausalLM:
    """A `transformers` MambaForCausalLM whose every weight is randomised (norm weights, D, biases
    too), so that parity tests exercise every parameter."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        state_size=state_size,
        expand=2,
        conv_kernel=4,
        time_step_rank=max(hidden_size // 8, 1),
        use_conv_bias=use_conv_bias,
        tie_word_embeddings=tie_word_embeddings,
        residual_in_fp32=residual_in_fp32,
    )
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("A_log"):
                parameter.add_(0.3 * torch.randn_like(parameter))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("dt_proj.bias"):
                parameter.copy_(torch.randn_like(parameter) - 2.0)
            else:
                parameter.copy_(torch.randn_like(parameter) * (0.5 if parameter.dim() > 1 else 0.3))
    return model.to(dtype)


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run tiny models on one thread (OpenMP start-up costs more than it saves, and two threads
    stall on a shared 2-core machine); torch's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def hf_keeps_float64() -> Iterator[None]:
    """`transformers`' Mamba casts to float32 in places (``.float()``, RMSNorm's ``.to(float32)``,
    the logits). For an fp64 reference, make those casts keep float64 tensors as they are."""
    original_float, original_to = torch.Tensor.float, torch.Tensor.to

    def keep_float(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self if self.dtype == torch.float64 else original_float(self, *args, **kwargs)

    def keep_to(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if arg is torch.float32 else arg for arg in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return original_to(self, *args, **kwargs)

    torch.Tensor.float, torch.Tensor.to = keep_float, keep_to
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to = original_float, original_to
