"""parse_php_form and the callback models, on raw bodies exactly as the portal sends them."""

from typing import Any

import pytest
from pydantic import ValidationError

from schemas import InstallEvent, RobotAck, RobotCall, UninstallEvent, parse_php_form
from services.errors import AppError, BadRequest, PayloadTooLarge
from services.php_form import MAX_ESCAPES, MAX_FIELDS, MAX_KEY_BYTES

# bitrix24-wire.md section 1.2: ONAPPINSTALL as the queue server posts it.
INSTALL_BODY = (
    "event=ONAPPINSTALL&data%5BVERSION%5D=1&data%5BACTIVE%5D=Y&data%5BINSTALLED%5D=Y&"
    "data%5BLANGUAGE_ID%5D=ru&ts=1696527000&auth%5Baccess_token%5D=s6p6eclrvim6da22ft9ch94ekreb52lv&"
    "auth%5Bexpires%5D=1696530600&auth%5Bexpires_in%5D=3600&auth%5Bscope%5D=crm%2Cbizproc&"
    "auth%5Bdomain%5D=example.bitrix24.ru&"
    "auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F&auth%5Bstatus%5D=L&"
    "auth%5Bclient_endpoint%5D=https%3A%2F%2Fexample.bitrix24.ru%2Frest%2F&"
    "auth%5Bmember_id%5D=a223c6b3710f85df22e9377d6c4f7553&auth%5Buser_id%5D=1&"
    "auth%5Brefresh_token%5D=4s386p3q0tr8dy89xvmt96234v3dljg8&"
    "auth%5Bapplication_token%5D=51856fefc120afa4b628cc82d3935cce"
)

# bitrix24-wire.md section 1.5: the wire form there elides the auth values ("…"); they are filled in
# from the JSON rendering of the same section.
UNINSTALL_BODY = (
    "event=ONAPPUNINSTALL&data%5BLANGUAGE_ID%5D=ru&data%5BCLEAN%5D=1&ts=1466439714&"
    "auth%5Bdomain%5D=some-domain.bitrix24.com&"
    "auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F&"
    "auth%5Bclient_endpoint%5D=https%3A%2F%2Fsome-domain.bitrix24.com%2Frest%2F&"
    "auth%5Bmember_id%5D=a223c6b3710f85df22e9377d6c4f7553&"
    "auth%5Bapplication_token%5D=51856fefc120afa4b628cc82d3935cce"
)

# bitrix24-wire.md section 6.3: the robot call.
ROBOT_BODY = (
    "workflow_id=664fa13bbbb410.99176768&code=create_contact&document_id%5B0%5D=crm&"
    "document_id%5B1%5D=CCrmDocumentDeal&document_id%5B2%5D=DEAL_4521&document_type%5B0%5D=crm&"
    "document_type%5B1%5D=CCrmDocumentDeal&document_type%5B2%5D=DEAL&"
    "event_token=664fa13bbbb410.99176768%7CA40364_79843_85254_57332%7CMS1ekdI0CvXi8ycL8qNIn96hak8JEndG."
    "54020ce210345fb6eb12a79d75316d9430b42ccd9c1d82ab1a3bf8b064ec50e9&"
    "properties%5Blast_name%5D=Ivanov&properties%5Bfirst_name%5D=Ivan&"
    "properties%5Bsecond_name%5D=Ivanovich&properties%5Bphone%5D=%2B79991234567&"
    "properties%5Bemail%5D=ivan%40example.com&use_subscription=Y&timeout_duration=660&ts=1716494651&"
    "auth%5Baccess_token%5D=4baf4f66006e13540058f18a000000100000009b41bce7ec85f07c3646c07e6d629e7c&"
    "auth%5Bexpires%5D=1716498251&auth%5Bexpires_in%5D=3600&auth%5Bscope%5D=crm%2Cbizproc&"
    "auth%5Bdomain%5D=example.bitrix24.ru&"
    "auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F&auth%5Bstatus%5D=L&"
    "auth%5Bclient_endpoint%5D=https%3A%2F%2Fexample.bitrix24.ru%2Frest%2F&"
    "auth%5Bmember_id%5D=010b6886ebc205e43ae65000ee00addb&auth%5Buser_id%5D=1&"
    "auth%5Brefresh_token%5D=3b2e7766006e13540058f18a000000100000003b31a96730e79dc7561c1d7d0b33933f&"
    "auth%5Bapplication_token%5D=f9ac5db5ad4adbdee13eb034207d8fbd"
)

EVENT_TOKEN = (
    "664fa13bbbb410.99176768|A40364_79843_85254_57332|MS1ekdI0CvXi8ycL8qNIn96hak8JEndG."
    "54020ce210345fb6eb12a79d75316d9430b42ccd9c1d82ab1a3bf8b064ec50e9"
)


def _without(body: str, key: str) -> str:
    return "&".join(pair for pair in body.split("&") if not pair.startswith(key + "="))


def test_install_body_nests_auth_and_data() -> None:
    parsed = parse_php_form(INSTALL_BODY)

    assert parsed["event"] == "ONAPPINSTALL"
    assert parsed["data"] == {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "ru"}
    assert parsed["auth"]["member_id"] == "a223c6b3710f85df22e9377d6c4f7553"
    assert parsed["auth"]["client_endpoint"] == "https://example.bitrix24.ru/rest/"
    assert parsed["auth"]["scope"] == "crm,bizproc"


def test_uninstall_body_nests_auth_without_tokens() -> None:
    parsed = parse_php_form(UNINSTALL_BODY)

    assert parsed["data"] == {"LANGUAGE_ID": "ru", "CLEAN": "1"}
    assert set(parsed["auth"]) == {
        "domain",
        "server_endpoint",
        "client_endpoint",
        "member_id",
        "application_token",
    }


def test_robot_body_decodes_event_token_and_properties() -> None:
    parsed = parse_php_form(ROBOT_BODY.encode())

    assert parsed["event_token"] == EVENT_TOKEN
    assert parsed["properties"] == {
        "last_name": "Ivanov",
        "first_name": "Ivan",
        "second_name": "Ivanovich",
        "phone": "+79991234567",
        "email": "ivan@example.com",
    }


def test_numbered_keys_become_a_list_in_index_order() -> None:
    parsed = parse_php_form(
        "document_id%5B2%5D=DEAL_4521&document_id%5B0%5D=crm&document_id%5B1%5D=CCrmDocumentDeal"
    )

    assert parsed["document_id"] == ["crm", "CCrmDocumentDeal", "DEAL_4521"]


def test_keys_with_gaps_stay_a_mapping() -> None:
    assert parse_php_form("a[0]=x&a[2]=y") == {"a": {"0": "x", "2": "y"}}


def test_empty_brackets_append() -> None:
    assert parse_php_form("a[]=x&a[]=y&a%5B%5D=z") == {"a": ["x", "y", "z"]}


def test_empty_brackets_append_nested_objects() -> None:
    parsed = parse_php_form("phones[][VALUE]=1&phones[][VALUE]=2")

    assert parsed == {"phones": [{"VALUE": "1"}, {"VALUE": "2"}]}


def test_multiple_property_values_become_a_list() -> None:
    parsed = parse_php_form("properties[phone][0]=%2B79991234567&properties[phone][1]=%2B79991234568")

    assert parsed["properties"]["phone"] == ["+79991234567", "+79991234568"]


def test_blank_values_are_kept() -> None:
    assert parse_php_form("properties[email]=&code=x") == {"properties": {"email": ""}, "code": "x"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"%%%&&&===",
        b"a[=1&]b=2&[x]=3&a]]=4&a[b]c=5",
        b"a=1&a[b]=2&a[b][c]=3&a[]=4",
        b'{"event_token": "json, not a form"}',
        ("a" + "[x]" * 5000 + "=deep").encode(),
        b"a[]=" * 20000,
    ],
)
def test_garbage_is_parsed_or_refused_with_a_4xx(body: bytes) -> None:
    try:
        parsed: object = parse_php_form(body)
    except AppError as exc:
        parsed = exc.status_code
    assert isinstance(parsed, dict) or 400 <= int(str(parsed)) < 500


# What PHP's `$_POST` holds for each body (php-src main/php_variables.c, `add_post_var` and
# `php_register_variable_ex`; PHP 8.3 for the next free index after a negative key).
PHP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("a", {"a": ""}),  # no `=`: an empty value
    ("=x&&b=1&", {"b": "1"}),  # empty names and empty pairs are skipped
    ("a[b]c=5", {"a": {"b": "5"}}),  # after `]`, anything but `[` ends the key
    ("a[b=1", {"a_b": "1"}),  # an unclosed `[` is no index: it becomes `_`
    ("a[b.c d[e=1", {"a_b_c_d_e": "1"}),
    ("a[x][y=1", {"a": {"x": "1"}}),  # deeper, the unclosed tail is dropped
    ("a.b=1&c d=2&%20e=3", {"a_b": "1", "c_d": "2", "e": "3"}),  # ` ` and `.` in names are `_`
    ("a[ ]=x&a[ ]=y", {"a": ["x", "y"]}),  # one space before `]` still appends
    ("a[ x]=1", {"a": {" x": "1"}}),  # but is kept in a real index
    ("a[5]=x&a[]=y", {"a": {"5": "x", "6": "y"}}),  # append after the largest integer key
    ("a[]=x&a[01]=y&a[]=z", {"a": {"0": "x", "01": "y", "1": "z"}}),  # `01` is a string key
    ("a[b][]=1&a[b][]=2&a[c]=3", {"a": {"b": ["1", "2"], "c": "3"}}),
    ("a=1&a[b]=2", {"a": {"b": "2"}}),  # an index over a scalar makes it an array
    ("a[b]=2&a=1", {"a": "1"}),  # and a scalar replaces an array
    ("a%00b=1&c[d%00e]=2", {"a": "1", "c_d": "2"}),  # names end at a NUL byte
    ("v=a%00b", {"v": "a\x00b"}),  # values do not
    ("a+b=c+d&e=%2B%26%3D", {"a_b": "c d", "e": "+&="}),
    ("a%5Bb%5D=1", {"a": {"b": "1"}}),  # brackets may be escaped: names are decoded first
    ("n=%D0%98%D0%B2%D0%B0%D0%BD", {"n": "Иван"}),
    ("a[-5]=x&a[]=y", {"a": {"-5": "x", "-4": "y"}}),
]


@pytest.mark.parametrize(("body", "expected"), PHP_CASES)
def test_parses_as_php_does(body: str, expected: dict[str, Any]) -> None:
    assert parse_php_form(body.encode()) == expected


def test_keys_nested_to_php_limit_are_kept() -> None:
    assert parse_php_form("a" + "[x]" * 64 + "=ok")["a"]["x"]["x"] is not None


def test_keys_nested_beyond_php_limit_drop_the_whole_variable() -> None:
    # PHP deletes the variable, also what earlier fields put in it.
    parsed = parse_php_form("a[k]=1&a" + "[x]" * 65 + "=deep&ok=1")

    assert parsed == {"ok": "1"}


def test_a_thousand_fields_are_parsed_one_more_is_refused() -> None:
    fields = "&".join(f"f{i}=v" for i in range(MAX_FIELDS))
    assert len(parse_php_form(fields)) == MAX_FIELDS

    with pytest.raises(PayloadTooLarge, match="more than 1000 fields"):
        parse_php_form(fields + "&one=more")


def test_a_key_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(PayloadTooLarge, match="field name is longer"):
        parse_php_form("a" * (MAX_KEY_BYTES + 1) + "=1")


def test_deep_keys_in_many_fields_are_refused_before_they_cost() -> None:
    body = "&".join("a" + "[]" * 63 + "=x" for _ in range(100))

    with pytest.raises(PayloadTooLarge, match="bracket levels"):
        parse_php_form(body)


def test_too_many_escapes_are_refused() -> None:
    with pytest.raises(PayloadTooLarge, match="percent-escapes"):
        parse_php_form("a=" + "%41" * (MAX_ESCAPES + 1))


def test_a_percent_without_hex_digits_is_refused() -> None:
    # PHP keeps it as it is, but `urlencode()` never writes one: no portal sends it.
    with pytest.raises(BadRequest, match="two hex digits"):
        parse_php_form("a=100%")


def test_robot_call_validates_the_wire_body() -> None:
    call = RobotCall.model_validate(parse_php_form(ROBOT_BODY))

    assert call.event_token == EVENT_TOKEN
    assert call.workflow_id == "664fa13bbbb410.99176768"
    assert call.document_id == ["crm", "CCrmDocumentDeal", "DEAL_4521"]
    assert call.document_type == ["crm", "CCrmDocumentDeal", "DEAL"]
    assert call.timeout_duration == 660
    assert call.auth.member_id == "010b6886ebc205e43ae65000ee00addb"
    assert call.auth.application_token == "f9ac5db5ad4adbdee13eb034207d8fbd"
    assert call.auth.user_id == 1
    assert call.auth.expires == 1716498251


@pytest.mark.parametrize(
    "key",
    ["event_token", "auth%5Bmember_id%5D", "auth%5Bapplication_token%5D", "auth%5Bclient_endpoint%5D"],
)
def test_robot_call_without_a_required_field_is_invalid(key: str) -> None:
    with pytest.raises(ValidationError):
        RobotCall.model_validate(parse_php_form(_without(ROBOT_BODY, key)))


def test_robot_call_rejects_a_member_id_that_is_no_id() -> None:
    body = ROBOT_BODY.replace("auth%5Bmember_id%5D=010b", "auth%5Bmember_id%5D=..%2F010b")

    with pytest.raises(ValidationError):
        RobotCall.model_validate(parse_php_form(body))


def test_install_event_validates_the_wire_body() -> None:
    event = InstallEvent.model_validate(parse_php_form(INSTALL_BODY))

    assert event.event == "ONAPPINSTALL"
    assert event.auth.refresh_token == "4s386p3q0tr8dy89xvmt96234v3dljg8"
    assert event.auth.application_token == "51856fefc120afa4b628cc82d3935cce"
    assert event.auth.expires_in == 3600
    assert event.data["LANGUAGE_ID"] == "ru"


def test_install_event_refuses_another_event() -> None:
    with pytest.raises(ValidationError):
        InstallEvent.model_validate(parse_php_form(UNINSTALL_BODY))


def test_uninstall_event_validates_the_wire_body() -> None:
    event = UninstallEvent.model_validate(parse_php_form(UNINSTALL_BODY))

    assert event.auth.member_id == "a223c6b3710f85df22e9377d6c4f7553"
    assert event.auth.access_token is None


def test_install_event_accepts_lower_case_event_name() -> None:
    data: dict[str, Any] = parse_php_form(INSTALL_BODY.replace("event=ONAPPINSTALL", "event=onappinstall"))

    assert InstallEvent.model_validate(data).event == "ONAPPINSTALL"


@pytest.mark.parametrize("status", ["accepted", "duplicate"])
@pytest.mark.parametrize("job_id", [0, 7, 2**62])
def test_the_robot_reply_is_written_as_pydantic_writes_it(status: str, job_id: int) -> None:
    ack = RobotAck.model_validate({"status": status, "job_id": job_id})
    assert ack.json_bytes() == ack.model_dump_json().encode()
