"""Clicks through the authorisation page in a real headless browser, as an administrator does.

Usage: browser_authorise.py URL APP_ID

Opens URL (the PC authorisation URL `touchctl auth wechat` prints) in headless Chromium, clicks the
button that authorises APP_ID, follows the redirects to the page the daemon shows after the
binding, and prints that page's URL and text. Exits non-zero when the page has no such button or
the browser cannot get there.
"""

import os
import sys

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:
    # Exit 3: what the test needs is not installed (.ci/run installs it).
    print(f"selenium is not installed ({e}) ")
    sys.exit(3)

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def main():
    url, app_id = sys.argv[1], sys.argv[2]
    for path in (CHROMIUM, DRIVER):
        if not os.access(path, os.X_OK):
            print(f"{path} is not installed (Debian packages chromium and chromium-driver) ")
            sys.exit(3)
    options = Options()
    options.add_argument("--headless=new")
    # The tests run as root in CI containers, where Chromium's own sandbox cannot start.
    options.add_argument("--no-sandbox")
    options.add_argument("--disable-dev-shm-usage")
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        start = driver.current_url
        button = driver.find_element(By.ID, "authorise-" + app_id)
        button.click()
        WebDriverWait(driver, 30).until(expected_conditions.url_changes(start))
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        print("url:", driver.current_url)
        print(driver.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
