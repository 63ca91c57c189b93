"""A picture of the studio's Runs tab for one run (its status, reward/KL charts and sample grid), taken in a
real headless browser (Debian chromium + chromium-driver, Selenium), as docs/learning.md shows it:

    python scripts/studio_screenshot.py RUNS_DIR RUN OUT.png
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _wait(fn, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"error: timed out waiting for {what}")


def main(runs_dir: str, run: str, out: str) -> None:
    import socket

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from app.server import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(runs_dir, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    profile = tempfile.mkdtemp(prefix="studio-chromium-")
    opts = webdriver.ChromeOptions()
    binary = "/usr/lib/chromium/chromium"
    opts.binary_location = binary if os.path.exists(binary) else "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/?run={run}")

        def status() -> str:
            found = driver.find_elements(By.CSS_SELECTOR, "#run-status")
            return found[0].text if found else ""

        _wait(lambda: status().startswith(f"{run} ·"), 90, "the run's monitor")
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#plot-reward .js-plotly-plot"), 60, "the charts")
        time.sleep(2)  # let plotly finish drawing
        driver.save_screenshot(out)
    finally:
        driver.quit()
        demo.close()
        shutil.rmtree(profile, ignore_errors=True)
    with Image.open(out) as im:  # small enough for the repository
        small = im.convert("RGB").resize((im.width // 2, im.height // 2), Image.LANCZOS)
    small.quantize(64).save(out, optimize=True)
    print(out, os.path.getsize(out))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
