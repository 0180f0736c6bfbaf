"""State-space sequence models (Mamba, ...) and their numerics. Knows nothing about explanations.

Public API: :class:`MambaConfig`, :class:`MambaLM`, :func:`from_hf`, :func:`load_pretrained`,
:func:`save_pretrained`; the ops live in :mod:`ssm_models.ops`, the primitive modules in
:mod:`ssm_models.primitives`.
"""

from ssm_models.loading import from_hf, load_pretrained, save_pretrained
from ssm_models.mamba import MambaCache, MambaConfig, MambaLM

__all__ = ["MambaCache", "MambaConfig", "MambaLM", "from_hf", "load_pretrained", "save_pretrained"]
