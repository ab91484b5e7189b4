"""HTML pages say who may frame them (the portal, nothing else), and leak no OAuth code."""

import httpx
import pytest

from tests.conftest import post_form
from tests.fake_portal import FakePortal

pytestmark = pytest.mark.anyio


def assert_page_headers(response: httpx.Response, portal: FakePortal) -> None:
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    [ancestors] = [part.strip() for part in policy.split(";") if part.strip().startswith("frame-ancestors")]
    assert ancestors.split() == ["frame-ancestors", portal.url]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "x-frame-options" not in response.headers


async def test_status_page_in_the_portal_frame(installed: httpx.AsyncClient, portal: FakePortal) -> None:
    query, body = portal.iframe_install()

    response = await post_form(installed, f"/app?{query}", body)

    assert response.status_code == 200
    assert_page_headers(response, portal)


async def test_install_finish_page(client: httpx.AsyncClient, portal: FakePortal) -> None:
    query, body = portal.iframe_install()

    response = await post_form(client, f"/install?{query}", body)

    assert response.status_code == 200, response.text
    assert_page_headers(response, portal)


async def test_oauth_error_page_keeps_its_query_out_of_referer(
    installed: httpx.AsyncClient, portal: FakePortal
) -> None:
    response = await installed.get("/app?code=secretcode&state=forged", headers={"Accept": "text/html"})

    assert response.status_code == 400
    assert_page_headers(response, portal)


async def test_json_replies_are_not_sniffed(installed: httpx.AsyncClient) -> None:
    response = await installed.get("/health")

    assert response.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in response.headers
