"""Layer-wise relevance propagation rules and composites for the primitives of :mod:`ssm_models`.

Rules (:mod:`attribution_rules.rules`) change how relevance passes through one primitive by a
value-identical forward with a modified gradient; composites (:mod:`attribution_rules.composites`)
map primitive types or module names to rules and are applied to a model as a context manager.
"""

from attribution_rules.composites import (
    NONLINEAR_PRIMITIVES,
    Composite,
    composite_names,
    get_composite,
    mamba_lrp_rules,
    register_composite,
)
from attribution_rules.rules import (
    EpsilonRule,
    GammaRule,
    IdentityRule,
    NormRule,
    PassRule,
    Rule,
    SSMRule,
    UniformProductRule,
)

__all__ = [
    "NONLINEAR_PRIMITIVES",
    "Composite",
    "EpsilonRule",
    "GammaRule",
    "IdentityRule",
    "NormRule",
    "PassRule",
    "Rule",
    "SSMRule",
    "UniformProductRule",
    "composite_names",
    "get_composite",
    "mamba_lrp_rules",
    "register_composite",
]
