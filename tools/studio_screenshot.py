"""Take docs/studio.png, the README's picture of the studio, on the demo's own models.

    make demo && python -m tools.studio_screenshot [--out docs/studio.png]

Serves the studio from this checkout on a free loopback port, opens it in headless Chromium
(Debian's chromium and chromium-driver), picks an eval sample (always the same one: a demo garment
photo, its prompt and the seed the generate stages used), draws two seeds and saves the whole page.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SAMPLE_SEED = 3  # which eval sample the "Eval sample" button picks: the same picture on every run


def main() -> None:
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from fashion.studio import Studio, app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/studio.png")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    studio = Studio()
    pick = studio.sample
    studio.sample = lambda seed=None: pick(SAMPLE_SEED if seed is None else seed)
    server = uvicorn.Server(uvicorn.Config(app(studio), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=1280,900"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            wait = WebDriverWait(driver, 300)
            driver.get(f"http://127.0.0.1:{port}")
            wait.until(lambda d: d.find_element(By.ID, "steps").get_attribute("value"))
            driver.find_element(By.ID, "sample").click()
            wait.until(lambda d: d.execute_script("const i = document.getElementById('edge-preview');"
                                                  "return i.complete && i.naturalWidth > 0"))
            count = driver.find_element(By.ID, "count")
            count.clear()
            count.send_keys("2")
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.generated")) == 4
                       or d.find_element(By.ID, "error").is_displayed())
            if driver.find_element(By.ID, "error").is_displayed():
                sys.exit(f"studio: {driver.find_element(By.ID, 'error').text}")
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, height + 200)
            wait.until(lambda d: d.execute_script("return window.innerHeight") >= height)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(args.out)
            print(f"wrote {args.out}: {driver.find_element(By.ID, 'source').text}; "
                  f"{driver.find_element(By.ID, 'status').text}", file=sys.stderr)
        finally:
            driver.quit()
            server.should_exit = True


if __name__ == "__main__":
    main()
