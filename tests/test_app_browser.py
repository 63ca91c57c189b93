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
        driver.base_url = f"http://127.0.0.1:{port}/"
        driver.get(driver.base_url)
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


def _click_until(driver, element, done, timeout: float, what: str):
    """Click `element` (an id, or a function that finds it), then wait for `done()`; click again every 20 s while nothing has happened. A click that
    lands before the page has bound its handler is lost without a trace, and on a loaded machine that window is
    long; the actions clicked this way are idempotent (they fill fields)."""
    last = [0.0]

    def step():
        value = done()
        if value:
            return value
        if time.time() - last[0] > 20:
            (element() if callable(element) else driver.find_element(_by().ID, element)).click()
            last[0] = time.time()
        return False

    return wait_for(step, timeout, what=what)


def _selected_tab(driver) -> str:
    By = _by()
    sel = [b.text.strip() for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
           if b.get_attribute("aria-selected") == "true"]
    return sel[0] if sel else ""


def _value(driver, css: str) -> str:
    By = _by()
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return (found[0].get_attribute("value") or "") if found else ""


def _text(driver, css: str) -> str:
    By = _by()
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_tabs_render_and_the_form_checks(page):
    By = _by()
    labels = wait_for(lambda: [b.text.strip() for b in page.find_elements(By.CSS_SELECTOR, "button[role=tab]")] or None,
                      30, what="tabs")
    assert labels[:5] == ["Train", "Runs", "Inference", "Compare", "Dataset"]
    assert page.find_element(By.ID, "start-btn").is_displayed()
    check = [b for b in page.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Check"][0]
    msg = _click_until(page, lambda: check, lambda: "valid" in _text(page, "#train-msg") and _text(page, "#train-msg"),
                       120, what="the Check message")
    assert "python -m calligrapher_rl.train --preset tiny-grpo" in msg


def test_click_through_to_a_run_monitor(page):
    By = _by()
    _tab(page, "Runs")

    def base_cell():
        cells = [c for c in page.find_elements(By.CSS_SELECTOR, "#runs-table [role=gridcell]") if c.text.strip() == "base"]
        return cells[0] if cells else None

    wait_for(lambda: "a fake run" in _text(page, "#run-status"), 30, what="the newest run's status on load")
    assert _text(page, "#run-status").startswith("zz-newer · failed")
    from selenium.common.exceptions import WebDriverException

    def click_then_status():  # the timer may re-render the table under the pointer: click again then
        try:
            wait_for(base_cell, 10, what="the run 'base' in the table").click()
            return wait_for(lambda: _text(page, "#run-status").startswith("base") and _text(page, "#run-status"), 5,
                            what="the run's status line")
        except (WebDriverException, AssertionError):
            return None

    status = wait_for(click_then_status, 60, every=0.1, what="the status of the clicked run")
    assert status.startswith("base · finished") and "step 4 / 4" in status and "checkpoints: 2, 4" in status, status
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
    """Start opens the Runs tab on the new run at once: the monitor never shows the run selected before."""
    By = _by()
    page.get(f"{page.base_url}?run=base")  # a run selected before Start, whichever tests ran on this page before
    wait_for(lambda: _selected_tab(page) == "Runs" and _text(page, "#run-status").startswith("base"), 60,
             what="the previously selected run")
    _tab(page, "Train")
    extra = wait_for(lambda: [t for t in page.find_elements(By.CSS_SELECTOR, "textarea, input[type=text]")
                              if (t.get_attribute("placeholder") or "").startswith("--seed")], 30, what="extra flags")
    extra[0].clear()
    extra[0].send_keys("--max_train_steps 2 --eval_steps 2 --checkpointing_steps 2 --num_eval_noises 2")
    page.find_element(By.ID, "start-btn").click()
    shown = []  # every status line visible on the Runs tab from the click until the run finishes

    def watch():
        if _selected_tab(page) == "Runs":
            text = _text(page, "#run-status")
            if text and (not shown or shown[-1] != text):
                shown.append(text)
        return shown and "finished" in shown[-1]

    def started():
        watch()
        text = page.find_element(By.ID, "train-msg").get_attribute("textContent")
        return "started " in text and text  # (the message of the Check before it is still there until then)

    msg = wait_for(started, 60, every=0.05, what="the Start message (the page has moved to the Runs tab)")
    name = msg.split("started ", 1)[1].split()[0]
    try:
        wait_for(watch, 180, every=0.05, what="the run started from the page to finish in its monitor")
        assert all(t.startswith(name + " ·") for t in shown), shown  # never another run, not even for a moment
        assert "step 2 / 2" in shown[-1]
        assert any(c.text.strip() == name for c in page.find_elements(By.CSS_SELECTOR, "#runs-table [role=gridcell]"))
        log = wait_for(lambda: "saved" in _value(page, "#run-log textarea") and _value(page, "#run-log textarea"), 30,
                       what="the log of the run")
        assert "$ python -m calligrapher_rl.train" in log
        # the log box follows its tail: it overflows, and it is scrolled to the end
        gap = "const t = document.querySelector('#run-log textarea'); return [t.scrollHeight - t.clientHeight, " \
              "t.scrollHeight - t.scrollTop - t.clientHeight];"
        overflow, below = wait_for(lambda: (lambda g: g if g[1] <= 30 else None)(page.execute_script(gap)), 30,
                                   what="the log scrolled to its last line")
        assert overflow > 0 and below <= 30
    finally:
        kill_run(os.path.join(page.runs_dir, name))


def _pick(driver, css: str, text: str) -> None:
    """Type into a dropdown and click the option whose label contains `text`."""
    By = _by()
    box = driver.find_element(By.CSS_SELECTOR, f"{css} input")
    box.click()
    box.send_keys(text)
    option = wait_for(lambda: [o for o in driver.find_elements(By.CSS_SELECTOR, "[role=option], ul.options li")
                               if text in o.text], 30, what=f"the option {text!r}")
    option[0].click()


def _type_number(driver, css: str, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(_by().CSS_SELECTOR, f"{css} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value, Keys.TAB)


def test_compare_evaluates_three_checkpoints_and_gives_the_verdict(page):
    """Compare: a run's start and newest checkpoint (one click) plus the base weights, on the run's data with 2
    noises per example; the page shows the verdict of B and C against A and a grid per checkpoint."""
    By = _by()
    page.get(page.base_url)
    _tab(page, "Compare")
    wait_for(lambda: page.find_element(By.ID, "cmp-step0").is_displayed(), 30, what="the Compare tab")
    _click_until(page, "cmp-step0", lambda: "starting point" in _text(page, "#cmp-eval-msg"), 120,
                 what="A and B filled from the run")
    _pick(page, "#cmp-3", "base weights")
    _type_number(page, "#cmp-noises", "2")
    _type_number(page, "#cmp-examples", "2")
    page.find_element(By.ID, "cmp-eval-btn").click()
    verdict = wait_for(lambda: _text(page, "#cmp-verdict").count(" vs ") == 2 and _text(page, "#cmp-verdict"), 240,
                       what="the verdict of B and C against A")
    assert all(("is better" in line or "no clear difference" in line) for line in verdict.splitlines()), verdict
    assert "start (checkpoint-0)" in verdict and "2 examples x 2 noises" in _text(page, "#cmp-eval-msg")
    for i in (1, 2, 3):
        wait_for(lambda i=i: len(page.find_elements(By.CSS_SELECTOR, f"#cmp-grid-{i} img")) >= 4, 30,
                 what=f"the grid of checkpoint {i}")
    assert not any(e.is_displayed() for e in page.find_elements(By.ID, "cmp-grid-4"))


def test_a_run_link_opens_its_monitor(page):
    page.get(f"{page.base_url}?run=base")
    wait_for(lambda: _selected_tab(page) == "Runs" and _text(page, "#run-status").startswith("base · finished"), 60,
             every=0.1, what="?run=base to open the Runs tab on that run")


def test_screenshots_of_each_tab(page, tmp_path):
    """A picture of every tab (docs/studio.md shows them): STUDIO_SCREENSHOTS=docs/img writes them there."""
    from PIL import Image

    out = os.environ.get("STUDIO_SCREENSHOTS") or str(tmp_path)
    os.makedirs(out, exist_ok=True)
    page.get(f"{page.base_url}?run=base")
    wait_for(lambda: _text(page, "#run-status").startswith("base · finished"), 60, what="the run's monitor")
    wait_for(lambda: page.find_elements(_by().CSS_SELECTOR, "#plot-reward .js-plotly-plot"), 30, what="the charts")
    for label in ("Train", "Runs", "Inference", "Compare", "Dataset"):
        _tab(page, label)
        wait_for(lambda label=label: _selected_tab(page) == label, 30, what=f"the {label} tab")
        if label == "Compare" and os.environ.get("STUDIO_SCREENSHOTS"):  # the docs' picture shows an evaluation
            _click_until(page, "cmp-step0", lambda: "starting point" in _text(page, "#cmp-eval-msg"), 120,
                         what="A and B filled")
            _pick(page, "#cmp-3", "base weights")
            _type_number(page, "#cmp-noises", "4")
            page.find_element(_by().ID, "cmp-eval-btn").click()
            wait_for(lambda: _text(page, "#cmp-verdict").count(" vs ") == 2 or "⚠" in _text(page, "#cmp-eval-msg"), 300,
                     what="the evaluation")
            assert "⚠" not in _text(page, "#cmp-eval-msg"), _text(page, "#cmp-eval-msg")
            wait_for(lambda: len(page.find_elements(_by().CSS_SELECTOR, "#cmp-grid-3 img")) >= 4, 30, what="grids")
        if label == "Dataset":  # with a page of examples
            [b for b in page.find_elements(_by().TAG_NAME, "button") if b.text.strip() == "Show examples"][0].click()
            wait_for(lambda: "usable entries" in _text(page, "#data-msg"), 60, what="a page of examples")
        path = os.path.join(out, f"studio-{label.lower()}.png")
        assert page.save_screenshot(path)
        with Image.open(path) as im:  # small enough for the repository: half size, 64 colours
            small = im.convert("RGB").resize((im.width // 2, im.height // 2), Image.LANCZOS)
        small.quantize(64).save(path, optimize=True)
        assert 0 < os.path.getsize(path) < 400_000
