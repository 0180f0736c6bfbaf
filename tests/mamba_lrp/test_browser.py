"""The report in a real browser: headless Chromium renders a report of a shipped model; the DOM
must hold the heatmaps, every image must have loaded (with the network switched off), and the
screenshot must show the heatmap colours. Skipped only when no Chromium can be found (`.ci/run`
installs Debian's `chromium`)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mamba_lrp.cli import main
from tests.helpers import single_torch_thread

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: Run once the page has loaded: record on <body> how many images decoded, how many heatmap
#: tokens there are and how many of them have a coloured background.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const tokens = [...document.querySelectorAll(".mlrp .row span")];
  const coloured = tokens.filter(s => getComputedStyle(s).backgroundColor !== "rgba(0, 0, 0, 0)");
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.tokens = tokens.length;
  document.body.dataset.coloured = coloured.length;
  document.body.dataset.sheets = document.styleSheets.length;
});
</script>"""


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def run_browser(executable: str, *arguments: str) -> subprocess.CompletedProcess:
    # --host-resolver-rules: no host name resolves, so anything fetched from the network fails
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--host-resolver-rules=MAP * ~NOTFOUND", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_renders_in_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    executable = browser()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium)")
    with single_torch_thread():
        status = main(["report", "--model", "mamba-sentiment", "--data", "task:sentiment", "--limit", "3",
                       "--show", "2", "--steps", "4", "--methods", "mamba_lrp,integrated_gradients",
                       "--out", str(tmp_path / "report")])
    assert status == 0
    report = tmp_path / "report" / "report.html"
    assert capsys.readouterr().out.strip() == str(report)
    page = report.read_text()

    # nothing to fetch: no script, and every src/href is an embedded image or an anchor
    assert "<script" not in page.lower()
    references = re.findall(r'(?:src|href)\s*=\s*"?([^"\s>]+)', page)
    assert not [reference for reference in references if re.match(r"(?i)(https?:)?//", reference)]
    assert all(reference.startswith(("data:image/png;base64,", "#")) for reference in references)

    # the DOM after loading (a copy of the page with a probe script; the report itself has none)
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    result = run_browser(executable, "--dump-dom", probed.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, result.stdout[:2000]
    facts = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    assert facts, f"the probe did not run: {body.group(0)}"
    assert int(facts["images"]) >= 1 and facts["loaded"] == facts["images"]  # every figure decoded
    assert int(facts["sheets"]) >= 1
    assert int(facts["tokens"]) >= 2 * 2 * 10  # 2 examples x 2 methods x >= 10 tokens
    assert int(facts["coloured"]) >= 0.3 * int(facts["tokens"])
    assert result.stdout.count('class="example"') == 2 and "mamba_lrp" in result.stdout

    # the screenshot of the report itself: not blank, with the heatmap's reds and blues
    shot = tmp_path / "shot.png"
    result = run_browser(executable, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1200, 2400)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 200  # text, tables, a figure and heatmaps, not a blank page
    r, g, b = pixels.T
    reds = int(((r > 150) & (r > g + 50) & (r > b + 50)).sum())
    blues = int(((b > 120) & (b > r + 40) & (b > g + 10)).sum())
    assert reds > 300 and blues > 300, (reds, blues)
