"""The README says what the app does: its tables, its Russian translation, its walkthrough.

"Same sections" for README.ru.md, mechanically: every `## ` heading of README.ru.md is preceded by
`<a id="SLUG"></a>`, SLUG being the GitHub anchor of the English section it translates; these
slugs, in order, are exactly `TRANSLATED`, and each exists in README.md, in the same order. Inside
them the Russian settings table names the same settings as `config.Settings`, the Russian
troubleshooting table has as many rows as the English one, quoting the same error codes, and the
Russian security section has the same points, quoting the same settings, headers and limits.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from config import Settings
from services import messages
from services.contact_validation import InvalidContactData
from services.errors import ErrorCode
from tests.processes import PROJECT, free_port

README = (PROJECT / "README.md").read_text(encoding="utf-8")
README_RU = (PROJECT / "README.ru.md").read_text(encoding="utf-8")
TRANSLATED = [
    "quick-start",
    "creating-the-local-application-in-the-portal",
    "settings",
    "security",
    "troubleshooting",
]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _section(text: str, heading_re: str) -> str:
    match = re.search(rf"^## {heading_re}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, heading_re
    return match.group(1)


def _ru_section(slug: str) -> str:
    match = re.search(rf'<a id="{slug}"></a>\n## [^\n]*\n(.*?)(?=^<a id=|\Z)', README_RU, re.M | re.S)
    assert match, slug
    return match.group(1)


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")][
        1:
    ]


def test_error_codes_table_matches_error_code() -> None:
    table = _section(README, "Endpoints")
    documented = set(re.findall(r"^\| (?:\d|other)[^|]* \| `([a-z_]+)` \|", table, re.M))

    assert documented == {code.value for code in ErrorCode}


def test_russian_readme_has_the_same_sections() -> None:
    english = [_slug(heading) for heading in re.findall(r"^## (.+)$", README, re.M)]
    anchors = re.findall(r'^<a id="([a-z0-9-]+)"></a>\n## ', README_RU, re.M)

    assert len(re.findall(r"^## ", README_RU, re.M)) == len(anchors), "every ## heading has its anchor"
    assert anchors == TRANSLATED
    assert all(slug in english for slug in anchors)
    assert sorted(anchors, key=english.index) == anchors, "in the English order"


def test_russian_settings_table_names_every_setting() -> None:
    names = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", _ru_section("settings"), re.M))

    assert names == {name.upper() for name in Settings.model_fields}


def test_russian_troubleshooting_matches_the_english_one() -> None:
    english = _table_rows(_section(README, "Troubleshooting"))
    russian = _table_rows(_ru_section("troubleshooting"))

    def codes(rows: list[str]) -> list[list[str]]:
        return [sorted(set(re.findall(r"`([a-z_]{4,}|[A-Z_]{4,})`", row.split(" | ")[0]))) for row in rows]

    assert len(russian) == len(english)
    assert codes(russian) == codes(english)


def test_russian_security_section_matches_the_english_one() -> None:
    # What the app defends and what the proxy must add: a reader of either README gets the same
    # points, with the same settings, headers, status codes and limits, spelled the same.
    english = _section(README, "Security")
    russian = _ru_section("security")

    def points(text: str) -> list[str]:
        return re.findall(r"^- ", text, re.M)

    def quoted(text: str) -> set[str]:
        return set(re.findall(r"`([^`]+)`", text))

    def figures(text: str) -> list[str]:
        # 65,536 in English is 65 536 in Russian: the same figure once its separators are dropped.
        found = re.findall(r"\d+(?:[, \u00a0\u202f]\d{3})*(?!\d)", text)
        return sorted(re.sub(r"\D", "", figure) for figure in found)

    assert len(points(russian)) == len(points(english))
    assert quoted(russian) == quoted(english)
    assert figures(russian) == figures(english)


def _walkthrough() -> tuple[str, dict[int, str]]:
    section = README[README.index("### The fake portal") :]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    setup, steps = blocks[0], blocks[1]
    terminals = re.split(r"^# terminal (\d):.*$", steps, flags=re.M)
    return setup, {int(number): text for number, text in zip(terminals[1::2], terminals[2::2], strict=True)}


def _wait_http(url: str, process: subprocess.Popen[bytes]) -> None:
    # Generous: start.sh may first run pip (when .venv was filled from requirements-dev.txt only).
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: the process exited"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


@pytest.mark.timeout(400)
def test_fake_portal_walkthrough_runs_on_any_ports(tmp_path: Path) -> None:
    setup, terminals = _walkthrough()
    portal_port, app_port, demo = free_port(), free_port(), tmp_path / "demo"
    setup = setup.replace("PORTAL_PORT=8100", f"PORTAL_PORT={portal_port}")
    setup = setup.replace("APP_PORT=8000", f"APP_PORT={app_port}").replace("/tmp/b24demo", str(demo))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BITRIX_", "APP_"))}
    started = [
        subprocess.Popen(
            ["bash", "-c", f"{setup}\n{terminals[n]}"], cwd=PROJECT, env=env, start_new_session=True
        )
        for n in (1, 2)
    ]
    try:
        _wait_http(f"http://127.0.0.1:{portal_port}/_fake/stats", started[0])
        _wait_http(f"http://127.0.0.1:{app_port}/health", started[1])
        done = subprocess.run(
            ["bash", "-c", f"set -e\n{setup}\n{terminals[3]}"],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)

    assert done.returncode == 0, done.stderr
    assert '"status":"installed"' in done.stdout
    assert '{"status":"duplicate","job_id":1}' in done.stdout
    assert "+79991234567" in done.stdout
    assert "Last robot runs" in (demo / "status.html").read_text(encoding="utf-8")
    assert (demo / "tokens.json").exists()
    assert not (PROJECT / "install.txt").exists()  # the walkthrough writes nothing into the repository


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_quoted_workflow_messages_are_what_the_workflow_gets() -> None:
    english, russian = _flat(README), _flat(README_RU)
    email = InvalidContactData("email_invalid", raw='"ivan@"', reason="...").message("en")

    assert f"`{email}`" in english
    assert f"`{messages.text('en', 'no_name')}`" in english
    assert f"`{messages.text('en', 'created', contact_id=123)}`" in english
    assert f"`{messages.text('en', 'not_in_time', reason='...')}`".split(": ...")[0] in english
    for text in (english, russian):
        assert f"`{messages.text('ru', 'no_name')}`" in text
        assert f"`{messages.text('ru', 'created', contact_id=123)}`" in text
