"""Numerics of the state-space models, each op behind one function with a ``backend=`` argument."""

from ssm_models.ops.causal_conv1d import CAUSAL_CONV1D_BACKENDS, causal_conv1d, causal_conv1d_step
from ssm_models.ops.diagonal_scan import (
    DIAGONAL_SCAN_BACKENDS,
    diagonal_scan,
    diagonal_scan_reference,
    diagonal_scan_step,
)
from ssm_models.ops.fft_conv import diagonal_ssm_kernel, fft_causal_conv
from ssm_models.ops.selective_scan import (
    SELECTIVE_SCAN_BACKENDS,
    scan_compute_dtype,
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)

__all__ = [
    "CAUSAL_CONV1D_BACKENDS",
    "DIAGONAL_SCAN_BACKENDS",
    "SELECTIVE_SCAN_BACKENDS",
    "causal_conv1d",
    "causal_conv1d_step",
    "diagonal_scan",
    "diagonal_scan_reference",
    "diagonal_scan_step",
    "diagonal_ssm_kernel",
    "fft_causal_conv",
    "scan_compute_dtype",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
]
