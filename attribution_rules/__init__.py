"""Layer-wise relevance propagation rules and composites for the primitives of :mod:`ssm_models`."""
