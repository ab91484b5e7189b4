"""The status page in a real headless Chromium, in the portal's frame, in Russian and in English.

Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing), driven by
Selenium; nothing is downloaded. Screenshots go to `artifacts/` (git-ignored), for people to look at.
"""

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.fake_portal import FakePortal, FakePortalConfig
from tests.processes import PROJECT, AppProcess, app_env, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = PROJECT / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
WORDS = {
    "ru": ("Обработчик робота", "Последние запуски робота", "ответ с ошибкой", "Время указано в"),
    "en": ("Robot handler", "Last robot runs", "answered with an error", "Times are in"),
}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    assert not missing, f"missing {missing}: apt-get install -y chromium chromium-driver (Debian's packages)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _console_errors(driver: WebDriver) -> list[str]:
    entries: list[dict[str, str]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]


def _wait_pending_zero(app: AppProcess) -> None:
    deadline = time.monotonic() + 20
    while httpx.get(f"{app.url}/health", timeout=5).json()["queue"]["pending"]:
        assert time.monotonic() < deadline, "the robot calls were never answered"
        time.sleep(0.05)


def _run_robot_calls(portal: FakePortal, app: AppProcess) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    install = httpx.post(f"{app.url}/install", content=portal.install_event_body(), headers=form, timeout=30)
    assert install.status_code == 200, install.text
    for properties in (
        {"last_name": "Иванов", "first_name": "Иван", "phone": "+79991234567"},
        {"first_name": "Petr", "email": "not-an-email"},
    ):
        _, body = portal.robot_call_body(properties)
        assert httpx.post(f"{app.url}/robot", content=body, headers=form, timeout=30).status_code == 200
    portal.wait_for_answers(2, timeout=20)
    _wait_pending_zero(app)


@pytest.mark.timeout(300)  # a real browser and a real app process, on a shared machine
@pytest.mark.parametrize("language", ["ru", "en"])
def test_status_page_in_the_portal_frame(browser: WebDriver, tmp_path: Path, language: str) -> None:
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    config = FakePortalConfig(redirect_uri=f"{app_url}/app", language=language)
    with FakePortal(config) as portal:
        app = AppProcess(
            tmp_path, app_env(portal, app_url, PORT=str(port)), port, tmp_path / "app.log", ready_timeout=60
        )
        try:
            _run_robot_calls(portal, app)
            browser.get(f"{portal.url}/marketplace/app/1/?handler={app_url}/app")
            browser.switch_to.frame("app")
            WebDriverWait(browser, 20).until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "table.runs"))
            )
            page = browser.find_element(By.TAG_NAME, "body").text
            ARTIFACTS.mkdir(exist_ok=True)
            browser.switch_to.default_content()
            browser.save_screenshot(str(ARTIFACTS / f"status-page-{language}.png"))
            browser.switch_to.frame("app")

            for words in WORDS[language]:
                assert words in page
            assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == language
            links = [a.get_attribute("href") or "" for a in browser.find_elements(By.CSS_SELECTOR, "a[href]")]
            assert any("/crm/contact/details/" in link for link in links)
            assert any("/crm/deal/details/" in link for link in links)
            for link in links:
                assert httpx.get(link, timeout=10).status_code == 200, link

            contact = browser.find_element(By.CSS_SELECTOR, "a.contact")
            target = contact.get_attribute("href")
            contact.click()  # target=_top: the portal itself shows the contact, not the frame
            WebDriverWait(browser, 20).until(lambda driver: driver.current_url == target)
            browser.switch_to.default_content()
            assert browser.find_element(By.ID, "crm-item").text.startswith("/crm/contact/details/")
            assert _console_errors(browser) == []
        finally:
            app.stop()


@pytest.mark.timeout(300)
def test_public_status_page_from_the_root_address(browser: WebDriver, tmp_path: Path) -> None:
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    with FakePortal(FakePortalConfig(redirect_uri=f"{app_url}/app")) as portal:
        app = AppProcess(
            tmp_path, app_env(portal, app_url, PORT=str(port)), port, tmp_path / "app.log", ready_timeout=60
        )
        try:
            browser.get(f"{app_url}/")
            WebDriverWait(browser, 20).until(
                expected_conditions.presence_of_element_located((By.ID, "handler-url"))
            )
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "status-page-public.png"))

            assert browser.current_url == f"{app_url}/app"
            warnings = browser.find_elements(By.CSS_SELECTOR, ".handler-warning")
            assert [w.get_attribute("data-code") for w in warnings] == ["private_address", "plain_http"]
            assert browser.find_elements(By.CSS_SELECTOR, "table.runs") == []  # no runs for strangers
            assert _console_errors(browser) == []
        finally:
            app.stop()
