"""report.html in a real browser: headless Chromium (Debian's `chromium` package) loads the
report of a small search and every image must have decoded and every table have rows.
Skipped, with the reason, where no Chromium can start."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report_figures import trials_frame, write_search

from analysis import pareto

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Run in the page once everything has loaded: what rendered, written into the DOM, which
# --dump-dom then prints.
CHECK = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const tables = [...document.querySelectorAll("table")].map(t => ({
    rows: t.rows.length, height: t.getBoundingClientRect().height}));
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images, tables});
  document.body.appendChild(out);
});
</script>
"""


def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("no chromium: install Debian's chromium package (apt-get install chromium)")
    return found


def rendered(page: Path, tmp_path: Path) -> dict:
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"))
    argv = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
            "--dump-dom", checked.as_uri()]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish loading the page in 120 s")
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.S)
    if done.returncode != 0 and found is None:
        pytest.skip(f"chromium could not start: {done.stderr.strip().splitlines()[-1:]}")
    assert found, f"the check script did not run: {done.stderr[-1000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.slow
def test_every_image_and_table_of_the_report_renders(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "browser" / "s"
    write_search(folder, trials_frame(), f"sqlite:///{tmp_path / 'm.db'}")
    assert pareto.main([str(folder), "--no-mlflow-log"]) == 0
    page = folder / "analysis" / "report.html"
    result = rendered(page, tmp_path)
    expected_images = page.read_text(encoding="utf-8").count("<img ")
    assert len(result["images"]) == expected_images == 5
    for image in result["images"]:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
    tables = page.read_text(encoding="utf-8").count("<table")
    assert len(result["tables"]) == tables >= 4
    for table in result["tables"]:
        assert table["rows"] >= 2, table  # a header and at least one row
