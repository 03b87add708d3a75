"""The MLflow UI over the embedded store, in a real headless browser: two fits appear as two runs, the link
``make ui`` prints opens their headline metrics in view, and a user can add a column. With
``MEDTRANSFER_DOCS_SCREENSHOT=1`` the page is saved as ``docs/images/mlflow_ui.png`` (docs/tracking.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from servers import CHROMEDRIVER, CHROMIUM, headless_chromium, mlflow_process, require_program

from medtransfer.tracking.ui import HEADLINE_METRICS, experiment_link, share_headline_view, ui_link

REPO = Path(__file__).resolve().parents[2]
DOCS_SCREENSHOT = REPO / "docs" / "images" / "mlflow_ui.png"
RUNS = {"lite0-lr1e-3": "1e-3", "lite0-lr3e-4": "3e-4"}
#: Generous: the page loads in seconds, but CI's two cores may be busy with the rest of the suite.
PAGE_TIMEOUT_S = 120


def _header(driver, name: str):
    headers = driver.find_elements(By.CSS_SELECTOR, ".ag-header-cell")
    return next((h for h in headers if h.text.strip() == name), None)


def _column(driver, name: str) -> list[str]:
    """The texts of a runs-table column, by its header."""
    column_id = _header(driver, name).get_attribute("col-id")
    return [c.text for c in driver.find_elements(By.CSS_SELECTOR, ".ag-cell") if c.get_attribute("col-id") == column_id]


def _in_view(driver, element) -> bool:
    """Whether ``element`` lies wholly inside the window, as a user sees it without scrolling."""
    script = "const r = arguments[0].getBoundingClientRect(); return [r.left, r.right, window.innerWidth];"
    left, right, width = driver.execute_script(script, element)
    return 0 <= left and right <= width


def _show_columns(driver, *names: str) -> None:
    """Tick metrics or params in the table's "Columns" menu, as a user would, and close it."""
    driver.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
    for name in names:
        entry = f"//*[@role='dialog']//*[normalize-space(text())='{name}']"
        [item] = wait.until(lambda d, entry=entry: d.find_elements(By.XPATH, entry))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", item)  # the list scrolls
        item.click()
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    for name in names:
        wait.until(lambda d, name=name: _header(d, name) is not None)


@pytest.mark.slow
def test_the_ui_lists_both_runs_with_their_headline_metrics_in_view(tiny_fit, workdir):
    require_program(CHROMIUM, "chromium")  # before the fits and the server: a skip for a missing browser is free
    require_program(CHROMEDRIVER, "chromium-driver")
    for run_name, lr in RUNS.items():
        tiny_fit(f"--trainer.logger.init_args.run_name={run_name}", f"--model.optimizer.init_args.lr={lr}")
    store = f"sqlite:///{workdir}/mlruns/mlflow.db"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("medtransfer")
    runs = client.search_runs([experiment.experiment_id])
    auroc = {run.info.run_name: run.data.metrics["val/auroc"] for run in runs}
    assert auroc.keys() == RUNS.keys()
    assert all(set(HEADLINE_METRICS) <= set(run.data.metrics) for run in runs)
    view = share_headline_view(store, "medtransfer")  # what `make ui` does before it prints the link

    with (
        mlflow_process("ui", "--backend-store-uri", store, "--workers", "1", cwd=workdir) as url,
        headless_chromium(workdir / "chromium", width=1920, height=720) as driver,  # all columns in view
    ):
        driver.get(experiment_link(store, "medtransfer", url, view))  # the link `make ui` prints
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        wait.until(lambda d: all(d.find_elements(By.LINK_TEXT, name) for name in RUNS))
        for close in driver.find_elements(By.CSS_SELECTOR, "[aria-label=Close]"):
            close.click()  # a fresh profile opens the MLflow Assistant panel beside the table
        wait.until(lambda d: all(_header(d, name) is not None for name in HEADLINE_METRICS))
        assert all(_in_view(driver, _header(driver, name)) for name in HEADLINE_METRICS)
        driver.save_screenshot(str(workdir / "mlflow_ui.png"))
        _show_columns(driver, "model.optimizer.lr")  # a column the view lacks: added as a user would
        shown = sorted(round(float(text), 4) for text in _column(driver, "val/auroc"))
        assert shown == sorted(round(value, 4) for value in auroc.values())
        assert sorted(_column(driver, "model.optimizer.lr")) == ["0.0003", "0.001"]

        run = runs[0]  # the link a command prints after a run opens that run, with its metrics
        driver.get(ui_link(store, experiment.experiment_id, run.info.run_id, server=url))
        wait.until(lambda d: {run.info.run_name, "val/auroc"} <= set(d.find_element(By.TAG_NAME, "body").text.split()))

    if os.environ.get("MEDTRANSFER_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "mlflow_ui.png", DOCS_SCREENSHOT.with_suffix(".png.tmp"))
        DOCS_SCREENSHOT.with_suffix(".png.tmp").replace(DOCS_SCREENSHOT)
