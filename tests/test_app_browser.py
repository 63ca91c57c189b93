"""The studio in a real headless browser (Debian chromium + chromium-driver, Selenium): the tabs render,
a click on a run in the Runs tab shows its status and charts (driven by the page's load event and timer)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest
from test_app_support import (
    free_port,
    kill_run,
    single_thread_runs,  # noqa: F401  (a module fixture, used below)
    trained_run,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
BINARY = "/usr/lib/chromium/chromium"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM) or not os.path.exists(DRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"),
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
    pytest.mark.usefixtures("single_thread_runs"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1800"]


@pytest.fixture(scope="module")
def page():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    from app.server import launch

    runs_dir, _ = trained_run()
    fake_run(runs_dir, "zz-newer", "failed")  # the page opens on the newest run: clicking 'base' must switch
    port = free_port()
    demo = launch(runs_dir, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    profile = tempfile.mkdtemp(prefix="studio-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = BINARY if os.path.exists(BINARY) else CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.runs_dir = runs_dir
        yield driver
    finally:
        driver.quit()
        demo.close()
        shutil.rmtree(profile, ignore_errors=True)


def fake_run(runs_dir: str, name: str, state: str) -> None:
    os.makedirs(os.path.join(runs_dir, name), exist_ok=True)
    with open(os.path.join(runs_dir, name, "status.json"), "w") as fh:
        json.dump({"state": state, "step": 0, "message": "a fake run", "started": time.time(), "updated": time.time()}, fh)


def _by():
    from selenium.webdriver.common.by import By

    return By


def _tab(driver, label: str):
    By = _by()
    tabs = wait_for(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == label],
                    30, what=f"the {label} tab")
    tabs[0].click()


def _text(driver, css: str) -> str:
    By = _by()
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_tabs_render_and_the_form_checks(page):
    By = _by()
    labels = wait_for(lambda: [b.text.strip() for b in page.find_elements(By.CSS_SELECTOR, "button[role=tab]")] or None,
                      30, what="tabs")
    assert labels[:4] == ["Train", "Runs", "Inference", "Compare"]
    assert page.find_element(By.ID, "start-btn").is_displayed()
    check = [b for b in page.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Check"][0]
    check.click()
    msg = wait_for(lambda: "valid" in _text(page, "#train-msg") and _text(page, "#train-msg"), 30,
                   what="the Check message")
    assert "python -m calligrapher_rl.train --preset tiny-grpo" in msg


def test_click_through_to_a_run_monitor(page):
    By = _by()
    _tab(page, "Runs")

    def base_cell():
        cells = [c for c in page.find_elements(By.CSS_SELECTOR, "#runs-table [role=gridcell]") if c.text.strip() == "base"]
        return cells[0] if cells else None

    wait_for(lambda: "a fake run" in _text(page, "#run-status"), 30, what="the newest run's status on load")
    from selenium.common.exceptions import WebDriverException

    def click_then_status():  # the timer may re-render the table under the pointer: click again then
        try:
            wait_for(base_cell, 10, what="the run 'base' in the table").click()
            wait_for(lambda: "step 4 / 4" in _text(page, "#run-status"), 5, what="the run's status line")
            time.sleep(2.5)  # a timer tick sent before the click may show the previous run once more
            return wait_for(lambda: "step 4 / 4" in _text(page, "#run-status") and _text(page, "#run-status"), 5,
                            what="the run's status line")
        except (WebDriverException, AssertionError):
            return None

    status = wait_for(click_then_status, 60, every=0.1, what="the status of the clicked run")
    assert status.startswith("finished") and "checkpoints: 2, 4" in status, status
    plot = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#plot-reward .js-plotly-plot"), 30,
                    what="the reward chart")
    assert "Reward" in plot[0].text
    resume = page.find_element(By.ID, "resume-btn")
    assert resume.is_displayed() and "checkpoint-4" in resume.text


def test_the_timer_shows_a_new_run(page):
    By = _by()
    _tab(page, "Runs")
    fake_run(page.runs_dir, "zz-later", "stopped")
    wait_for(lambda: any(c.text.strip() == "zz-later" for c in page.find_elements(By.CSS_SELECTOR, "#runs-table [role=gridcell]")),
             30, what="the timer to list a run created after the page loaded")


def test_start_from_the_page_and_watch_it_finish(page):
    By = _by()
    _tab(page, "Train")
    extra = wait_for(lambda: [t for t in page.find_elements(By.CSS_SELECTOR, "textarea, input[type=text]")
                              if (t.get_attribute("placeholder") or "").startswith("--seed")], 30, what="extra flags")
    extra[0].send_keys("--max_train_steps 2 --eval_steps 2 --checkpointing_steps 2")
    page.find_element(By.ID, "start-btn").click()
    msg = wait_for(lambda: page.find_element(By.ID, "train-msg").get_attribute("textContent").strip(), 30,
                   what="the Start message (the page has moved to the Runs tab)")
    assert "started" in msg, msg
    name = msg.split("started ", 1)[1].split()[0]
    try:
        status = wait_for(lambda: "finished" in _text(page, "#run-status") and _text(page, "#run-status"), 120,
                          every=1.0, what="the run started from the page to finish in its monitor")
        assert "step 2 / 2" in status
        shown = wait_for(lambda: [c for c in page.find_elements(By.CSS_SELECTOR, "#runs-table [role=gridcell]")
                                  if c.text.strip() == name], 30, what="the new run in the table")
        assert shown
    finally:
        kill_run(os.path.join(page.runs_dir, name))
