"""The fake portal behaves as `/work/shared/bitrix24-wire.md` documents a real one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

from tests.fake_portal import (
    FakePortal,
    FakePortalConfig,
    build_php_query,
    parse_php_query,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ROBOT = {
    "CODE": "create_contact",
    "HANDLER": "http://127.0.0.1:8000/robot",
    "AUTH_USER_ID": 1,
    "USE_SUBSCRIPTION": "Y",
    "NAME": {"ru": "Создать контакт", "en": "Create contact"},
    "PROPERTIES": {"last_name": {"Name": {"en": "Last name"}, "Type": "string"}},
    "RETURN_PROPERTIES": {"contact_id": {"Name": {"en": "Contact ID"}, "Type": "int"}},
}


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal(FakePortalConfig(rate_burst=None)) as running:
        yield running


@pytest.fixture
def client(portal: FakePortal) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=portal.url, timeout=5) as http:
        yield http


def decode(body: str) -> dict[str, Any]:
    return parse_php_query(parse_qsl(body, keep_blank_values=True))


def install_token(portal: FakePortal, user_id: int = 1) -> str:
    token: str = decode(portal.install_event_body(user_id=user_id))["auth"]["access_token"]
    return token


def call(client: httpx.Client, method: str, token: str, **params: Any) -> httpx.Response:
    return client.post(f"/rest/{method}.json", json={**params, "auth": token})


def exchange(client: httpx.Client, portal: FakePortal, **params: str) -> httpx.Response:
    secrets = {"client_id": portal.config.client_id, "client_secret": portal.config.client_secret}
    return client.get("/oauth/token/", params={**secrets, **params})


def test_code_exchange_and_refresh_rotation(portal: FakePortal, client: httpx.Client) -> None:
    location = client.get(
        "/oauth/authorize/", params={"client_id": portal.config.client_id, "state": "xyz"}
    ).headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == ["xyz"]
    assert query["domain"] == [portal.domain]
    assert query["scope"] == ["crm,bizproc"]
    assert "scope=crm%2Cbizproc" in location

    first = exchange(client, portal, grant_type="authorization_code", code=query["code"][0])
    assert first.status_code == 200
    tokens = first.json()
    assert list(tokens) == [
        "access_token", "expires", "expires_in", "scope", "domain", "server_endpoint",
        "status", "client_endpoint", "member_id", "user_id", "refresh_token",
    ]  # fmt: skip
    assert tokens["domain"] == "oauth.bitrix.info"
    assert tokens["client_endpoint"] == portal.client_endpoint
    again = exchange(client, portal, grant_type="authorization_code", code=query["code"][0])
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")

    # Refresh as CRest does it: a form POST.
    form = {
        "grant_type": "refresh_token",
        "client_id": portal.config.client_id,
        "client_secret": portal.config.client_secret,
        "refresh_token": tokens["refresh_token"],
    }
    rotated = client.post("/oauth/token/", data=form)
    assert rotated.status_code == 200
    assert rotated.json()["refresh_token"] != tokens["refresh_token"]
    assert rotated.json()["user_id"] == tokens["user_id"]
    stale = client.post("/oauth/token/", data=form)
    assert (stale.status_code, stale.json()["error"]) == (400, "invalid_grant")
    assert call(client, "app.info", rotated.json()["access_token"]).status_code == 200
    assert portal.stats["refreshes"] == 1
    assert portal.stats["code_exchanges"] == 1


def test_token_endpoint_errors(portal: FakePortal, client: httpx.Client) -> None:
    wrong = client.get(
        "/oauth/token/",
        params={"grant_type": "refresh_token", "client_id": "x", "client_secret": "y"},
    )
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    missing = client.get("/oauth/token/", params={"grant_type": "refresh_token"})
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")
    portal.fail_next("oauth.token", 402, "PAYMENT_REQUIRED", "Payment required")
    paid = exchange(client, portal, grant_type="refresh_token", refresh_token="whatever")
    assert paid.status_code == 402
    assert paid.json() == {"error": "PAYMENT_REQUIRED", "error_description": "Payment required"}
    unknown_app = client.get("/oauth/authorize/", params={"client_id": "nope", "state": "s"})
    assert unknown_app.status_code == 400
    assert "location" not in unknown_app.headers


def test_expired_and_unknown_tokens(portal: FakePortal, client: httpx.Client) -> None:
    token = install_token(portal)
    assert client.get("/rest/app.info", params={"auth": token}).json()["result"]["INSTALLED"]
    portal.expire_access_tokens()
    expired = call(client, "app.info", token)
    assert expired.status_code == 401
    assert expired.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired",
    }
    unknown = call(client, "app.info", "not-a-token")
    assert (unknown.status_code, unknown.json()["error"]) == (401, "NO_AUTH_FOUND")
    fresh = install_token(portal)
    assert call(client, "nope.method", fresh).status_code == 404


def test_rate_limit_after_burst(portal: FakePortal, client: httpx.Client) -> None:
    token = install_token(portal)
    portal.set_rate_limit(5, 0.001)
    codes = [call(client, "app.info", token).status_code for _ in range(7)]
    assert codes == [200] * 5 + [503] * 2
    limited = call(client, "app.info", token).json()
    assert limited == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    assert portal.stats["rate_limited"] == 3


def test_batch_reports_per_command_errors(portal: FakePortal, client: httpx.Client) -> None:
    token = install_token(portal)
    good = build_php_query({"fields": {"NAME": "Ivan", "EMAIL": [{"VALUE": "i@example.com"}]}})
    bad = build_php_query({"fields": {"NAME": "Petr", "EMAIL": [{"VALUE": "not-an-email"}]}})
    portal.fail_next("crm.contact.get", 500, "INTERNAL_SERVER_ERROR", "Internal server error")
    cmd = {
        "ok": f"crm.contact.add?{good}",
        "bad": f"crm.contact.add?{bad}",
        "missing": "no.such.method",
        "nested": "batch?cmd%5Bx%5D=app.info",
        "failed": "crm.contact.get?id=1",
        "chained": "crm.contact.get?id=$result[ok]",
    }
    response = call(client, "batch", token, halt=0, cmd=cmd)
    assert response.status_code == 200
    body = response.json()["result"]
    assert body["result"]["ok"] == 1
    assert body["result"]["chained"]["NAME"] == "Ivan"
    errors = {key: value["error"] for key, value in body["result_error"].items()}
    assert errors == {
        "bad": "ERROR_CORE",
        "missing": "ERROR_METHOD_NOT_FOUND",
        "nested": "ERROR_BATCH_METHOD_NOT_ALLOWED",
        "failed": "INTERNAL_SERVER_ERROR",
    }
    assert body["result_total"] == []
    assert body["result_next"] == []
    assert portal.stats["batches"] == 1
    assert len(portal.contacts) == 1

    halted = call(client, "batch", token, halt=1, cmd=["no.such.method", "app.info"]).json()
    # Command ids 0..n make PHP arrays "lists": result_error is a JSON array here, not an object.
    assert halted["result"]["result"] == []
    assert [e["error"] for e in halted["result"]["result_error"]] == ["ERROR_METHOD_NOT_FOUND"]
    too_long = call(client, "batch", token, cmd={f"c{i}": "app.info" for i in range(51)})
    assert (too_long.status_code, too_long.json()["error"]) == (400, "ERROR_BATCH_LENGTH_EXCEEDED")


def test_event_send_accepts_every_signed_token_and_drops_late_answers(
    portal: FakePortal, client: httpx.Client
) -> None:
    event_token, body = portal.robot_call_body({"last_name": "Ivanov"})
    sent = decode(body)
    assert sent["event_token"] == event_token
    assert sent["use_subscription"] == "Y"
    assert sent["document_type"] == ["crm", "CCrmDocumentDeal", "DEAL"]
    assert sent["properties"] == {"last_name": "Ivanov"}
    token = sent["auth"]["access_token"]
    answer = {"EVENT_TOKEN": event_token, "RETURN_VALUES": {"contact_id": 5}, "LOG_MESSAGE": "ok"}
    assert call(client, "bizproc.event.send", token, **answer).json()["result"] is True
    portal.wait_for_answers(1, timeout=1)
    assert portal.answers[event_token] == {"return_values": {"contact_id": 5}, "log_message": "ok"}
    # A second answer is accepted too (restservice.php sendEvent) and ignored by the closed activity.
    assert call(client, "bizproc.event.send", token, **answer).json()["result"] is True
    assert [d["event_token"] for d in portal.dropped_answers] == [event_token]
    # A redelivery of an answered call does not reopen it.
    portal.robot_call_body({"last_name": "Ivanov"}, event_token=event_token)
    assert call(client, "bizproc.event.send", token, **answer).json()["result"] is True
    with pytest.raises(AssertionError, match="expected 2"):
        portal.wait_for_answers(2, timeout=0.05)
    # A robot that does not wait (use_subscription N) takes the answer and ignores it.
    silent_token, _ = portal.robot_call_body({"last_name": "Ivanov"}, use_subscription="N")
    silent = {**answer, "EVENT_TOKEN": silent_token}
    assert call(client, "bizproc.event.send", token, **silent).json()["result"] is True
    assert silent_token not in portal.answers
    # Only a token the portal did not sign is refused.
    forged = {**answer, "EVENT_TOKEN": event_token[:-4] + "0000"}
    refused = call(client, "bizproc.event.send", token, **forged)
    assert refused.status_code == 403
    assert refused.json() == {"error": "ACCESS_DENIED", "error_description": "Access denied!"}


def test_handler_hosts_without_a_dot_are_refused(portal: FakePortal, client: httpx.Client) -> None:
    admin = install_token(portal)
    for handler in ("http://localhost:8000/robot", "https://myserver/robot", "http://.example.com/robot"):
        refused = call(client, "bizproc.robot.add", admin, **{**ROBOT, "HANDLER": handler})
        assert refused.json() == {
            "error": "ERROR_WRONG_HANDLER_URL",
            "error_description": "Wrong handler URL",
        }
        bind = call(client, "event.bind", admin, event="ONAPPUPDATE", handler=handler)
        assert bind.json()["error"] == "ERROR_WRONG_HANDLER_URL"
    assert call(client, "bizproc.robot.add", admin, **ROBOT).json()["result"] is True


def test_plan_without_automation_rules_has_no_robot_methods(client: httpx.Client) -> None:
    with FakePortal(FakePortalConfig(rate_burst=None, automation_rules=False)) as bare:
        admin = install_token(bare)
        with httpx.Client(base_url=bare.url, timeout=5) as http:
            for method in ("bizproc.robot.add", "bizproc.robot.list", "bizproc.event.send"):
                missing = call(http, method, admin, **ROBOT)
                assert missing.status_code == 404
                assert missing.json()["error"] == "ERROR_METHOD_NOT_FOUND"
            assert call(http, "app.info", admin).status_code == 200


def test_update_event_deletes_the_robots_and_follows_the_docs(
    portal: FakePortal, client: httpx.Client
) -> None:
    admin = install_token(portal)
    assert call(client, "bizproc.robot.add", admin, **ROBOT).json()["result"] is True

    sent = decode(portal.update_event_body(application_token="c917d38f6bdb84e9d9e0bfe9d585be73"))

    assert portal.robots == {}
    assert sent["event"] == "ONAPPUPDATE"
    assert set(sent["data"]) == {"VERSION", "PREVIOUS_VERSION", "LANGUAGE_ID"}
    assert sent["auth"]["application_token"] == "c917d38f6bdb84e9d9e0bfe9d585be73"
    assert sent["auth"]["refresh_token"]


def test_robot_registration_rules(portal: FakePortal, client: httpx.Client) -> None:
    admin = install_token(portal)
    assert call(client, "bizproc.robot.add", admin, **ROBOT).json()["result"] is True
    duplicate = call(client, "bizproc.robot.add", admin, **ROBOT)
    assert duplicate.status_code == 400
    assert duplicate.json() == {
        "error": "ERROR_ACTIVITY_ALREADY_INSTALLED",
        "error_description": "Activity or Robot already installed!",
    }
    invalid = [
        ({**ROBOT, "CODE": "bad code"}, "ERROR_ACTIVITY_VALIDATION_FAILURE"),
        ({**ROBOT, "HANDLER": "not a url"}, "ERROR_WRONG_HANDLER_URL"),
        ({**ROBOT, "HANDLER": "ftp://127.0.0.1/robot"}, "ERROR_UNSUPPORTED_PROTOCOL"),
        ({**ROBOT, "PROPERTIES": {"x": {"Type": "string"}}}, "ERROR_ACTIVITY_VALIDATION_FAILURE"),
    ]
    for fields, error in invalid:
        assert call(client, "bizproc.robot.add", admin, **fields).json()["error"] == error
    user = install_token(portal, user_id=2)
    denied = call(client, "bizproc.robot.add", user, **{**ROBOT, "CODE": "other"})
    assert (denied.status_code, denied.json()["error"]) == (400, "ACCESS_DENIED")
    update = call(client, "bizproc.robot.update", admin, code="create_contact", fields={})
    assert update.json()["error"] == "ERROR_ACTIVITY_VALIDATION_FAILURE"
    assert call(client, "bizproc.robot.list", admin).json()["result"] == ["create_contact"]
    assert portal.robots["create_contact"]["HANDLER"] == ROBOT["HANDLER"]
    bind = {"event": "onAppUninstall", "handler": "http://127.0.0.1:8000/uninstall"}
    assert call(client, "event.bind", admin, **bind).json()["result"] is True
    assert call(client, "event.bind", admin, **bind).json()["error"] == "ERROR_HANDLER_ALREADY_EXIST"
    assert portal.bound_events[0]["event"] == "ONAPPUNINSTALL"


def test_form_encoded_contact_roundtrip(portal: FakePortal, client: httpx.Client) -> None:
    token = install_token(portal)
    fields = {
        "NAME": "Ivan",
        "PHONE": [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}],
        "ORIGINATOR_ID": "app",
        "ORIGIN_ID": "evt-1",
    }
    form = build_php_query({"auth": token, "FIELDS": fields})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    added = client.post("/rest/crm.contact.add", content=form, headers=headers).json()
    assert added["result"] == 1
    got = call(client, "crm.contact.get", token, ID=1).json()["result"]
    assert got["ID"] == "1"
    assert got["PHONE"][0]["TYPE_ID"] == "PHONE"
    assert isinstance(got["PHONE"][0]["ID"], str)
    missing = call(client, "crm.contact.get", token, id=99)
    assert (missing.status_code, missing.json()) == (
        400,
        {"error": "", "error_description": "Not found"},
    )
    listed = call(client, "crm.contact.list", token, filter={"ORIGIN_ID": "evt-1"}).json()
    assert listed["total"] == 1
    assert listed["result"][0]["ID"] == "1"
    phone = {"type": "PHONE", "values": ["89991234567"], "entity_type": "CONTACT"}
    assert call(client, "crm.duplicate.findbycomm", token, **phone).json()["result"] == {"CONTACT": [1]}
    nobody = {"type": "EMAIL", "values": ["x@example.com"]}
    assert call(client, "crm.duplicate.findbycomm", token, **nobody).json()["result"] == []
    not_array = call(client, "crm.contact.add", token, fields="x").json()
    assert not_array == {"error": "", "error_description": "Parameter 'fields' must be array."}


def test_event_bodies_follow_the_wire_doc(portal: FakePortal) -> None:
    install = portal.install_event_body()
    assert install.startswith("event=ONAPPINSTALL&data%5BVERSION%5D=")
    auth = decode(install)["auth"]
    assert list(auth) == [
        "access_token", "expires", "expires_in", "scope", "domain", "server_endpoint", "status",
        "client_endpoint", "member_id", "user_id", "refresh_token", "application_token",
    ]  # fmt: skip
    assert auth["application_token"] == portal.application_token
    assert auth["client_endpoint"] == portal.client_endpoint
    assert auth["scope"] == "crm,bizproc"
    query, body = portal.iframe_install()
    assert decode(query)["DOMAIN"] == portal.domain
    assert decode(query)["PROTOCOL"] == "0"
    assert decode(body)["APPLICATION_TOKEN"] == portal.application_token
    uninstall = decode(portal.uninstall_event_body())
    assert uninstall["event"] == "ONAPPUNINSTALL"
    assert "access_token" not in uninstall["auth"]


def test_hold_delays_rest_until_release(portal: FakePortal, client: httpx.Client) -> None:
    token = install_token(portal)
    portal.hold()
    statuses: list[int] = []
    worker = threading.Thread(target=lambda: statuses.append(call(client, "app.info", token).status_code))
    worker.start()
    time.sleep(0.1)
    assert statuses == []
    assert portal.stats["held_requests"] == 1
    assert client.get("/_fake/stats").status_code == 200  # control API is never held
    portal.release()
    worker.join(timeout=2)
    assert statuses == [200]


def test_control_api(portal: FakePortal, client: httpx.Client) -> None:
    robot = client.post("/_fake/robot-body", json={"properties": {"last_name": "X"}}).json()
    sent = decode(robot["body"])
    client.post(
        "/_fake/fail-next",
        json={"method": "bizproc.event.send", "status": 503, "error": "E", "description": "d"},
    )
    answer = {"event_token": robot["event_token"], "return_values": {"contact_id": 1}}
    token = sent["auth"]["access_token"]
    assert call(client, "bizproc.event.send", token, **answer).status_code == 503
    assert call(client, "bizproc.event.send", token, **answer).status_code == 200
    assert list(client.get("/_fake/answers").json()) == [robot["event_token"]]
    install = decode(client.post("/_fake/install-body").json()["body"])
    assert install["auth"]["user_id"] == "1"
    client.post("/_fake/rate-limit", json={"burst": 1, "drain": 0.001})
    client.post("/_fake/expire-tokens")
    assert call(client, "app.info", token).json()["error"] == "expired_token"
    assert call(client, "app.info", token).status_code == 503
    stats = client.get("/_fake/stats").json()
    assert stats["answers"] == 1
    assert stats["contacts"] == 0
    assert stats["rate_limited"] == 1


def test_cli_serves_until_killed() -> None:
    command = [sys.executable, "-m", "tests.fake_portal", "--port", "0", "--rate-burst", "7"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        assert line[0] == "FAKE_PORTAL_READY"
        assert httpx.get(f"{line[1]}/_fake/stats", timeout=5).json()["rest_requests"] == 0
    finally:
        process.terminate()
        process.wait(timeout=5)
    assert process.returncode == 0
