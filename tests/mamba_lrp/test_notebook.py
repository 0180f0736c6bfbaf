"""demos/quickstart.ipynb runs from top to bottom without an error (so it never rots), and is
committed without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "demos" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[:80]
        assert not cell["metadata"].get("execution")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    # a kernel spec for this very interpreter, so the notebook runs in the environment under test
    spec = tmp_path / "jupyter" / "kernels" / "mamba-lrp-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mamba-lrp test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="mamba-lrp-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else ""
    assert not [output for output in outputs if output.output_type == "stream" and output.name == "stderr"
                and "Traceback" in output.text]
    html = "".join(output.get("data", {}).get("text/html", "") for output in outputs)
    assert html.count('class="mlrp"') >= 2 and "integrated_gradients" in html  # the heatmaps were shown
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the curves were drawn
    markdown = "".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert "| mamba_lrp |" in markdown and "delta_af" in markdown
