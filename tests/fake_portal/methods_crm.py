"""CRM REST methods: crm.contact.* and crm.duplicate.findbycomm."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from tests.fake_portal.methods_app import _Call
from tests.fake_portal.state import PortalError, _ListResult, _State

PAGE_SIZE = 50  # list methods (wire doc 3.3)

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

_MULTIFIELDS = ("PHONE", "EMAIL", "WEB", "IM")
_CONTACT_KEYS = (
    "HONORIFIC", "NAME", "SECOND_NAME", "LAST_NAME", "PHOTO", "LEAD_ID", "TYPE_ID", "SOURCE_ID",
    "SOURCE_DESCRIPTION", "POST", "COMMENTS", "COMPANY_ID", "BIRTHDATE", "EXPORT", "HAS_PHONE",
    "HAS_EMAIL", "HAS_IMOL", "DATE_CREATE", "DATE_MODIFY", "ASSIGNED_BY_ID", "CREATED_BY_ID",
    "MODIFY_BY_ID", "OPENED", "ORIGINATOR_ID", "ORIGIN_ID", "ORIGIN_VERSION", "FACE_ID",
    "LAST_ACTIVITY_TIME", "LAST_ACTIVITY_BY",
)  # fmt: skip


def _multifield_items(value: Any) -> list[dict[str, Any]]:
    # Clients send a list, or an object keyed "n0", "n1", ... (both are PHP arrays).
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [item for item in items if isinstance(item, dict)]


def _check_emails(fields: Mapping[str, Any]) -> None:
    for item in _multifield_items(fields.get("EMAIL")):
        value = str(item.get("VALUE") or "").strip()
        # Empty values are dropped by the portal, not rejected.
        if value and not _EMAIL_RE.fullmatch(value):
            raise PortalError(400, "ERROR_CORE", "The field Work e-mail contains an invalid address")


def _contact_add(call: _Call) -> Any:
    fields = call.param("fields")
    if fields == []:
        fields = {}  # JSON `[]` is an empty PHP array, which is still "an array"
    if not isinstance(fields, dict):
        raise PortalError(400, "", "Parameter 'fields' must be array.")
    params = call.param("params")
    if params and not isinstance(params, dict):
        raise PortalError(400, "", "Parameter 'params' must be array.")
    _check_emails(fields)
    state = call.state
    contact_id = len(state.contacts) + 1
    state.contacts.append({**copy.deepcopy(fields), "ID": contact_id})
    _index_codes(state, state.contacts[-1])
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    state.contact_meta[contact_id] = {"user_id": call.user_id, "created": now}
    return contact_id


def _php_string(value: Any) -> Any:
    # Legacy CRM methods hand every scalar back as a string.
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return value
    return str(value)


def _multifield_view(contact: Mapping[str, Any], type_id: str) -> list[dict[str, Any]]:
    items = [i for i in _multifield_items(contact.get(type_id)) if str(i.get("VALUE") or "")]
    return [
        {
            "ID": str(int(contact["ID"]) * 1000 + index),  # stable, unique per contact
            "VALUE_TYPE": str(item.get("VALUE_TYPE") or "WORK"),
            "VALUE": str(item["VALUE"]),
            "TYPE_ID": type_id,
        }
        for index, item in enumerate(items)
    ]


def _contact_view(state: _State, contact: Mapping[str, Any]) -> dict[str, Any]:
    meta = state.contact_meta.get(int(contact["ID"]), {})
    user = str(meta.get("user_id", state.config.admin_user_id))
    view: dict[str, Any] = {"ID": str(contact["ID"]), **dict.fromkeys(_CONTACT_KEYS)}
    view.update(OPENED="Y", EXPORT="Y", TYPE_ID="CLIENT", SOURCE_ID="SELF")
    view.update(ASSIGNED_BY_ID=user, CREATED_BY_ID=user, MODIFY_BY_ID=user)
    view.update(DATE_CREATE=meta.get("created"), DATE_MODIFY=meta.get("created"))
    for key, value in contact.items():
        if key not in _MULTIFIELDS and key != "ID":
            view[key] = _php_string(value)
    for type_id in _MULTIFIELDS:
        items = _multifield_view(contact, type_id)
        if items:
            view[type_id] = items
    view.update(HAS_PHONE="Y" if "PHONE" in view else "N", HAS_EMAIL="Y" if "EMAIL" in view else "N")
    view["HAS_IMOL"] = "N"
    return view


def _find_contact(call: _Call) -> dict[str, Any]:
    raw = call.param("id")
    contact_id = int(raw) if isinstance(raw, int | str) and str(raw).isdigit() else 0
    if contact_id <= 0:
        raise PortalError(400, "", "ID is not defined or invalid.")
    if contact_id > len(call.state.contacts):
        raise PortalError(400, "", "Not found")
    return call.state.contacts[contact_id - 1]


def _contact_get(call: _Call) -> Any:
    return _contact_view(call.state, _find_contact(call))


def _field_values(contact: Mapping[str, Any], name: str) -> list[str]:
    if name in _MULTIFIELDS:
        return [str(item.get("VALUE")) for item in _multifield_items(contact.get(name))]
    value = contact.get(name)
    return ["" if value is None else str(value)]


def _split_operator(key: str) -> tuple[str, str]:
    """``"!=ORIGIN_ID"`` -> ``("!=", "ORIGIN_ID")``; only the operators tests need are known.

    `@` is IN and `!@` NOT IN, with an array value (api-reference/crm/contacts/crm-contact-list.md).
    """
    for operator in ("!@", "!=", "!", "@", "=", "%"):
        if key.startswith(operator):
            return operator, key[len(operator) :]
    return "", key


def _matches(contact: Mapping[str, Any], conditions: Mapping[str, Any]) -> bool:
    for raw_key, expected in conditions.items():
        operator, name = _split_operator(raw_key)
        wanted = {str(v) for v in expected} if isinstance(expected, list) else {str(expected)}
        values = _field_values(contact, name.upper())
        if operator == "%":
            hit = any(w.lower() in v.lower() for w in wanted for v in values)
        else:
            hit = any(v in wanted for v in values)
        if hit == operator.startswith("!"):
            return False
    return True


def _select(view: dict[str, Any], select: Any) -> dict[str, Any]:
    wanted = [str(s).upper() for s in select] if isinstance(select, list) else []
    if not wanted or "*" in wanted:
        # `*` means scalar fields only; multifields must be asked for by name.
        return {k: v for k, v in view.items() if k not in _MULTIFIELDS or k in wanted}
    return {k: v for k, v in view.items() if k in wanted or k == "ID"}


def _sort_key(order: Any) -> tuple[Callable[[dict[str, Any]], Any], bool]:
    first = next(iter(order.items()), None) if isinstance(order, dict) else None
    name, direction = first or ("ID", "ASC")
    name = str(name).upper()
    reverse = str(direction).upper() == "DESC"
    if name == "ID":
        return (lambda contact: int(contact["ID"])), reverse
    return (lambda contact: str(contact.get(name) or "")), reverse


def _candidates(state: _State, conditions: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The contacts a filter can match: by primary key when it names IDs (`@ID`, `ID`, `=ID`),
    as the portal's SQL would; `_matches` still applies every condition to them."""
    for key in ("@ID", "ID", "=ID"):
        if key in conditions:
            wanted = conditions[key] if isinstance(conditions[key], list) else [conditions[key]]
            ids = sorted({int(v) for v in wanted if str(v).isdigit() and 0 < int(v) <= len(state.contacts)})
            return [state.contacts[i - 1] for i in ids]
    return state.contacts


def _contact_list(call: _Call) -> Any:
    conditions = call.param("filter")
    conditions = conditions if isinstance(conditions, dict) else {}
    found = [c for c in _candidates(call.state, conditions) if _matches(c, conditions)]
    key, reverse = _sort_key(call.param("order"))
    found.sort(key=key, reverse=reverse)
    start = str(call.param("start") or "0")
    offset = max(0, int(start)) if start.lstrip("-").isdigit() else 0
    page = found[offset : offset + PAGE_SIZE]
    following = offset + PAGE_SIZE if offset + PAGE_SIZE < len(found) else None
    items = [_select(_contact_view(call.state, c), call.param("select")) for c in page]
    return _ListResult(items, len(found), following)


def _normalize_phone(value: str) -> str:
    """The portal's phone match code.

    crm/lib/integrity/duplicatecommunicationcriterion.php `normalizePhone` calls main/tools.php
    `NormalizePhone($value, 1)`: "+8..." becomes "008...", everything but digits, `#` and `*` is
    dropped, and a number of 10+ digits loses an international prefix (00, 011) or a trunk 0, while
    a leading 8 becomes 7 (80/81/82 stay). The docs add that the extension is not considered
    (api-reference/crm/duplicates/crm-duplicate-find-by-comm.md), so it is cut off first.
    """
    number = re.split(r"(?i)#|доб|ext|x(?=\s*\d)|;|,", value.strip())[0].strip()
    if len(number) >= 10 and number.startswith("+8"):
        number = "00" + number[1:]
    number = re.sub(r"[^0-9#*]", "", number)
    if len(number) >= 10 and number[:2] not in ("80", "81", "82"):
        if number.startswith("00"):
            number = number[2:]
        elif number.startswith("011"):
            number = number[3:]
        elif number.startswith("8"):
            number = "7" + number[1:]
        elif number.startswith("0"):
            number = number[1:]
    return number


def _comm_key(kind: str, value: Any) -> str:
    text = str(value).strip()
    # E-mail match codes are lower-cased (DuplicateCommunicationCriterion::prepareCodes).
    return text.lower() if kind == "EMAIL" else _normalize_phone(text)


def _index_codes(state: _State, contact: Mapping[str, Any]) -> None:
    """Keep the duplicate index (`_State.comm_index`) in step with a contact just added or updated."""
    contact_id = int(contact["ID"])
    for kind, index in state.comm_index.items():
        old = state.comm_codes.get((kind, contact_id), set())
        new = {code for code in (_comm_key(kind, v) for v in _field_values(contact, kind) if v) if code}
        for code in old - new:
            index[code].discard(contact_id)
        for code in new - old:
            index.setdefault(code, set()).add(contact_id)
        state.comm_codes[(kind, contact_id)] = new


def _find_by_comm(call: _Call) -> Any:
    """crm.duplicate.findbycomm as crm/classes/general/restservice.php `CCrmDuplicateRestProxy` runs it.

    `values` must be an array (a bare string is "not defined", as the RU tutorial
    tutorials/crm/how-to-get-lists/search-by-phone-and-email.md also says); non-strings and empty
    strings are skipped, equal values count once, at most 20 distinct values are searched and each
    finds at most 20 entities. Only types with hits appear, so an empty result is PHP's `[]`.
    """
    kind = str(call.param("type") or "").upper()
    if not kind:
        raise PortalError(400, "Communication type is not defined", "Parameter 'type' is required.")
    if kind not in ("EMAIL", "PHONE"):
        raise PortalError(400, f"Communication type '{kind}' is not supported in current context", "")
    values = call.param("values")
    if not isinstance(values, list) or not values:
        raise PortalError(400, "Communication values is not defined", "")
    entity = str(call.param("entity_type") or "").upper()
    if entity == "DEAL":
        raise PortalError(400, "Deal is not supported in current context.", "")
    codes = list(dict.fromkeys(_comm_key(kind, v) for v in values if isinstance(v, str) and v))[:20]
    index = call.state.comm_index[kind]  # the portal reads its index of match codes
    hits = {code: sorted(index.get(code, ()))[:20] for code in codes if code}  # the oldest 20
    ids = list(dict.fromkeys(i for code in codes if code for i in hits[code]))
    # This portal keeps contacts only: an entity type other than CONTACT finds nothing here.
    return {"CONTACT": ids} if ids and entity in ("", "CONTACT") else []


def _contact_update(call: _Call) -> Any:
    """crm.contact.update (api-reference/crm/contacts/crm-contact-update.md): only the given fields
    change; a multifield row without `ID` is added, one with `ID` is changed, and one with `ID` and
    `DELETE=Y` or an empty `VALUE` is removed ("Working with Multiple Fields")."""
    raw = call.param("id")
    if not (isinstance(raw, int | str) and str(raw).isdigit() and int(raw) > 0):
        raise PortalError(400, "", "ID is not defined or invalid.")
    if int(raw) > len(call.state.contacts):
        raise PortalError(400, "", "Contact is not found")
    fields = call.param("fields")
    if not isinstance(fields, dict):
        raise PortalError(400, "", "Parameter 'fields' must be array.")
    fields = {key.upper(): value for key, value in fields.items()}
    _check_emails(fields)
    contact = call.state.contacts[int(raw) - 1]
    for key, value in fields.items():
        if key in _MULTIFIELDS:
            contact[key] = _merge_multifield(int(raw), _multifield_items(contact.get(key)), value)
        elif key != "ID":
            contact[key] = copy.deepcopy(value)
    _index_codes(call.state, contact)
    return True


def _merge_multifield(contact_id: int, current: list[dict[str, Any]], rows: Any) -> list[dict[str, Any]]:
    # Existing rows are addressed by the IDs crm.contact.get shows (see _multifield_view).
    current = [item for item in current if str(item.get("VALUE") or "")]
    kept = {str(contact_id * 1000 + index): dict(item) for index, item in enumerate(current)}
    added: list[dict[str, Any]] = []
    for row in _multifield_items(rows):
        row_id, value = str(row.get("ID") or ""), str(row.get("VALUE") or "")
        if not row_id:
            if value:
                added.append({"VALUE": value, "VALUE_TYPE": str(row.get("VALUE_TYPE") or "WORK")})
        elif row_id in kept:
            if str(row.get("DELETE") or "").upper() == "Y" or not value:
                del kept[row_id]
            else:
                kept[row_id].update(VALUE=value, VALUE_TYPE=str(row.get("VALUE_TYPE") or "WORK"))
    return [*kept.values(), *added]


# -- bizproc.event.send / bizproc.activity.log (wire doc 7) -----------------------------------
