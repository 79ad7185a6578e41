"""``report.html`` in a real browser: Debian's headless Chromium, driven by Playwright.

A small DP federation (in-process grid, real handlers, vaults and ledgers) writes its run folder;
``genofed report`` writes the page again; Chromium opens it. Every image must load (the global
explanation's too), the console must stay free of errors, and a screenshot of the whole page is
saved beside the report. The page of a ``genofed evaluate`` folder is opened the same way.
Chromium comes from Debian's ``chromium`` package (``make test`` installs it when missing):
Playwright's own browser download is not reachable from the machines genofed is tested on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.client_app import app as client_app
from common.settings import RunSettings
from server.server_app import run_federation
from simulations.cli import main
from simulations.site_layout import split_cohort
from simulations.synthetic import write_synthetic_cohort
from tests.local_grid import LocalGrid, node_configs
from tests.test_report_explanation import fake_explanation

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
"""As root, and on a closed network: without the background-networking flags Chromium keeps trying hosts."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    write_synthetic_cohort(out=root / "cohort", patients=300, seed=3)
    split_cohort(spec_path=root / "cohort" / "spec.toml", sites=3, by="iid", out=root / "sites", seed=0,
                 vaults=True, show_progress=False)
    run = RunSettings(run_dir=str(root / "run"), cnn_rounds=2, local_epochs=1, forest_trees=20,
                      wait_timeout=2.0, round_timeout=120.0)  # DP, noised statistics: every figure of the page
    doc = run_federation(LocalGrid(client_app, node_configs(root / "sites"), run_config=run.to_run_config()), run)
    explanation = root / "run" / "explanation.json"
    if not explanation.is_file():  # a run that explains writes its own; else a hand-written one, for the page
        explanation.write_text(json.dumps({**fake_explanation(), "run_id": doc["run"]["run_id"]}))
    return root / "run"


@pytest.fixture(scope="module")
def evaluate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ``genofed evaluate`` folder (sized as tests/test_evaluate.py sizes them)."""
    root = tmp_path_factory.mktemp("evaluate")
    write_synthetic_cohort(out=root / "cohort", patients=400, seed=3)
    assert main(["evaluate", "--spec", str(root / "cohort" / "spec.toml"), "--out", str(root / "out"), "--no-dp",
                 "--epochs", "3", "--bootstrap", "20"]) == 0
    return root / "out"


def _open_in_chromium(page_path: Path, shot: Path) -> tuple[str, list[dict], list[str]]:
    """The page's title, its images (alt, loaded) and the console's errors; a full-page screenshot at ``shot``."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), ("Debian's chromium is not installed: `apt-get install chromium` "
                                      "(make test does it when it can)")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0}))")
            title = page.title()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return title, images, errors


@pytest.mark.slow
def test_report_opens_in_chromium_with_every_image_and_no_console_error(run_dir: Path, tmp_path: Path) -> None:
    page_path, shot = tmp_path / "report.html", tmp_path / "report.png"
    assert main(["report", str(run_dir), "--out", str(page_path), "--title", "browser test"]) == 0
    title, images, errors = _open_in_chromium(page_path, shot)
    assert title == "browser test"
    alts = {i["alt"] for i in images}
    assert {"ROC curves", "precision-recall curves", "calibration", "privacy spend"} <= alts, alts  # a DP run: all
    for kind in ("global SHAP forest", "attribution profile ", "motif logo "):  # the global explanation, drawn
        assert any(a.startswith(kind) for a in alts), (kind, alts)
    assert "could not be read" not in page_path.read_text()
    assert all(i["loaded"] for i in images), images
    assert errors == []
    assert shot.stat().st_size > 20_000


@pytest.mark.slow
def test_evaluate_report_opens_in_chromium_with_every_image_and_no_console_error(evaluate_dir: Path,
                                                                                 tmp_path: Path) -> None:
    page_path, shot = tmp_path / "report.html", tmp_path / "report.png"
    assert main(["report", str(evaluate_dir), "--out", str(page_path)]) == 0
    title, images, errors = _open_in_chromium(page_path, shot)
    assert title == "genofed evaluate"
    assert [i["alt"] for i in images] == ["ROC curves", "precision-recall curves", "calibration", "AUC differences"]
    assert all(i["loaded"] for i in images), images
    assert errors == []
    assert shot.stat().st_size > 20_000


def test_report_of_a_folder_without_a_run_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no metrics.json or pooled_stats.npz" in err and str(tmp_path) in err
