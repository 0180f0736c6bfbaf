"""load_data(): built-in tasks, text/JSONL/CSV files, datasets saved to disk, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from mamba_lrp.data import TASK_EXAMPLES, load_data, task_dataset
from mamba_lrp.tasks import get_task


def test_task_source_matches_the_task_generator() -> None:
    data = load_data("task:sentiment", limit=5)
    examples = get_task("sentiment").examples("test", 5, seed=0)
    assert data.column_names == ["text", "input_ids", "label", "evidence"]
    assert data["text"] == [" ".join(example.tokens) for example in examples]
    assert data["label"] == [example.label for example in examples]
    assert data["evidence"] == [list(example.evidence) for example in examples]
    assert len(load_data("task:flip-flop")) == TASK_EXAMPLES
    train = load_data("task:sentiment", split="train", limit=3)
    assert train["text"] != data["text"][:3]
    assert task_dataset("sentiment", "test", 2, seed=1)["text"] != data["text"][:2]


def test_text_jsonl_csv_files(tmp_path: Path) -> None:
    (tmp_path / "texts.txt").write_text("first text\n\n  second text  \nthird\n")
    assert load_data(tmp_path / "texts.txt")["text"] == ["first text", "second text", "third"]
    assert load_data(str(tmp_path / "texts.txt"), limit=2)["text"] == ["first text", "second text"]
    rows = [{"sentence": "a b", "label": 1}, {"sentence": "c", "label": 0}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_data(tmp_path / "rows.jsonl", text_column="sentence")
    assert data["sentence"] == ["a b", "c"] and data["label"] == [1, 0]
    (tmp_path / "rows.csv").write_text("text,label\nhello there,1\nbye,0\n")
    assert load_data(tmp_path / "rows.csv")["text"] == ["hello there", "bye"]


def test_datasets_saved_to_disk(tmp_path: Path) -> None:
    single = datasets.Dataset.from_dict({"text": ["x y", "z"]})
    single.save_to_disk(str(tmp_path / "single"))
    assert load_data(tmp_path / "single")["text"] == ["x y", "z"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["u", "v"]}),
                                   "validation": datasets.Dataset.from_dict({"text": ["w"]})})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_data(tmp_path / "splits")["text"] == ["u", "v"]  # test by default
    assert load_data(tmp_path / "splits", split="validation")["text"] == ["w"]
    with pytest.raises(ValueError, match="no split 'dev'; its splits: train, test, validation"):
        load_data(tmp_path / "splits", split="dev")


@pytest.mark.parametrize(("source", "options", "message"), [
    ("missing.jsonl", {}, "missing.jsonl: no such file"),
    ("nowhere", {}, "no such file or directory"),
    ("data.parquet", {}, r"\.txt, \.jsonl, \.json or \.csv"),
    ("task:unknown", {}, "unknown task 'unknown'; known tasks: associative_recall"),
    ("task:sentiment", {"split": "dev"}, "splits train, test, not 'dev'"),
    ("task:sentiment", {"limit": 0}, "`limit` must be a positive integer"),
    ("texts.txt", {"text_column": "body"}, "no text column 'body'"),
    ("texts.txt", {"split": "test"}, "no splits"),
    ("empty.txt", {}, "no text"),
    ("broken.jsonl", {}, "could not read it as jsonl"),
])
def test_errors_name_the_problem(source: str, options: dict, message: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("one\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "data.parquet").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=message):
        load_data(source, **options)
