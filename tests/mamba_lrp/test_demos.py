"""The demo scripts run: demos/explain_hf_checkpoint.py builds, saves and explains a random
`transformers` MambaForCausalLM checkpoint when given none, and explains a given directory;
demos/h3_icl_sample_weighting.py and demos/bmojo_eidetic_tokens.py run as scripts (small settings)
and write their figure / page and printed summary."""

from __future__ import annotations

import runpy
import subprocess
import sys
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


def run_demo(name: str, *arguments: str) -> str:
    """Run ``demos/NAME`` as a script with this interpreter; return its standard output."""
    completed = subprocess.run([sys.executable, str(DEMOS / name), *arguments], capture_output=True, text=True,
                               timeout=120, check=False, cwd=DEMOS.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.slow
def test_h3_icl_sample_weighting_trains_explains_and_plots(tmp_path: Path) -> None:
    printed = run_demo("h3_icl_sample_weighting.py", "--steps", "60", "--examples", "24", "--out", str(tmp_path))
    figure = tmp_path / "h3_icl_sample_weighting.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for expected in ("trained a 1-layer H3", "test accuracy:", "(a) sample weighting:", "MambaLRP ",
                     "gradient x input ", "(b) layer 0: mean |K_h(l)|", "(c) correlation over recency:",
                     "summary: MambaLRP sample weighting", f"wrote {figure}"):
        assert expected in printed, expected
    check = float(printed.split("impulse response: relative difference ")[1].split(")")[0])
    assert check < 1e-6  # the kernel from the parameters is the one the forward uses


@pytest.mark.slow
def test_bmojo_eidetic_tokens_inspects_explains_and_writes_html(tmp_path: Path) -> None:
    printed = run_demo("bmojo_eidetic_tokens.py", "--examples", "12", "--show", "2", "--out", str(tmp_path))
    page = tmp_path / "bmojo_eidetic_tokens.html"
    html = page.read_text()
    for expected in ("12 test examples of 18 tokens (3 chunks of 8)", "selected eidetic tokens", "layer 0: chunk 0:",
                     "attention mass of the query by source (window / memory / eidetic)",
                     "MambaLRP relevance for the true answer", "eidetic tokens seen by the query",
                     "ground-truth key + value", "summary: eidetic tokens hold", f"wrote {page}"):
        assert expected in printed, expected
    assert "example 0: answer" in html and "example 1: answer" in html and "example 2: answer" not in html
    assert "{E0" in html and "{M}" in html and 'class="' in html and "gt" in html
