"""Composites edit instances only, restore them exactly, keep the forward value, report coverage."""

from __future__ import annotations

import warnings

import pytest
import torch

from attribution_rules import Composite, IdentityRule, composite_names, get_composite, register_composite
from ssm_models import MambaConfig, MambaLM
from ssm_models.primitives import RMSNorm, SiLU
from tests.helpers import relative_error

BUILT_IN = ["mamba_lrp", "mamba_lrp_epsilon", "mamba_lrp_gamma", "lrp_ln_rule", "gradient_x_input",
            "mamba_lrp_no_silu", "mamba_lrp_no_gate", "mamba_lrp_no_norm", "mamba_lrp_no_ssm"]


@pytest.fixture
def model() -> MambaLM:
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=30)).eval()


def test_registry_has_the_named_composites() -> None:
    assert set(BUILT_IN) <= set(composite_names())


@pytest.mark.parametrize("name", BUILT_IN)
def test_forward_value_unchanged_and_instances_restored(model: MambaLM, name: str) -> None:
    ids = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        plain = model(ids)
    silu_forward = SiLU.forward
    with get_composite(name).context(model):
        edited = model(ids)
    assert relative_error(edited, plain) <= 1e-6
    assert SiLU.forward is silu_forward  # classes untouched
    assert not any("forward" in module.__dict__ for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids), plain)


def test_restored_on_exception_and_keeps_existing_instance_forward(model: MambaLM) -> None:
    norm = model.backbone.norm_f
    own_forward = norm.forward  # bound method
    norm.forward = own_forward  # an instance-level forward that must survive
    with pytest.raises(RuntimeError, match="boom"), get_composite("mamba_lrp").context(model):
        assert "forward" in model.backbone.layers[0].mixer.act.__dict__
        raise RuntimeError("boom")
    assert norm.__dict__["forward"] is own_forward
    assert not any("forward" in module.__dict__ for module in model.modules() if module is not norm)


def test_name_rules_take_precedence(model: MambaLM) -> None:
    composite = Composite({SiLU: IdentityRule()}, name_rules={"backbone.layers.1.*": IdentityRule()})
    assert composite.rule_for("backbone.layers.1.norm", model.backbone.layers[1].norm) is not None
    assert composite.rule_for("backbone.layers.0.norm", model.backbone.layers[0].norm) is None


def test_coverage_report_and_warning(model: MambaLM) -> None:
    report = get_composite("mamba_lrp").coverage_report(model)
    assert "backbone.layers.0.mixer.ssm" in report and "SSMRule()" in report and "NormRule()" in report
    assert get_composite("mamba_lrp").uncovered_nonlinear(model) == []
    partial = Composite({RMSNorm: IdentityRule()})
    with pytest.warns(UserWarning, match="without a rule"), partial.context(model):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with get_composite("mamba_lrp").context(model):
            pass


def test_register_and_unknown(model: MambaLM) -> None:
    register_composite("test_only_silu", lambda: Composite({SiLU: IdentityRule()}, warn_uncovered=False),
                       overwrite=True)
    assert "test_only_silu" in composite_names()
    with pytest.raises(ValueError, match="already registered"):
        register_composite("test_only_silu", Composite())
    with pytest.raises(ValueError, match="known: .*mamba_lrp"):
        get_composite("nope")
