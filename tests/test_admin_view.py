"""The administrator's view: handler checks, languages, the status page's facts, /metrics, startup."""

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from config import get_settings
from main import create_app
from repositories.token_store import CHECK_SECONDS
from schemas import RobotRun
from services.handler_check import handler_warnings
from services.messages import choose, from_accept_language
from services.pages import document_link, duration, outcome
from tests.conftest import APP_URL, FORM, answer_for, make_settings, post_form
from tests.fake_portal import FakePortal, FakePortalConfig
from tests.processes import AppProcess, app_env, free_port

pytestmark = pytest.mark.anyio


# --- APP_BASE_URL -------------------------------------------------------------------------------


def _codes(url: str, port: int | None = None) -> list[str]:
    return [warning.code for warning in handler_warnings(url, port)]


@pytest.mark.parametrize(
    ("url", "port", "codes"),
    [
        ("http://localhost:8000", 18000, ["dotless_host", "plain_http", "port_mismatch"]),
        ("http://localhost:8000", 8000, ["dotless_host", "plain_http"]),
        ("https://myserver", None, ["dotless_host"]),
        ("https://192.168.1.10:8443", 8443, ["private_address"]),
        ("https://10.0.0.5", 8000, ["private_address", "port_mismatch"]),
        ("https://[::1]:8000", 8000, ["private_address"]),
        ("http://robot.example.com", 8000, ["plain_http"]),
        ("https://robot.example.com:9000", 8000, ["port_mismatch"]),
        # Behind a reverse proxy: public 443, the app on 8000. Nothing wrong.
        ("https://robot.example.com", 8000, []),
        ("https://93.184.215.14", None, []),
    ],
)
def test_handler_address_warnings(url: str, port: int | None, codes: list[str]) -> None:
    assert _codes(url, port) == codes


async def test_startup_log_says_what_to_open_and_what_is_wrong(
    tmp_path: Path, portal: FakePortal, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The case: only the keys set, and PORT=18000.
    monkeypatch.setenv("PORT", "18000")
    app = create_app()
    settings = make_settings(tmp_path, portal, app_base_url="http://localhost:8000")
    app.dependency_overrides[get_settings] = lambda: settings
    with caplog.at_level(logging.INFO):
        async with LifespanManager(app):
            pass

    log = "\n".join(record.getMessage() for record in caplog.records)
    assert (
        "Open the status page: http://localhost:8000/app (on this machine: http://127.0.0.1:18000/app)" in log
    )
    assert "Robot handler http://localhost:8000/robot" in log
    assert "has no domain" in log
    assert "plain http" in log
    assert "names port 8000, but the app listens on port 18000" in log


# --- languages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "lang"),
    [
        ("ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7", "ru"),
        ("en-US,en;q=0.9,ru;q=0.8", "en"),
        ("de-DE,de;q=0.9", None),
        ("de;q=1, ru;q=0.5, en;q=0.8", "en"),
        ("ru;q=0", None),
        ("", None),
        (None, None),
    ],
)
def test_accept_language(header: str | None, lang: str | None) -> None:
    assert from_accept_language(header) == lang


def test_the_portal_language_wins_then_the_browser_then_the_setting() -> None:
    assert choose("ru", "en", "en") == "ru"
    assert choose("de", "ru", "ru") == "en"  # a German portal: English, whatever the browser says
    assert choose(None, "ru-RU", "en") == "ru"
    assert choose(None, None, "ru") == "ru"
    assert choose("", "fr", "en") == "en"


@pytest.fixture
def russian_portal() -> FakePortalConfig:
    return FakePortalConfig(redirect_uri=f"{APP_URL}/app", language="ru")


@pytest.mark.parametrize(
    ("language", "properties", "expected"),
    [
        ("ru", {"first_name": "Petr", "email": "not-an-email"}, "исправьте e-mail в настройках робота"),
        ("ru", {"phone": "+79991234567"}, "Не указаны ни фамилия, ни имя"),
        ("en", {"first_name": "Petr", "email": "not-an-email"}, "Correct the e-mail in the robot's settings"),
        ("de", {"phone": "+79991234567"}, "fill in at least one of them"),
    ],
)
async def test_the_workflow_hears_the_portal_language(
    tmp_path: Path, language: str, properties: dict[str, str], expected: str
) -> None:
    with FakePortal(FakePortalConfig(redirect_uri=f"{APP_URL}/app", language=language)) as portal:
        async with _installed_app(tmp_path, portal) as client:
            token, body = portal.robot_call_body(properties)
            await post_form(client, "/robot", body)
            answer = await answer_for(portal, token)

    assert expected in answer["return_values"]["error"]
    assert answer["log_message"] == answer["return_values"]["error"]


async def test_a_russian_portal_gets_a_russian_log_message_on_success(tmp_path: Path) -> None:
    with FakePortal(FakePortalConfig(redirect_uri=f"{APP_URL}/app", language="ru")) as portal:
        async with _installed_app(tmp_path, portal) as client:
            token, body = portal.robot_call_body({"last_name": "Иванов", "phone": "+79991234567"})
            await post_form(client, "/robot", body)
            answer = await answer_for(portal, token)

    contact_id = portal.contacts[0]["ID"]
    assert answer["log_message"] == f"Создан контакт {contact_id}"
    assert answer["return_values"]["error"] == ""


class _installed_app:
    """The app wired to `portal` and installed on it, as an async context manager."""

    def __init__(self, tmp_path: Path, portal: FakePortal, **overrides: Any) -> None:
        self._app = create_app()
        settings = make_settings(tmp_path, portal, **overrides)
        self._app.dependency_overrides[get_settings] = lambda: settings
        self._portal = portal

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = LifespanManager(self._app)
        manager = await self._lifespan.__aenter__()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=APP_URL)
        response = await post_form(self._client, "/install", self._portal.install_event_body())
        assert response.status_code == 200, response.text
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()
        await self._lifespan.__aexit__(None, None, None)


# --- the status page ----------------------------------------------------------------------------


async def _run_robot(client: httpx.AsyncClient, portal: FakePortal, properties: dict[str, str]) -> None:
    token, body = portal.robot_call_body(properties)
    await post_form(client, "/robot", body)
    await answer_for(portal, token)
    # The portal has the answer a moment before the journal records it.
    deadline = time.monotonic() + 10
    while (await client.get("/health")).json()["queue"]["pending"]:
        assert time.monotonic() < deadline, "the journal never recorded the answer"
        await asyncio.sleep(0.02)


async def test_status_page_in_russian_for_a_russian_frame(tmp_path: Path) -> None:
    with FakePortal(FakePortalConfig(redirect_uri=f"{APP_URL}/app", language="ru")) as portal:
        async with _installed_app(tmp_path, portal) as client:
            await _run_robot(client, portal, {"last_name": "Ivanov", "phone": "+79991234567"})
            await _run_robot(client, portal, {"first_name": "Petr", "email": "not-an-email"})
            query, frame = portal.iframe_install()
            headers = {**FORM, "Accept-Language": "en"}  # the portal's language wins
            page = await client.post(f"/app?{query}", content=frame.encode(), headers=headers)

    text = page.text
    assert '<html lang="ru">' in text
    assert "Обработчик робота" in text
    assert "Контакт создан" in text
    assert "Ответ с ошибкой (неверные данные)" in text
    assert "ответ с ошибкой" in text  # the bad-data run is not shown as a plain "done"
    assert re.search(r"действует ещё \d+ мин", text)  # not "3586s"
    assert re.search(r"выдан 0 дней назад; осталось 180 дней", text)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC[+-]\d\d:\d\d", text)  # times with their zone


async def test_status_page_counts_outcomes_and_links_documents(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    await _run_robot(installed, portal, {"last_name": "Ivanov", "phone": "+79991234567"})
    await _run_robot(installed, portal, {"first_name": "Petr", "email": "not-an-email"})
    query, frame = portal.iframe_install()

    page = await post_form(installed, f"/app?{query}", frame)

    queue = re.search(r'<table class="queue">.*?</table>', page.text, re.S)
    assert queue is not None
    cells = re.findall(r"<td>(\d+)", queue.group(0))
    assert cells == ["1", "1", "0", "0", "0"]  # created, answered with an error, failed, abandoned, pending
    contact_id = portal.contacts[0]["ID"]
    assert f'href="{portal.url}/crm/contact/details/{contact_id}/"' in page.text
    assert f'href="{portal.url}/crm/deal/details/' in page.text  # the fake's robot calls run on deals
    assert "Robot last checked" in page.text
    assert "answered with an error" in page.text


async def test_status_page_language_from_the_browser_then_the_setting(
    client: httpx.AsyncClient,
) -> None:
    russian = await client.get("/app", headers={"Accept-Language": "ru-RU,ru;q=0.9"})
    english = await client.get("/app", headers={"Accept-Language": "en-GB"})
    default = await client.get("/app")

    assert '<html lang="ru">' in russian.text
    assert '<html lang="en">' in english.text
    assert '<html lang="en">' in default.text


async def test_status_page_default_language_setting(tmp_path: Path, portal: FakePortal) -> None:
    app = create_app()
    settings = make_settings(tmp_path, portal, default_language="ru")
    app.dependency_overrides[get_settings] = lambda: settings
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=APP_URL) as client:
            page = await client.get("/app")

    assert '<html lang="ru">' in page.text


async def test_status_page_warns_about_the_handler_address(client: httpx.AsyncClient) -> None:
    page = await client.get("/app")

    assert f'<code id="handler-url">{APP_URL}/robot</code>' in page.text
    assert 'data-code="plain_http"' in page.text


async def test_status_page_escapes_what_the_workflow_sent(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    await _run_robot(installed, portal, {"first_name": "Petr", "email": "<script>alert(1)</script>"})
    query, frame = portal.iframe_install()

    page = await post_form(installed, f"/app?{query}", frame)

    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


async def test_root_leads_to_the_status_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/")

    assert response.status_code == 303
    assert response.headers["location"] == "/app"


@pytest.mark.parametrize(
    ("document_id", "path"),
    [
        ("crm/CCrmDocumentDeal/DEAL_4521", "/crm/deal/details/4521/"),
        ("crm/CCrmDocumentLead/LEAD_7", "/crm/lead/details/7/"),
        ("crm/CCrmDocumentContact/CONTACT_109286", "/crm/contact/details/109286/"),
        ("crm/CCrmDocumentCompany/COMPANY_3", "/crm/company/details/3/"),
        (
            "crm/Bitrix\\Crm\\Integration\\BizProc\\Document\\Dynamic/DYNAMIC_128_5",
            "/crm/type/128/details/5/",
        ),
        (
            "crm/Bitrix\\Crm\\Integration\\BizProc\\Document\\SmartInvoice/SMART_INVOICE_9",
            "/crm/type/31/details/9/",
        ),
    ],
)
def test_document_links(document_id: str, path: str) -> None:
    assert document_link("https://example.bitrix24.ru", document_id) == "https://example.bitrix24.ru" + path


def test_no_link_for_documents_outside_the_crm() -> None:
    assert document_link("https://example.bitrix24.ru", "lists/BizprocDocument/17") is None
    assert document_link(None, "crm/CCrmDocumentDeal/DEAL_1") is None


@pytest.mark.parametrize(
    ("lang", "seconds", "text"),
    [("en", 3586, "59 min"), ("ru", 3586, "59 мин"), ("en", 7500, "2 h 5 min"), ("ru", 5 * 86400, "5 дней")],
)
def test_durations_are_read_by_people(lang: Any, seconds: float, text: str) -> None:
    assert duration(lang, seconds) == text


def test_a_done_run_with_an_error_is_answered_with_an_error() -> None:
    run = RobotRun(
        job_id=1, member_id="m", workflow_id="w", state="done", contact_id=0, error="x", created_at=0
    )
    assert outcome(run) == "answered_error"
    assert outcome(run.model_copy(update={"contact_id": 5, "error": ""})) == "created"


# --- /metrics -----------------------------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = (
        rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    )
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_calls_requests_and_the_queue(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    before = (await installed.get("/metrics")).text
    await _run_robot(installed, portal, {"last_name": "Ivanov", "phone": "+79991234567"})
    await _run_robot(installed, portal, {"first_name": "Petr", "email": "not-an-email"})
    portal.fail_next("batch", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
    await _run_robot(installed, portal, {"last_name": "Petrov"})

    response = await installed.get("/metrics")

    after = response.text
    assert response.headers["content-type"].startswith("text/plain")
    for outcome_name, grew in [("accepted", 3), ("created", 2), ("answered_with_error", 1)]:
        delta = _sample(after, "robot_calls_total", outcome=outcome_name)
        delta -= _sample(before, "robot_calls_total", outcome=outcome_name)
        assert delta == grew, outcome_name
    assert _sample(after, "bitrix_rest_requests_total", method="batch", status="200") > 0
    assert _sample(after, "bitrix_portal_overload_total", status="503") > _sample(
        before, "bitrix_portal_overload_total", status="503"
    )
    assert _sample(after, "robot_queue_pending") == 0
    assert _sample(after, "robot_portal_connected") == 1
    assert "robot_queue_oldest_pending_age_seconds 0.0" in after
    assert _sample(after, "robot_acknowledgement_seconds_count") >= 3
    assert "bitrix_rest_request_seconds_bucket" in after


async def test_metrics_count_token_refreshes(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    before = _sample((await installed.get("/metrics")).text, "bitrix_token_refreshes_total", outcome="ok")
    portal.expire_access_tokens()

    await _run_robot(installed, portal, {"last_name": "Ivanov"})

    after = _sample((await installed.get("/metrics")).text, "bitrix_token_refreshes_total", outcome="ok")
    assert after == before + 1


@pytest.mark.timeout(300)
def test_metrics_add_up_across_worker_processes(tmp_path: Path, portal: FakePortal) -> None:
    """`uvicorn --workers 2` with PROMETHEUS_MULTIPROC_DIR: every scrape counts every process's calls."""
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    env = app_env(portal, app_url, PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    # Generous: two workers start slowly on a loaded machine.
    app = AppProcess(tmp_path, env, port, tmp_path / "app.log", workers=2, ready_timeout=90)
    try:
        httpx.post(f"{app_url}/install", content=portal.install_event_body(), headers=FORM, timeout=30)
        calls = 12
        with httpx.Client(timeout=30) as client:  # new connections: the calls spread over both workers
            for index in range(calls):
                _, body = portal.robot_call_body({"last_name": f"Ivanov{index}"})
                client.post(f"{app_url}/robot", content=body, headers={**FORM, "Connection": "close"})
        portal.wait_for_answers(calls, timeout=30)
        scrapes = [httpx.get(f"{app_url}/metrics", headers={"Connection": "close"}).text for _ in range(4)]
    finally:
        app.stop()

    assert {_sample(text, "robot_calls_total", outcome="accepted") for text in scrapes} == {calls}


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/no-such-page", 404, "not_found"), ("GET", "/robot", 405, "method_not_allowed")],
)
async def test_http_errors_answer_what_the_readme_says(
    client: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    response = await client.request(method, path)

    assert (response.status_code, response.json()["error"]) == (status, code)


async def test_a_portal_without_a_stored_language_learns_it_from_the_frame(
    installed: httpx.AsyncClient, settings: Any
) -> None:
    portal_config = FakePortalConfig(redirect_uri=f"{APP_URL}/app", language="ru")
    tokens = json.loads(settings.token_file.read_text())
    for record in tokens["portals"].values():
        record["language"] = None  # installed by a version that did not store it
    settings.token_file.write_text(json.dumps(tokens))
    await asyncio.sleep(CHECK_SECONDS)  # written behind the app's back: seen within this
    member_id = next(iter(tokens["portals"]))
    frame_query = f"DOMAIN={tokens['portals'][member_id]['domain']}&PROTOCOL=0&LANG={portal_config.language}"
    body = (
        f"AUTH_ID=x&member_id={member_id}"
        f"&APPLICATION_TOKEN={tokens['portals'][member_id]['application_token']}"
    )

    await post_form(installed, f"/app?{frame_query}", body)

    stored = json.loads(settings.token_file.read_text())["portals"][member_id]
    assert stored["language"] == "ru"


async def test_status_page_says_when_the_portal_is_disconnected(
    installed: httpx.AsyncClient, portal: FakePortal, settings: Any
) -> None:
    tokens = json.loads(settings.token_file.read_text())
    for record in tokens["portals"].values():
        record["disconnected_reason"] = "The authorization server refused its refresh token (invalid_grant)."
    settings.token_file.write_text(json.dumps(tokens))
    await asyncio.sleep(CHECK_SECONDS)  # written behind the app's back: seen within this
    query, frame = portal.iframe_install()

    page = await post_form(installed, f"/app?{query}", frame)

    assert 'class="box bad disconnected"' in page.text
    assert "refused its refresh token (invalid_grant)" in page.text


# --- what /health concludes, and a renamed portal, on the status page ------------------------------


def _report(**values: Any) -> Any:
    from schemas import Health, PortalStatus, QueueStats, StatusReport

    health = Health(
        status=values.pop("status", "ok"),
        reasons=values.pop("reasons", []),
        portal_connected=values.pop("portal_connected", True),
        robot_registered=True,
        missing_settings=[],
        queue=QueueStats(),
    )
    portal = PortalStatus(
        member_id="m1",
        domain="old.bitrix24.ru",
        token_valid_for_seconds=3000,
        can_refresh=True,
        robot_registered=True,
        **values.pop("portal", {}),
    )
    return StatusReport(health=health, portals=[portal], verified=True, **values)


@pytest.mark.parametrize(
    ("lang", "shown"),
    [
        ("en", "2 job(s) failed for good in the last 24 hours (log: &#39;Job N failed&#39;)."),
        (
            "ru",
            "Заданий, окончательно не выполненных за последние 24 часа: 2 "
            "(в журнале: &#39;Job N failed&#39;).",
        ),
    ],
    ids=["en", "ru"],
)
def test_status_page_shows_what_health_concludes(lang: Any, shown: str) -> None:
    from schemas import HealthReason
    from services.pages import status_page

    reason = HealthReason(key="failed_last_day", values={"count": 2})
    page = status_page(_report(status="degraded", health_reasons=[reason], language=lang))
    assert 'id="health-status" data-status="degraded"' in page
    assert shown in page
    ok = status_page(_report(language=lang))
    assert 'data-status="ok"' in ok


def test_a_russian_status_page_words_every_health_reason_in_russian() -> None:
    from schemas import HealthReason
    from services.pages import status_page

    storage = "The job journal /srv/jobs.sqlite3 cannot be used: database or disk is full."
    reasons = [
        HealthReason(key="journal_down", values={"detail": storage}),
        HealthReason(key="token_store_down", values={"detail": "The token file t.json is unreadable."}),
        HealthReason(key="tokens_unsaved", values={"domain": "a.bitrix24.ru", "error": "ENOSPC."}),
        HealthReason(key="missing_settings", values={"names": "BITRIX_CLIENT_ID"}),
        HealthReason(key="no_portal"),
        HealthReason(key="no_usable_tokens"),
        HealthReason(key="failed_last_day", values={"count": 1}),
        HealthReason(key="retrying", values={"count": 3, "attempts": 5}),
    ]
    page = status_page(_report(status="down", health_reasons=reasons, language="ru"))
    shown = re.findall(r"<li>(.*?)</li>", page.split('class="health-reasons"')[1].split("</ul>")[0])

    assert len(shown) == len(reasons)
    for text in shown:
        words = re.sub(r"«[^»]*»|[A-Z_]{4,}|/oauth/login|\S+\.bitrix24\.ru|&#39;Job N failed&#39;", "", text)
        assert not re.search(r"[A-Za-z]{3,}", words), text  # Russian, but for what it quotes
    assert f"«{storage}»" in page  # the storage's own words, as the log has them


def test_status_page_shows_a_renamed_portal_and_what_to_change() -> None:
    from services.pages import status_page

    advice = (
        "The portal old.bitrix24.ru has moved to new.bitrix24.ru: set BITRIX_PORTAL_URL="
        "https://new.bitrix24.ru and restart the app."
    )
    followed = status_page(_report(portal={"renamed_from": "older.bitrix24.ru"}))
    assert 'class="renamed-from"' in followed
    assert "older.bitrix24.ru" in followed
    refused = status_page(_report(portal={"moved_to": "https://new.bitrix24.ru/", "move_advice": advice}))
    assert 'class="box bad move-advice"' in refused
    assert advice in refused


def test_status_page_does_not_ask_to_install_a_portal_that_is_installed_but_disconnected() -> None:
    from services.pages import status_page

    reason = "No usable tokens: open /oauth/login to authorize the app again."
    page = status_page(_report(portal_connected=False, reasons=[reason]))
    assert "No portal connected yet" not in page
