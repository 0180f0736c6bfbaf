"""The `mamba-lrp` command: demo, report, evaluate (also under torchrun) and train end to end;
existing outputs are never overwritten without --force; user errors exit 2 with one line;
--help documents every option with its default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from mamba_lrp.cli import build_parser, main
from mamba_lrp.tasks import shipped_models
from mamba_lrp.training import architecture_names
from tests.helpers import single_torch_thread

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("mamba-lrp") and ": error: " in error, error
    assert "\n" not in error and "Traceback" not in error, error
    return error


# ------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_writes_the_report_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "mamba_lrp.cli", "demo", "--out", str(out), "--examples", "1",
               "--eval-examples", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "mamba_lrp" in result.stdout and "delta_af" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == str(out / "report.html")
    results = json.loads((out / "results.json").read_text())
    models = set(shipped_models())
    assert {"mamba-sentiment", "h3-sentiment", "bmojo-sentiment"} <= models
    assert {section["model"] for section in results["sections"]} == models
    for section in results["sections"]:
        assert set(section["methods"]) >= {"mamba_lrp", "integrated_gradients", "occlusion"}
        assert section["faithfulness"]["n_examples"] == 3 and len(section["examples"]) == 1
    assert {path.name for path in (out / "evaluation").iterdir()} == models
    page = (out / "report.html").read_text()
    assert page.count('class="example"') == len(models) and page.count("data:image/png;base64,") == len(models)
    assert (out / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    before = snapshot(out)
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert snapshot(out) == before


def test_demo_bad_option_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--examples", "0"]) == 2
    assert "examples" in one_line_error(capsys)


# ----------------------------------------------------------------- report
def report_arguments(out: Path, *extra: str) -> list[str]:
    return ["report", "--model", "mamba-flip-flop", "--data", "task:flip_flop", "--limit", "3", "--show", "2",
            "--steps", "4", "--methods", "mamba_lrp,random", "--out", str(out), *extra]


def test_report_command_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(report_arguments(out)) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    results = json.loads((out / "results.json").read_text())
    (section,) = results["sections"]
    assert section["model"] == "mamba-flip-flop" and section["task"] == "flip_flop"
    assert section["faithfulness"]["settings"]["target"] == "label"  # task data: the label is explained
    assert set(section["faithfulness"]["results"]["mamba_lrp"]) == {"delta_af", "aopc"}
    assert len(section["examples"]) == 2 and section["examples"][0]["evidence"]
    before = snapshot(out)
    assert main(report_arguments(out, "--methods", "random")) == 2
    assert "--force" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(report_arguments(out, "--methods", "random", "--force")) == 0
    assert json.loads((out / "results.json").read_text())["sections"][0]["methods"] == ["random"]


def test_report_from_a_text_file_and_a_saved_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["the film was good . the review is", "the plot was never dull . the review is"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert main(["report", "--model", "mamba-sentiment", "--data", str(tmp_path / "texts.txt"), "--steps", "4",
                 "--methods", "mamba_lrp", "--out", str(tmp_path / "from_text")]) == 0
    section = json.loads((tmp_path / "from_text" / "results.json").read_text())["sections"][0]
    assert section["faithfulness"]["settings"]["target"] == "prediction"  # no labels: the top prediction
    assert [example["tokens"][:3] for example in section["examples"]] == [["the", "film", "was"],
                                                                         ["the", "plot", "was"]]
    splits = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"review": texts, "y": [1, 0]})})
    splits.save_to_disk(str(tmp_path / "saved"))
    assert main(["report", "--model", "mamba-sentiment", "--data", str(tmp_path / "saved"), "--split", "validation",
                 "--text-column", "review", "--label-column", "y", "--label-to-token",
                 '{"1": "positive", "0": "negative"}', "--steps", "4", "--methods", "mamba_lrp", "--show", "1",
                 "--out", str(tmp_path / "from_saved")]) == 0
    section = json.loads((tmp_path / "from_saved" / "results.json").read_text())["sections"][0]
    assert [example["target_token"] for example in section["examples"]] == ["positive"]
    assert section["examples"][0]["label"] == "1"
    capsys.readouterr()


# --------------------------------------------------------------- evaluate
def evaluate_arguments(out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", "mamba-flip-flop", "--data", "task:flip_flop", "--limit", "4",
            "--methods", "mamba_lrp,gradient_x_input", "--metrics", "delta_af,aopc", "--steps", "4",
            "--out", str(out), *extra]


def test_evaluate_command_resume_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "evaluation"
    assert main(evaluate_arguments(out)) == 0
    printed = capsys.readouterr().out
    assert "| mamba_lrp |" in printed and printed.strip().endswith(str(out / "summary.json"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == 4 and summary["settings"]["target"] == "label"
    before = snapshot(out)
    assert main(evaluate_arguments(out)) == 2
    assert "--resume" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(evaluate_arguments(out, "--resume", "--force")) == 2
    assert "choose one" in one_line_error(capsys)
    # resume: a lost result row is recomputed, the others are kept
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    assert main(evaluate_arguments(out, "--resume")) == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert main(evaluate_arguments(out, "--force", "--limit", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["n_examples"] == 2
    capsys.readouterr()


@pytest.mark.slow
def test_evaluate_under_torchrun_gives_the_one_process_summary(tmp_path: Path) -> None:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment["OMP_NUM_THREADS"] = "1"
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    one = subprocess.run([sys.executable, "-m", "mamba_lrp.cli", *evaluate_arguments(tmp_path / "one")],
                         capture_output=True, text=True, env=environment, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mamba_lrp.cli", *evaluate_arguments(tmp_path / "two")],
                         capture_output=True, text=True, env=environment, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text()) == \
        json.loads((tmp_path / "one" / "summary.json").read_text())
    assert two.stdout.count("| mamba_lrp |") == 1  # only rank 0 prints


# ------------------------------------------------------------------ train
@pytest.mark.parametrize("arch", architecture_names())
def test_train_a_tiny_model_then_explain_it(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "checkpoint"
    arguments = ["train", "--task", "flip_flop", "--arch", arch, "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--d-model", "16", "--n-layer", "1", "--test-examples", "8", "--seed", "3"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and printed.strip().endswith(str(out))
    info = json.loads((out / "task.json").read_text())
    assert info["task"] == "flip_flop" and info["arch"] == arch and info["seed"] == 3
    assert info["training"]["steps"] == 3 and info["test_examples"] == 8
    config = json.loads((out / "config.json").read_text())
    assert config.get("d_model", config.get("hidden_size")) == 16
    before = snapshot(out)
    assert main(arguments) == 2
    assert "--force" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(["explain", "--model", str(out), "--text", "write 1 ignore 0 read", "--methods", "mamba_lrp"]) == 0
    assert "mamba_lrp" in capsys.readouterr().out


# ----------------------------------------------------------- user errors
@pytest.mark.parametrize(("arguments", "message"), [
    (["report", "--model", "mamba-sentiment", "--data", "missing.jsonl", "--out", "r"], "missing.jsonl: no such file"),
    (["report", "--model", "mamba-sentiment", "--data", "task:sentiment", "--methods", "magic", "--out", "r"],
     "unknown method 'magic'"),
    (["report", "--model", "mamba-sentiment", "--data", "task:sentiment", "--metrics", "beauty", "--out", "r"],
     "unknown metric 'beauty'"),
    (["report", "--model", "no-such-model", "--data", "task:sentiment", "--out", "r"], "not a checkpoint directory"),
    (["report", "--model", "mamba-sentiment", "--data", "task:nope", "--out", "r"], "unknown task 'nope'"),
    (["report", "--model", "mamba-sentiment", "--data", "task:sentiment", "--label-to-token", "[1]", "--out", "r"],
     "not a JSON object"),
    (["report", "--model", "mamba-sentiment", "--data", "task:sentiment", "--label-column", "y", "--out", "r"],
     "--label-column 'y' is not a column"),
    (["report", "--model", "mamba-sentiment", "--data", "task:sentiment", "--limit", "0", "--out", "r"],
     "`limit` must be a positive integer"),
    (["evaluate", "--model", "mamba-sentiment", "--data", "task:sentiment", "--output", "odds", "--out", "e"],
     "invalid choice: 'odds'"),
    (["evaluate", "--model", "mamba-sentiment", "--data", "texts.txt", "--label-column", "text",
      "--out", "e"], "label"),
    (["explain", "--model", "mamba-sentiment", "--text", "the film", "--target", "zzqqxx"], "--target"),
    (["train", "--task", "sentiment", "--arch", "transformer", "--out", "t"], "invalid choice: 'transformer'"),
    (["train", "--task", "nonsense", "--out", "t"], "invalid choice: 'nonsense'"),
    (["train", "--task", "sentiment", "--steps", "0", "--out", "t"], "`steps` must be a positive integer"),
    (["report", "--model", "mamba-sentiment", "--data", "task:sentiment"], "required: --out"),
])
def test_user_errors_exit_2_with_one_line(arguments: list[str], message: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("the film was good\n")
    try:
        status = main(arguments)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    assert status == 2
    assert message in one_line_error(capsys)
    written = {path.name for path in tmp_path.rglob("*")}
    assert not written & {"report.html", "results.json", "summary.json", "checkpoint", "config.json"}


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        main(["--debug", "report", "--model", "mamba-sentiment", "--data", str(tmp_path / "x.jsonl"),
              "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="unknown method"):
        main(["evaluate", "--debug", "--model", "mamba-sentiment", "--data", "task:sentiment", "--methods", "x",
              "--out", str(tmp_path / "e")])


# ------------------------------------------------------------------- help
def test_help_documents_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert set(subcommands.choices) == {"demo", "explain", "report", "evaluate", "train"}
    for name, subparser in subcommands.choices.items():
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and ("(default:" in action.help or "(required)" in action.help), (name, action.dest)
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # the choices come from the registries
    assert "integrated_gradients" in text and "delta_af" in text and "flip_flop" in text and "mamba" in text
    assert "task:NAME" in text
