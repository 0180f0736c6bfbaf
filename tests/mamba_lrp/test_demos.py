"""The demo scripts run: demos/explain_hf_checkpoint.py builds, saves and explains a random
`transformers` MambaForCausalLM checkpoint when given none, and explains a given directory."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import transformers

from tests.helpers import single_torch_thread

DEMOS = Path(__file__).resolve().parents[2] / "demos"


@pytest.mark.slow
def test_explain_hf_checkpoint_builds_one_when_none_is_given(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    script = runpy.run_path(str(DEMOS / "explain_hf_checkpoint.py"), run_name="demo")
    checkpoint, page = tmp_path / "checkpoint", tmp_path / "heatmaps.html"
    with single_torch_thread():
        assert script["main"](["--save-to", str(checkpoint), "--out", str(page),
                               "--methods", "mamba_lrp,integrated_gradients"]) == 0
    printed = capsys.readouterr().out
    assert f"saved a small random MambaForCausalLM to {checkpoint}" in printed
    assert isinstance(transformers.MambaForCausalLM.from_pretrained(checkpoint), transformers.MambaForCausalLM)
    assert (checkpoint / "tokenizer.json").is_file()
    html = page.read_text()
    assert "mamba_lrp" in html and "integrated_gradients" in html and ">review<" in html
    with single_torch_thread():  # and a directory that is given
        assert script["main"]([str(checkpoint), "--text", "the plot was dull . the review is",
                               "--methods", "mamba_lrp"]) == 0
    printed = capsys.readouterr().out
    assert "saved" not in printed and "mamba_lrp: target" in printed and "dull" in printed
