"""Numerics of the state-space models, each op behind one function with a ``backend=`` argument."""

from ssm_models.ops.selective_scan import (
    SELECTIVE_SCAN_BACKENDS,
    selective_scan,
    selective_scan_reference,
)

__all__ = ["SELECTIVE_SCAN_BACKENDS", "selective_scan", "selective_scan_reference"]
