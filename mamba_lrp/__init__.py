"""mamba-lrp: explain the predictions of state-space sequence models.

``explain(model, input_ids, ...)`` returns an :class:`Explanation`; ``method_names()`` lists the
methods it accepts; ``register_method`` / ``attribution_rules.register_composite`` add new ones.
Importing the package registers the baselines (:mod:`mamba_lrp.baselines`: Captum methods on the
embeddings; :mod:`mamba_lrp.hidden_attention`: attention rollout, MambaAttr, random);
:class:`mamba_lrp.captum.MambaLRP` offers every method as a Captum ``Attribution``.
"""

from mamba_lrp import baselines, hidden_attention  # noqa: F401  (register the baseline methods)
from mamba_lrp.captum import MambaLRP
from mamba_lrp.evaluation import evaluate
from mamba_lrp.explain import explain
from mamba_lrp.explanation import Explanation
from mamba_lrp.faithfulness import METRICS, FlipCurve, evaluate_example, flip_curve
from mamba_lrp.methods import method_names, register_method
from mamba_lrp.tasks import get_task, load_default_model, load_shipped_model, task_names

__all__ = [
    "METRICS",
    "Explanation",
    "FlipCurve",
    "MambaLRP",
    "evaluate",
    "evaluate_example",
    "explain",
    "flip_curve",
    "get_task",
    "load_default_model",
    "load_shipped_model",
    "method_names",
    "register_method",
    "task_names",
]
