"""Composites: maps from primitive types (or module-name patterns) to rules, and their registry.

Applying a composite (``with composite.context(model): ...``) replaces the ``forward`` of the
matching module *instances* by the rule's value-identical forward, and restores every instance
exactly on exit, also when an exception is raised inside. Classes and globals are never touched.

Named composites (``get_composite(name)``, ``composite_names()``). The same composite serves all
three architectures, because it maps primitive *types*: Mamba (SiLU, gate product, RMSNorm,
selective SSM), H3 (two products ``SSM_shift(k) * v`` and ``q * SSM_diag(.)`` as gate products,
LayerNorm, GELU, attention layers) and B'MOJO (Mamba's primitives plus attention):

| name | SiLU / GELU | products | RMSNorm / LayerNorm | selective SSM | attention | Linear / conv |
|---|---|---|---|---|---|---|
| ``mamba_lrp`` (the paper) | identity | uniform (half) | norm | SSM rule | CP-LRP | LRP-0 |
| ``mamba_lrp_attnlrp`` | identity | uniform (half) | norm | SSM rule | AttnLRP | LRP-0 |
| ``mamba_lrp_epsilon`` | identity | uniform (half) | norm | SSM rule | CP-LRP | LRP-eps (1e-6) |
| ``mamba_lrp_gamma`` | identity | uniform (half) | norm | SSM rule | CP-LRP | LRP-gamma (0.25) |
| ``lrp_ln_rule`` (naive LRP) | - | - | norm | - | - | LRP-0 |
| ``gradient_x_input`` | - | - | - | - | - | LRP-0 |
| ``mamba_lrp_no_silu`` / ``_no_gate`` / ``_no_norm`` / ``_no_ssm`` | ``mamba_lrp`` with that one rule removed ||||||

H3's linear time-invariant SSMs (shift and diagonal, FFT or recurrent) and all Linear layers are
linear in their input, so plain gradient x input through them *is* LRP-0 and they need no rule.
B'MOJO's eidetic selection is a discrete choice of positions: no relevance passes through it; the
selected tokens receive relevance through the attention values.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from attribution_rules.rules import (
    AttnLRPRule,
    CPLRPRule,
    EpsilonRule,
    GammaRule,
    IdentityRule,
    NormRule,
    Rule,
    SSMRule,
    UniformProductRule,
)
from ssm_models.primitives import Attention, CausalConv1d, GatingProduct, RMSNorm, SelectiveSSM, SiLU

#: Primitive types that are not linear: a composite that leaves one of them without a rule
#: gets plain gradient there, which is not conservative. Other packages may extend this tuple.
NONLINEAR_PRIMITIVES: tuple[type[nn.Module], ...] = (SiLU, nn.SiLU, nn.GELU, GatingProduct, RMSNorm, nn.LayerNorm,
                                                     SelectiveSSM, Attention)
AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, CausalConv1d, nn.Conv1d)


@dataclass
class Composite:
    """Rules by module type (``type_rules``, first ``isinstance`` match wins) and by module-name
    glob pattern (``name_rules``, checked first; e.g. ``"backbone.layers.0.*"``)."""

    type_rules: dict[type[nn.Module], Rule] = field(default_factory=dict)
    name_rules: dict[str, Rule] = field(default_factory=dict)
    description: str = ""
    warn_uncovered: bool = True

    def rule_for(self, name: str, module: nn.Module) -> Rule | None:
        for pattern, rule in self.name_rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        for module_type, rule in self.type_rules.items():
            if isinstance(module, module_type):
                return rule
        return None

    def coverage(self, model: nn.Module) -> list[tuple[str, str, str]]:
        """Rows ``(module name, module type, rule)`` for every primitive or affine module of the
        model; the rule is ``"-"`` (plain gradient) where none applies."""
        rows = []
        for name, module in model.named_modules():
            rule = self.rule_for(name, module)
            if rule is not None or isinstance(module, NONLINEAR_PRIMITIVES + AFFINE_TYPES):
                rows.append((name, type(module).__name__, repr(rule) if rule is not None else "-"))
        return rows

    def uncovered_nonlinear(self, model: nn.Module) -> list[str]:
        """Names of the nonlinear primitives that get no rule."""
        return [name for name, module in model.named_modules()
                if isinstance(module, NONLINEAR_PRIMITIVES) and self.rule_for(name, module) is None]

    def coverage_report(self, model: nn.Module) -> str:
        """A printable table of which module got which rule."""
        rows = self.coverage(model)
        width = max([len(name) for name, _, _ in rows] + [6])
        lines = [f"{'module':<{width}}  {'type':<14}  rule", f"{'-' * width}  {'-' * 14}  ----"]
        lines += [f"{name:<{width}}  {kind:<14}  {rule}" for name, kind, rule in rows]
        return "\n".join(lines)

    @contextlib.contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Apply the rules to ``model``'s instances; restore them on exit (also on exceptions)."""
        if self.warn_uncovered:
            uncovered = self.uncovered_nonlinear(model)
            if uncovered:
                warnings.warn(
                    f"composite leaves {len(uncovered)} nonlinear primitive(s) without a rule "
                    f"(plain gradient there, relevance not conserved): {uncovered[:5]}",
                    stacklevel=3,
                )
        edited: list[tuple[nn.Module, bool, object]] = []
        try:
            for name, module in model.named_modules():
                rule = self.rule_for(name, module)
                if rule is None:
                    continue
                had_own = "forward" in module.__dict__
                previous = module.__dict__.get("forward")
                edited.append((module, had_own, previous))
                module.forward = functools.partial(rule.forward, module, module.forward)
            yield model
        finally:
            for module, had_own, previous in reversed(edited):
                if had_own:
                    module.forward = previous
                else:
                    del module.forward


# ------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[[], Composite]] = {}


def register_composite(name: str, factory: Callable[[], Composite] | Composite, overwrite: bool = False) -> None:
    """Register a composite (or a zero-argument factory of one) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_composite: `name` must be a non-empty string")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_composite: {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory if callable(factory) and not isinstance(factory, Composite) else (lambda: factory)


def composite_names() -> list[str]:
    return sorted(_REGISTRY)


def get_composite(name: str) -> Composite:
    """A fresh instance of the composite registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown composite {name!r}; known: {', '.join(composite_names())}")
    return _REGISTRY[name]()


def mamba_lrp_rules(affine_rule: Rule | None = None, attention_rule: Rule | None = None) -> dict[type[nn.Module], Rule]:
    """The paper's rules by primitive type; ``affine_rule`` optionally for Linear/conv layers;
    ``attention_rule`` for attention (default CP-LRP)."""
    rules: dict[type[nn.Module], Rule] = {
        SiLU: IdentityRule(),
        nn.SiLU: IdentityRule(),
        nn.GELU: IdentityRule(),
        GatingProduct: UniformProductRule(2),
        RMSNorm: NormRule(),
        nn.LayerNorm: NormRule(),
        SelectiveSSM: SSMRule(),
        Attention: CPLRPRule() if attention_rule is None else attention_rule,
    }
    if affine_rule is not None:
        rules.update({module_type: affine_rule for module_type in AFFINE_TYPES})
    return rules


def _without(*removed: type[nn.Module]) -> Callable[[], Composite]:
    def factory() -> Composite:
        rules = {key: rule for key, rule in mamba_lrp_rules().items() if key not in removed}
        return Composite(rules, description=f"mamba_lrp without the rule for {[t.__name__ for t in removed]}",
                         warn_uncovered=False)

    return factory


register_composite("mamba_lrp", lambda: Composite(mamba_lrp_rules(), description="MambaLRP (Jafari et al. 2024)"))
register_composite("mamba_lrp_epsilon", lambda: Composite(mamba_lrp_rules(EpsilonRule(1e-6)),
                                                          description="MambaLRP with LRP-epsilon on affine layers"))
register_composite("mamba_lrp_gamma", lambda: Composite(mamba_lrp_rules(GammaRule(0.25)),
                                                        description="MambaLRP with LRP-gamma on affine layers"))
register_composite("mamba_lrp_attnlrp", lambda: Composite(mamba_lrp_rules(attention_rule=AttnLRPRule()),
                                                          description="MambaLRP with AttnLRP for attention layers"))
register_composite("lrp_ln_rule", lambda: Composite({RMSNorm: NormRule(), nn.LayerNorm: NormRule()},
                                                    description="naive LRP: LN-rule only", warn_uncovered=False))
register_composite("gradient_x_input", lambda: Composite({}, description="plain gradient x input",
                                                         warn_uncovered=False))
register_composite("mamba_lrp_no_silu", _without(SiLU, nn.SiLU, nn.GELU))
register_composite("mamba_lrp_no_gate", _without(GatingProduct))
register_composite("mamba_lrp_no_norm", _without(RMSNorm, nn.LayerNorm))
register_composite("mamba_lrp_no_ssm", _without(SelectiveSSM))
