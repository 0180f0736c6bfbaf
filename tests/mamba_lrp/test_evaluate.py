"""evaluate(): data sources, targets, the files it writes, resuming after a crash, and a
two-process gloo run that gives the one-process summary."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from mamba_lrp import explain
from mamba_lrp.evaluation import evaluate
from mamba_lrp.faithfulness import evaluate_example
from ssm_models import from_hf
from tests.helpers import random_hf_mamba, single_torch_thread

evaluate_module = importlib.import_module("mamba_lrp.evaluation")
METHODS = ["mamba_lrp", "gradient_x_input"]
METRICS = ["delta_af", "aopc", "sufficiency"]
OPTIONS = {"steps": 4, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return from_hf(random_hf_mamba(0, dtype=torch.float64), share_weights=False)


def id_lists(count: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, 40, (int(length),), generator=generator).tolist()
            for length in torch.randint(3, 12, (count,), generator=generator)]


class WordTokenizer:
    """Each word becomes one id in [1, 40): the sum of its characters' codes mod 39, plus 1."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [sum(map(ord, word)) % 39 + 1 for word in text.split()]}


TEXTS = ["the film was great", "dull and long", "a fine cast , a weak plot", "loved it", "never again !",
         "quiet , slow , beautiful"]
LABELS = [1, 0, 0, 1, 0, 1]
LABEL_TO_TOKEN = {0: 11, 1: 23}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_list_of_ids_results_summary_and_curves(model, tmp_path) -> None:
    data = id_lists()
    data[2] = torch.tensor(data[2])  # tensors and lists mix
    summary = evaluate(model, data, METHODS, METRICS, out=tmp_path, **OPTIONS)
    rows = read_rows(tmp_path / "results.jsonl")
    assert [(row["index"], row["method"]) for row in rows] == [(i, m) for i in range(6) for m in METHODS]
    for row in rows[:2]:  # the row holds what evaluate_example gives for explain()'s explanation
        ids = torch.as_tensor(data[row["index"]])
        explanation = explain(model, ids, method=row["method"])
        expected = evaluate_example(model, None, explanation, METRICS, steps=4)
        assert row["metrics"] == pytest.approx(expected, rel=1e-12)
        assert row["target"] == int(explanation.target) and row["length"] == len(ids)
        assert row["position"] == len(ids) - 1
    for method in METHODS:
        for metric in METRICS:
            values = [row["metrics"][metric] for row in rows if row["method"] == method]
            entry = summary["results"][method][metric]
            assert entry["n"] == 6
            assert entry["mean"] == pytest.approx(sum(values) / 6, rel=1e-12)
            assert entry["stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(6), rel=1e-12)
    assert summary["metrics"]["sufficiency"]["higher_is_better"] is False
    assert summary["settings"]["output"] == "logit" and summary["settings"]["replacement"] == "zero_embedding"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = (tmp_path / "summary.md").read_text()
    assert "| method | delta_af ↑ | aopc ↑ | sufficiency ↓ | n |" in table and "| mamba_lrp |" in table
    curves = read_rows(tmp_path / "curves.jsonl")
    assert len(curves) == 12 * 3
    assert {row["curve"] for row in curves} == {"deletion_morf", "deletion_lerf", "eraser_insertion_morf"}
    first = next(row for row in curves if row["curve"] == "deletion_morf")
    assert len(first["values"]) == 5 and first["fractions"] == [0, 0.25, 0.5, 0.75, 1.0]


def test_jsonl_csv_and_dataset_give_the_same_summary(model, tmp_path) -> None:
    records = [{"text": text, "label": label} for text, label in zip(TEXTS, LABELS, strict=True)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    table = tmp_path / "data.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(records)
    common = dict(tokenizer=WordTokenizer(), label_column="label", label_to_token=LABEL_TO_TOKEN, **OPTIONS)
    summaries = [evaluate(model, source, METHODS, METRICS, out=tmp_path / name, **common)
                 for name, source in [("jsonl", jsonl), ("csv", str(table)),
                                      ("dataset", datasets.Dataset.from_list(records))]]
    assert summaries[0] == summaries[1] == summaries[2]
    rows = read_rows(tmp_path / "csv" / "results.jsonl")
    assert [row["target"] for row in rows[::2]] == [LABEL_TO_TOKEN[label] for label in LABELS]
    # ids stored in the data itself need no tokenizer; the label may be the token id itself
    with_ids = [{"input_ids": WordTokenizer()(text)["input_ids"], "label": LABEL_TO_TOKEN[label]}
                for text, label in zip(TEXTS, LABELS, strict=True)]
    by_ids = evaluate(model, datasets.Dataset.from_list(with_ids), METHODS, METRICS, out=tmp_path / "ids",
                      label_column="label", **OPTIONS)
    assert by_ids["results"] == summaries[0]["results"]
    predicted = evaluate(model, jsonl, ["mamba_lrp"], ["aopc"], out=tmp_path / "prediction", target="prediction",
                         limit=2, **common)
    assert predicted["n_examples"] == 2


def test_resume_after_a_crash_and_a_half_written_line(model, tmp_path, monkeypatch) -> None:
    data = id_lists(5)
    reference = evaluate(model, data, METHODS, METRICS, out=tmp_path / "whole", **OPTIONS)
    original, calls = evaluate_example, []

    def crash_on_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_example", crash_on_the_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(model, data, METHODS, METRICS, out=tmp_path / "cut", **OPTIONS)
    monkeypatch.setattr(evaluate_module, "evaluate_example", original)
    results = tmp_path / "cut" / "results.jsonl"
    assert len(read_rows(results)) == 3 and not (tmp_path / "cut" / "summary.json").exists()
    with results.open("a") as handle:  # a crash in the middle of writing a row
        handle.write('{"index": 1, "method": "gradient_x_in')
    resumed = evaluate(model, data, METHODS, METRICS, out=tmp_path / "cut", resume=True, **OPTIONS)
    assert resumed == reference
    rows = read_rows(results)
    assert len(rows) == 10 and len({(row["index"], row["method"]) for row in rows}) == 10
    assert rows == read_rows(tmp_path / "whole" / "results.jsonl")
    assert read_rows(tmp_path / "cut" / "curves.jsonl") == read_rows(tmp_path / "whole" / "curves.jsonl")
    # truncating the finished file mid-row and resuming again recomputes only the lost pairs
    text = results.read_text()
    results.write_text(text[: len(text) - 40])
    assert evaluate(model, data, METHODS, METRICS, out=tmp_path / "cut", resume=True, **OPTIONS) == reference
    assert read_rows(results) == read_rows(tmp_path / "whole" / "results.jsonl")
    with pytest.raises(ValueError, match="other settings .*steps"):
        evaluate(model, data, METHODS, METRICS, out=tmp_path / "cut", resume=True, steps=3, progress=False)


def test_unknown_names_and_bad_data(model, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown metric 'faith'; known metrics: aopc, comprehensiveness"):
        evaluate(model, id_lists(2), METHODS, ["faith"], out=tmp_path)
    with pytest.raises(ValueError, match="unknown method 'magic'; known methods: .*mamba_lrp"):
        evaluate(model, id_lists(2), ["magic"], METRICS, out=tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model, datasets.Dataset.from_list([{"text": "a b"}]), METHODS, METRICS, out=tmp_path)
    with pytest.raises(ValueError, match="not in `label_to_token`"):
        evaluate(model, datasets.Dataset.from_list([{"input_ids": [1, 2], "label": 5}]), METHODS, METRICS,
                 out=tmp_path, label_column="label", label_to_token=LABEL_TO_TOKEN, progress=False)
    with pytest.raises(ValueError, match=r"\.jsonl, \.json or \.csv"):
        evaluate(model, str(tmp_path / "data.parquet"), METHODS, METRICS, out=tmp_path)


SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from mamba_lrp.evaluation import evaluate
from ssm_models import load_pretrained

model = load_pretrained(sys.argv[1])
data = json.loads(open(sys.argv[2]).read())
evaluate(model, data, ["mamba_lrp", "gradient_x_input"], ["delta_af", "aopc", "comprehensiveness"],
         out=sys.argv[3], steps=4, progress=False)
"""


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_summary(model, tmp_path) -> None:
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(id_lists(7)))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment["OMP_NUM_THREADS"] = "1"
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                 environment.get("PYTHONPATH", "")])
    arguments = [str(script), str(tmp_path / "model"), str(tmp_path / "data.json")]
    subprocess.run([sys.executable, *arguments, str(tmp_path / "one")], check=True, env=environment, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    *arguments, str(tmp_path / "two")], check=True, env=environment, timeout=300,
                   capture_output=True)
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
    assert read_rows(two / "results.jsonl") == read_rows(one / "results.jsonl")
    assert read_rows(two / "curves.jsonl") == read_rows(one / "curves.jsonl")
    assert sorted(path.name for path in two.iterdir()) == ["curves.jsonl", "results.jsonl", "run.json",
                                                           "summary.json", "summary.md"]
