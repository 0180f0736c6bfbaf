"""State-space sequence models (Mamba, ...) and their numerics. Knows nothing about explanations.

Public API: :class:`MambaConfig`, :class:`MambaLM`, :func:`from_hf`, :func:`load_pretrained`,
:func:`save_pretrained`; the ops live in :mod:`ssm_models.ops`, the primitive modules in
:mod:`ssm_models.primitives`.

H3 (:mod:`ssm_models.h3`): :class:`H3Config`, :class:`H3LM`, :func:`load_h3_checkpoint` (public weight files).

B'MOJO (:mod:`ssm_models.bmojo`): :class:`BMojoConfig`, :class:`BMojoLM`, :class:`BMojoInspection`.
"""

from ssm_models.bmojo import BMojoCache, BMojoConfig, BMojoInspection, BMojoLM
from ssm_models.h3 import H3LM, H3Cache, H3Config, load_h3_checkpoint
from ssm_models.loading import from_hf, load_pretrained, save_pretrained
from ssm_models.mamba import MambaCache, MambaConfig, MambaLM

__all__ = ["MambaCache", "MambaConfig", "MambaLM", "from_hf", "load_pretrained", "save_pretrained"]
__all__ += ["BMojoCache", "BMojoConfig", "BMojoInspection", "BMojoLM"]
__all__ += ["H3Cache", "H3Config", "H3LM", "load_h3_checkpoint"]
