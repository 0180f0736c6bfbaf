"""The benchmark suite's writer replaces its own section of RESULTS.md and leaves the rest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_suite():
    spec = importlib.util.spec_from_file_location("run_suite", ROOT / "benchmarks" / "run_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sections_are_appended_then_replaced(tmp_path: Path) -> None:
    suite = load_suite()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nhand-written text\n")
    suite.write_section("memory", "python benchmarks/x.py", "| a |\n|---|\n| 1 |", results)
    suite.write_section("h3-paths", "python benchmarks/y.py", "first", results)
    suite.write_section("memory", "python benchmarks/x.py --more", "| a |\n|---|\n| 2 |", results)
    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written text\n")
    assert text.count("<!-- suite:memory -->") == 1 and "| 2 |" in text and "| 1 |" not in text
    assert "--more" in text and "first" in text
    assert text.index("suite:memory") < text.index("suite:h3-paths")  # replaced in place


def test_every_entry_names_an_existing_script() -> None:
    suite = load_suite()
    for name, (command, _gpu) in suite.ENTRIES.items():
        assert (ROOT / "benchmarks" / command[0]).is_file(), name
    assert suite.main(["--list"]) == 0
