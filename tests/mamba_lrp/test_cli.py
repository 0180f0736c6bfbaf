"""The `mamba-lrp` command: the demo runs end to end; user errors exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_lrp.cli import main


@pytest.mark.slow
def test_demo_runs_on_the_shipped_models(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mamba_lrp.cli", "demo", "--out", str(tmp_path), "--examples", "1",
         "--eval-examples", "3"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "mamba_lrp" in result.stdout and "delta_af" in result.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert set(summary["evaluation"]) == {"mamba-associative-recall", "mamba-flip-flop", "mamba-sentiment"}
    assert (tmp_path / "mamba-sentiment" / "summary.md").is_file()


def test_user_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--examples", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mamba-lrp: error:") and "\n" not in error and "examples" in error


def test_help_lists_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out
