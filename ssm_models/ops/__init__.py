"""Numerics of the state-space models, each op behind one function with a ``backend=`` argument."""

from ssm_models.ops.causal_conv1d import CAUSAL_CONV1D_BACKENDS, causal_conv1d, causal_conv1d_step
from ssm_models.ops.selective_scan import (
    SELECTIVE_SCAN_BACKENDS,
    scan_compute_dtype,
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)

__all__ = [
    "CAUSAL_CONV1D_BACKENDS",
    "SELECTIVE_SCAN_BACKENDS",
    "causal_conv1d",
    "causal_conv1d_step",
    "scan_compute_dtype",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
]
