"""Visualisation: escaping, colour scales, long inputs, terminal, figures, and `mamba-lrp explain`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from mamba_lrp import viz
from mamba_lrp.cli import main
from mamba_lrp.explanation import Explanation
from mamba_lrp.faithfulness import FlipCurve

TEXT = "the phone was very good . the review is"


def make(tokens: list[str], relevance: list[float], method: str = "m", layer_sums: list[float] | None = None,
         output: float | None = None) -> Explanation:
    length = len(tokens)
    scores = torch.tensor(relevance, dtype=torch.float32)
    value = float(scores.sum()) if output is None else output
    return Explanation(
        relevance=scores, output=torch.tensor(value), target=torch.tensor(3), position=torch.tensor(length - 1),
        method=method, input_ids=torch.arange(length), conservation_error=torch.tensor(0.0),
        layer_sums=None if layer_sums is None else torch.tensor(layer_sums), tokens=tokens,
    )


def spans(fragment: str) -> list[tuple[str, str, str]]:
    """``(class, title, text)`` of every token span."""
    return re.findall(r'<span(?: class=(\w+))? title="([^"]*)">(.*?)</span>', fragment, flags=re.S)


# ------------------------------------------------------------------- HTML
def test_hostile_tokens_are_escaped() -> None:
    hostile = ["<script>alert(1)</script>", "a&b", '"quoted"', "it's", "Ġ<b>"]
    explanation = make(hostile, [1.0, -0.5, 0.25, 0.0, 0.75], method='<img src=x onerror="x">')
    fragment = viz.html_heatmap(explanation)
    assert "<script>" not in fragment and "<b>" not in fragment and "<img" not in fragment
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment
    assert "a&amp;b" in fragment and " &lt;b&gt;" in fragment  # Ġ became a space
    texts = [text for _, _, text in spans(fragment)]
    assert texts == ["&lt;script&gt;alert(1)&lt;/script&gt;", "a&amp;b", '"quoted"', "it's", " &lt;b&gt;"]
    # tooltips are quoted attribute values holding only the number
    assert [title for _, title, _ in spans(fragment)] == ["1", "-0.5", "0.25", "0", "0.75"]
    assert "&lt;img src=x onerror=&quot;x&quot;&gt;" in fragment


def test_subword_markers_and_whitespace() -> None:
    assert viz.clean_token("Ġword") == " word" and viz.clean_token("▁word") == " word"
    assert viz.clean_token("Ċ") == "\n"
    fragment = viz.html_heatmap(make(["a", "Ċ", "Ġb"], [1.0, 0.0, -1.0]))
    assert [text for _, _, text in spans(fragment)] == ["a", "\n", " b"]
    assert "white-space:pre-wrap" in fragment


def test_colours_are_diverging_and_symmetric() -> None:
    assert viz.relevance_color(0.0, 2.0) == "#ffffff"
    assert viz.relevance_color(2.0, 2.0) != viz.relevance_color(-2.0, 2.0)
    classes = [cls for cls, _, _ in spans(viz.html_heatmap(make(list("abc"), [2.0, -2.0, 0.0])))]
    assert classes == [f"p{viz.LEVELS}", f"n{viz.LEVELS}", ""]


def test_shared_scale_gives_the_same_colour_across_rows_and_row_scale_does_not() -> None:
    small = make(["x", "y"], [0.5, 0.1], method="small")
    large = make(["x", "y"], [0.5, 2.0], method="large")
    shared = spans(viz.html_comparison({"small": small, "large": large}, normalize="shared"))
    assert shared[0][0] == shared[2][0]  # the value 0.5 in both rows
    row = spans(viz.html_comparison([small, large], normalize="row"))
    assert row[0][0] != row[2][0] and row[0][0] == f"p{viz.LEVELS}"
    with pytest.raises(ValueError, match="normalize"):
        viz.html_comparison([small], normalize="global")


def test_ten_thousand_tokens_render_fast_and_small() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = [f"Ġt{index % 97}" for index in range(10_000)]
    explanation = make(tokens, torch.randn(10_000, generator=generator).tolist())
    start = time.perf_counter()
    fragment = viz.html_heatmap(explanation)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert len(spans(fragment)) == 10_000
    text_bytes = sum(len(viz.clean_token(token)) for token in tokens)
    per_token = (len(fragment.encode()) - text_bytes) / 10_000
    assert per_token < 45, per_token
    assert "<polyline" in fragment  # the relevance-by-position strip


def test_repr_html_and_document() -> None:
    explanation = make(["a", "b"], [1.0, -1.0])
    assert explanation._repr_html_() == viz.html_heatmap(explanation)
    page = viz.html_document(viz.html_comparison([explanation]), title="<t>")
    assert page.startswith("<!DOCTYPE html>") and "&lt;t&gt;" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page


def test_write_text_atomic_refuses_to_overwrite(tmp_path: Path) -> None:
    path = viz.write_text_atomic(tmp_path / "a.html", "one")
    with pytest.raises(FileExistsError):
        viz.write_text_atomic(path, "two")
    viz.write_text_atomic(path, "two", force=True)
    assert path.read_text() == "two" and [item.name for item in tmp_path.iterdir()] == ["a.html"]


# --------------------------------------------------------------- terminal
def test_terminal_heatmap_contains_the_tokens() -> None:
    explanation = make(["hello", "Ġworld", "<x>"], [1.0, -0.5, 0.0])
    plain = viz.terminal_heatmap(explanation, color=False)
    assert "hello(+1)" in plain and "world(-0.5)" in plain and "<x>(+0)" in plain
    coloured = viz.terminal_heatmap(explanation, color=True)
    for token in ("hello", " world", "<x>"):
        assert token in coloured
    if viz._rich_available():
        assert "\x1b[" in coloured


def test_show_prints_outside_a_notebook(capsys: pytest.CaptureFixture[str]) -> None:
    make(["a", "b"], [1.0, -1.0]).show()
    assert "a(+1)" in capsys.readouterr().out


# ------------------------------------------------------------- matplotlib
def curve(order: str, values: list[float]) -> FlipCurve:
    steps = len(values)
    return FlipCurve(fractions=torch.linspace(0, 1, steps, dtype=torch.float64), n_flipped=torch.arange(steps),
                     values=torch.tensor(values, dtype=torch.float64), unperturbed=values[0], n_tokens=steps - 1,
                     target=3, position=steps - 2, order=order, mode="deletion", replacement=0, output="logit")


def test_figures_save_as_png_and_svg(tmp_path: Path) -> None:
    first = make(["a", "b", "c"], [1.0, -0.5, 2.0], method="lrp", layer_sums=[2.5, 2.4, 2.6])
    second = make(["a", "b", "c"], [0.2, 0.1, 0.3], method="gi", output=1.0)
    batched = Explanation(
        relevance=torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]]), output=torch.tensor([3.0, 1.4]),
        target=torch.tensor([1, 2]), position=torch.tensor([2, 2]), method="lrp", input_ids=torch.zeros(2, 3).long(),
        conservation_error=torch.zeros(2), layer_sums=torch.tensor([[3.0, 3.0, 3.0], [1.5, 1.4, 1.5]]),
    )
    figures = {
        "heatmap": viz.plot_heatmap({"lrp": first, "gi": second}),
        "flip": viz.plot_flip_curves({"lrp": [curve("morf", [3, 1, 0]), curve("morf", [2, 1, 1]),
                                              curve("lerf", [3, 3, 2])], "random": curve("morf", [3, 2, 1])}),
        "conservation": viz.plot_conservation({"lrp": [first, batched], "gi": second}),
        "distance": viz.plot_distance({"lrp": [first, batched], "gi": [second]}),
        "layers": viz.plot_layer_sums({"lrp": [first, batched], "gi": second}),
    }
    for name, figure in figures.items():
        for suffix in (".png", ".svg"):
            path = viz.save(figure, tmp_path / f"{name}{suffix}")
            assert path.stat().st_size > 500
    assert (tmp_path / "heatmap.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="unsupported"):
        viz.save(figures["heatmap"], tmp_path / "x.jpg")


# -------------------------------------------------------------------- CLI
def test_cli_explain_prints_the_heatmap(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--model", "mamba-sentiment", "--text", TEXT, "--methods", "mamba_lrp,random"]) == 0
    out = capsys.readouterr().out
    assert "mamba_lrp" in out and "random" in out
    for word in ("phone", "good", "review"):
        assert word in out


def test_cli_explain_html_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "explained.html"
    arguments = ["explain", "--model", "mamba-sentiment", "--text", TEXT, "--target", "positive",
                 "--methods", "mamba_lrp,gradient_x_input", "--out", str(out)]
    assert main(arguments) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "gradient_x_input" in page and ">phone<" in page
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mamba-lrp: error:") and "\n" not in error and "--force" in error
    assert main([*arguments, "--force"]) == 0


def test_cli_explain_json(tmp_path: Path) -> None:
    out = tmp_path / "numbers.json"
    assert main(["explain", "--model", "mamba-sentiment", "--text", TEXT, "--position", "-1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["tokens"][1] == "phone" and record["position"] == 8
    relevance = record["methods"]["mamba_lrp"]["relevance"]
    assert len(relevance) == 9
    assert sum(relevance) == pytest.approx(record["methods"]["mamba_lrp"]["output"], rel=0.1)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--model", "mamba-sentiment", "--methods", "mamba_lrp,nope"], "unknown method"),
    (["--model", "/nonexistent/checkpoint"], "not a checkpoint directory"),
    (["--model", "mamba-sentiment", "--target", "zzqqxx"], "--target"),
    (["--model", "mamba-sentiment", "--out", "x.gif"], "unsupported format"),
])
def test_cli_explain_user_errors_exit_2(arguments: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--text", TEXT, *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mamba-lrp: error:") and "\n" not in error and message in error
