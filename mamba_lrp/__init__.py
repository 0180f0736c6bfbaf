"""mamba-lrp: explain the predictions of state-space sequence models.

``explain(model, input_ids, ...)`` returns an :class:`Explanation`; ``method_names()`` lists the
methods it accepts; ``register_method`` / ``attribution_rules.register_composite`` add new ones.
"""

from mamba_lrp.explain import explain
from mamba_lrp.explanation import Explanation
from mamba_lrp.methods import method_names, register_method

__all__ = ["Explanation", "explain", "method_names", "register_method"]
