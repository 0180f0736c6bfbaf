"""State-space sequence models (Mamba, ...) and their numerics. Knows nothing about explanations.

Public API: :class:`MambaConfig`, :class:`MambaLM`, :func:`from_hf`, :func:`load_pretrained`,
:func:`save_pretrained`; the ops live in :mod:`ssm_models.ops`, the primitive modules in
:mod:`ssm_models.primitives`.

B'MOJO (:mod:`ssm_models.bmojo`): :class:`BMojoConfig`, :class:`BMojoLM`, :class:`BMojoInspection`.
"""

from ssm_models.bmojo import BMojoCache, BMojoConfig, BMojoInspection, BMojoLM
from ssm_models.loading import from_hf, load_pretrained, save_pretrained
from ssm_models.mamba import MambaCache, MambaConfig, MambaLM

__all__ = ["MambaCache", "MambaConfig", "MambaLM", "from_hf", "load_pretrained", "save_pretrained"]
__all__ += ["BMojoCache", "BMojoConfig", "BMojoInspection", "BMojoLM"]
