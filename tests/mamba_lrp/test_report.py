"""Reports: self-contained HTML, one shared colour scale per example, results.json, atomic writes
and refusing to overwrite, and a report built from a shipped model."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from mamba_lrp import viz
from mamba_lrp.data import load_data
from mamba_lrp.explanation import Explanation
from mamba_lrp.faithfulness import FlipCurve
from mamba_lrp.report import (
    ReportExample,
    ReportSection,
    check_report,
    render_report,
    report_section,
    write_report,
)
from mamba_lrp.tasks import load_default_model
from tests.helpers import single_torch_thread


def make(tokens: list[str], relevance: list[float], method: str) -> Explanation:
    scores = torch.tensor(relevance, dtype=torch.float64)
    return Explanation(relevance=scores, output=torch.tensor(float(scores.sum())), target=torch.tensor(7),
                       position=torch.tensor(len(tokens) - 1), method=method, input_ids=torch.arange(len(tokens)),
                       conservation_error=torch.tensor(float("nan")), tokens=tokens)


def curve(order: str, values: list[float]) -> FlipCurve:
    steps = len(values) - 1
    return FlipCurve(fractions=torch.linspace(0, 1, steps + 1, dtype=torch.float64),
                     n_flipped=torch.arange(steps + 1), values=torch.tensor(values, dtype=torch.float64),
                     unperturbed=values[0], n_tokens=steps, target=7, position=steps, order=order, mode="deletion",
                     replacement="zero_embedding", output="logit")


SUMMARY = {
    "metrics": {"delta_af": {"higher_is_better": True, "best": "large", "definition": "A^F(LeRF) - A^F(MoRF)"}},
    "results": {"strong": {"delta_af": {"mean": 2.5, "stderr": 0.1, "n": 2}},
                "weak": {"delta_af": {"mean": 0.5, "stderr": None, "n": 2}}},
    "n_examples": 2,
    "settings": {"replacement": "zero_embedding", "output": "logit", "steps": 3, "target": "label", "position": -1},
}


def section(model: str = "tiny <model>") -> ReportSection:
    tokens = ["the", "<b>film</b>", "was", "good", "&"]
    example = ReportExample(
        explanations={"strong": make(tokens, [0.0, 4.0, -1.0, 2.0, 0.5], "strong"),
                      "weak": make(tokens, [0.5, -0.25, 0.0, 1.0, 0.0], "weak")},
        title="example 0", label="positive", target_token="positive", evidence=(3,))
    curves = {"strong": [curve("morf", [3.0, 1.0, 0.5, 0.0]), curve("lerf", [3.0, 2.9, 2.5, 0.0])],
              "weak": [curve("morf", [3.0, 2.0, 1.0, 0.0]), curve("lerf", [3.0, 2.0, 1.0, 0.0])]}
    return ReportSection(model=model, methods=["strong", "weak"], examples=[example], task="sentiment",
                         data="task:sentiment", summary=SUMMARY, curves=curves, details={"accuracy": 1.0})


def resource_references(page: str) -> list[str]:
    return re.findall(r'(?:src|href)\s*=\s*"?([^"\s>]+)', page)


def test_page_is_self_contained_and_escaped() -> None:
    page = render_report([section()])
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    references = resource_references(page)
    assert references, "the report should embed its figure"
    for reference in references:
        assert reference.startswith(("data:image/png;base64,", "#")), reference
    images = [reference for reference in references if reference.startswith("data:")]
    assert len(images) == 1
    image = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
    assert image.format == "PNG" and image.width > 300
    # every piece of user text is escaped
    assert "<b>" not in page and "&lt;b&gt;film&lt;/b&gt;" in page and "tiny &lt;model&gt;" in page
    # summary first: the overview and the faithfulness table come before the first example
    assert page.index("Summary") < page.index("delta_af") < page.index('class="example"')
    assert re.search(r'<td class="num best">2\.5 ± 0\.1</td>', page)  # best value in bold
    assert "accuracy" in page and "positive" in page


def test_every_example_has_one_shared_scale() -> None:
    page = render_report([section()])
    example = page[page.index('class="example"'):]
    scales = re.findall(r"scale &plusmn;([0-9.e+-]+)", example)
    assert scales == ["4", "4"]  # max |R| over both methods, not each row's own (4 and 1)
    classes = re.findall(r'<span(?: class="?([\w ]+)"?)? title="([^"]*)"', example)
    by_value = {title.split(" ")[0]: cls for cls, title in classes}
    levels = viz.LEVELS
    assert by_value["4"] == f"p{levels}"          # the largest value is the full colour
    assert by_value["1"].split()[0] == f"p{round(levels / 4)}"  # the weak row's maximum is a quarter of it
    assert by_value["2"] == f"p{levels // 2} gt"  # ground truth underlined
    assert "underlined: ground-truth tokens" in example


def test_results_json_holds_the_numbers(tmp_path: Path) -> None:
    write_report(tmp_path, section())
    results = json.loads((tmp_path / "results.json").read_text())
    (record,) = results["sections"]
    assert record["faithfulness"] == SUMMARY and record["methods"] == ["strong", "weak"]
    (example,) = record["examples"]
    assert example["methods"]["strong"]["relevance"] == [0.0, 4.0, -1.0, 2.0, 0.5]
    assert example["methods"]["strong"]["output"] == pytest.approx(5.5)
    assert example["methods"]["weak"]["conservation_error"] is None  # NaN is not JSON
    assert example["evidence"] == [3] and example["target"] == 7 and example["tokens"][1] == "<b>film</b>"


def test_existing_report_needs_force_and_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_report(tmp_path, section("first"))
    assert path == tmp_path / "report.html"
    before = path.read_text()
    with pytest.raises(FileExistsError, match="report.html exists; pass --force"):
        write_report(tmp_path, section("second"))
    with pytest.raises(FileExistsError, match="pass --force"):
        check_report(tmp_path)
    assert path.read_text() == before
    # a crash in the middle of a write leaves the old report and no temporary file
    real_replace = os.replace

    def crash(source: str, target: str) -> None:
        if str(target).endswith("report.html"):
            raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, section("second"), force=True)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(item.name for item in tmp_path.iterdir()) == ["report.html", "results.json"]
    write_report(tmp_path, section("third"), force=True)
    assert "third" in path.read_text()


def test_check_report_sees_an_earlier_evaluation(tmp_path: Path) -> None:
    check_report(tmp_path / "new")  # nothing there: fine
    (tmp_path / "evaluation" / "m").mkdir(parents=True)
    (tmp_path / "evaluation" / "m" / "results.jsonl").write_text("")
    (tmp_path / "evaluation" / "m" / "run.json").write_text("{}")
    check_report(tmp_path)  # an evaluation that failed before its first result does not count
    (tmp_path / "evaluation" / "m" / "results.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(FileExistsError, match="earlier evaluation"):
        check_report(tmp_path)
    check_report(tmp_path, force=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        check_report(tmp_path / "file", force=True)


def test_report_section_of_a_shipped_model(tmp_path: Path) -> None:
    model, tokenizer, _ = load_default_model("sentiment")
    data = load_data("task:sentiment", limit=3)
    with single_torch_thread():
        result = report_section(model, tokenizer, data, ["mamba_lrp", "random"], ["delta_af", "aopc"],
                                out_dir=tmp_path, name="mamba-sentiment", task="sentiment", show=2,
                                label_column="label", steps=4, progress=False)
    assert result.summary["n_examples"] == 3 and set(result.summary["results"]) == {"mamba_lrp", "random"}
    assert (tmp_path / "evaluation" / "mamba-sentiment" / "summary.json").is_file()
    assert [example.title for example in result.examples] == ["example 0", "example 1"]
    rows = [json.loads(line) for line in (tmp_path / "evaluation" / "mamba-sentiment" / "results.jsonl")
            .read_text().splitlines()]
    for index, example in enumerate(result.examples):
        # the heatmaps explain what the table measured: the label's token, on the same ids
        assert example.target_token == data[index]["label"]
        assert example.evidence == tuple(data[index]["evidence"]) and example.evidence
        for method, explanation in example.explanations.items():
            assert explanation.input_ids.tolist() == data[index]["input_ids"]
            row = next(row for row in rows if row["index"] == index and row["method"] == method)
            assert int(explanation.target) == row["target"]
            assert math.isclose(float(explanation.output), row["output"], rel_tol=1e-5)
    assert set(result.curves) == {"mamba_lrp", "random"}
    assert {curve.order for curve in result.curves["mamba_lrp"]} == {"morf", "lerf"}
    page = write_report(tmp_path, result).read_text()
    assert page.count('class="example"') == 2 and "data:image/png;base64," in page
