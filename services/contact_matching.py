"""Find or create: the robot's `duplicates` and `responsible` inputs, and the decisions they lead to.

Pure functions only; the worker runs the REST calls they describe. The search uses
`crm.duplicate.findbycomm` (b24restdocs api-reference/crm/duplicates/crm-duplicate-find-by-comm.md):
up to 20 values of one type per command, and the answer names the matching contacts but not which
value matched which, so the contacts a command found are read back (`crm.contact.list`) and each
job is matched against their phones and e-mails here. Rules, in this order:

* the phone wins: a contact found by the job's phone is taken even when its e-mail finds another;
* among several matches the oldest (lowest id) is taken, and the log says how many matched;
* a contact that an earlier job of the same pass is about to create counts as a match, so two calls
  for one new person make one contact.

Every decision is reproducible from the portal's state: a job that crashes after deciding and is
resumed searches again and finds the same contact (its own earlier creation is found first by
`ORIGIN_ID`, so a contact it created is never reported as "found").
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import phonenumbers

from services.contact_validation import InvalidContactData, contact_fields
from services.messages import Lang, text

Mode = Literal["create", "reuse", "update"]
MODES: tuple[Mode, ...] = ("create", "reuse", "update")
FINDBYCOMM_MAX_VALUES = 20  # "Maximum number of values — 20" (crm-duplicate-find-by-comm.md)
LIST_PAGE = 50  # crm.contact.list returns 50 records a page
_NAMES = ("NAME", "SECOND_NAME", "LAST_NAME")
_USER = re.compile(r"^(?:user_)?(\d+)$")


def read_mode(properties: Mapping[str, Any]) -> Mode:
    """The `duplicates` select; empty (a workflow made before the input existed) means `create`."""
    raw = _first(properties.get("duplicates")).strip().lower()
    if not raw:
        return "create"
    for mode in MODES:
        if raw == mode:
            return mode
    raise InvalidContactData("duplicates_unknown", raw=f'"{raw[:32]}"')


def read_responsible(properties: Mapping[str, Any]) -> int | None:
    """The `responsible` user as a user id; None (empty) leaves the portal's default.

    The portal sends a `user` property in its internal form, `user_<id>`
    (bizproc/classes/general/restactivity.php passes values through FieldType::externalizeValue,
    which for bizproc/lib/basetype/user.php keeps `user_<id>`). A bare number is accepted too.
    """
    raw = _first(properties.get("responsible")).strip()
    if not raw:
        return None
    found = _USER.match(raw)
    if found is None or int(found.group(1)) <= 0:
        raise InvalidContactData("responsible_not_user", raw=f'"{raw[:32]}"')
    return int(found.group(1))


def _first(value: Any) -> str:
    if isinstance(value, list):  # a property the designer made multiple: the first value counts
        value = next((item for item in value if isinstance(item, str) and item.strip()), "")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Wanted:
    """One job's contact: its mode and the CRM fields it would create."""

    job_id: int
    mode: Mode
    fields: Mapping[str, Any]

    @property
    def phone(self) -> str:
        return _multi_value(self.fields, "PHONE")

    @property
    def email(self) -> str:
        return _multi_value(self.fields, "EMAIL")


@dataclass(frozen=True)
class Found:
    """An existing contact, as `crm.contact.list` returns it."""

    id: int
    names: Mapping[str, str]
    phones: frozenset[str]  # as phone_key() makes them
    emails: frozenset[str]  # case-folded


@dataclass(frozen=True)
class Decision:
    """What to do for one job. `contact_id` is set for a portal contact, `creator` for an in-pass one."""

    job_id: int
    action: Literal["create", "found", "later"]
    contact_id: int = 0
    creator: int = 0  # job id of the earlier job in this pass that creates the contact
    by: str = ""  # "phone" or "email"
    value: str = ""
    matches: int = 0
    fill: dict[str, Any] = field(default_factory=dict)  # crm.contact.update fields (update mode)

    def note(self, contact_id: int, lang: Lang = "en", fill_error: str = "") -> str:
        """The workflow log line: which contact, found by what, how many matched, what was filled."""
        line = text(lang, f"found_by_{self.by}", contact_id=contact_id, value=self.value)
        if self.matches > 1:
            line += text(lang, "found_several", count=self.matches)
        if fill_error:
            line += text(lang, "found_not_filled", detail=fill_error)
        elif self.fill:
            line += text(lang, "found_filled", fields=", ".join(sorted(self.fill)))
        return line


def phone_key(value: str, default_region: str) -> str:
    """A phone as E.164 where it parses, else its digits: how stored numbers are compared."""
    try:
        number = phonenumbers.parse(value, default_region)
    except phonenumbers.NumberParseException:
        return re.sub(r"\D", "", value)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# --- REST commands ---------------------------------------------------------------------------


def search_commands(wanted: Iterable[Wanted]) -> dict[str, tuple[str, dict[str, Any]]]:
    """`crm.duplicate.findbycomm` commands for the jobs that look before they create."""
    looking = [w for w in wanted if w.mode != "create"]
    commands: dict[str, tuple[str, dict[str, Any]]] = {}
    for kind, values in (
        ("PHONE", _unique(w.phone for w in looking)),
        ("EMAIL", _unique(w.email for w in looking)),
    ):
        for index in range(0, len(values), FINDBYCOMM_MAX_VALUES):
            chunk = values[index : index + FINDBYCOMM_MAX_VALUES]
            params = {"entity_type": "CONTACT", "type": kind, "values": chunk}
            commands[f"find_{kind.lower()}_{index // FINDBYCOMM_MAX_VALUES}"] = (
                "crm.duplicate.findbycomm",
                params,
            )
    return commands


def found_ids(results: Mapping[str, Any]) -> list[int]:
    """Contact ids the search commands found; an empty answer is PHP's `[]` (wire doc 8.3)."""
    ids: set[int] = set()
    for key, result in results.items():
        if key.startswith("find_") and isinstance(result, dict):
            ids.update(int(item) for item in result.get("CONTACT") or [] if str(item).isdigit())
    return sorted(ids)


def read_commands(ids: Sequence[int]) -> dict[str, tuple[str, dict[str, Any]]]:
    """`crm.contact.list` commands that read the found contacts' names, phones and e-mails."""
    select = ["ID", *_NAMES, "PHONE", "EMAIL"]
    return {
        f"read_{index // LIST_PAGE}": (
            "crm.contact.list",
            # `@` is IN with an array value (api-reference/crm/contacts/crm-contact-list.md).
            {"filter": {"@ID": list(ids[index : index + LIST_PAGE])}, "select": select},
        )
        for index in range(0, len(ids), LIST_PAGE)
    }


def read_found(results: Mapping[str, Any], default_region: str) -> dict[int, Found]:
    """The found contacts from the `read_*` results."""
    found: dict[int, Found] = {}
    for key, items in results.items():
        if not key.startswith("read_") or not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, dict) and str(item.get("ID", "")).isdigit():
                contact = _found(item, default_region)
                found[contact.id] = contact
    return found


def _found(item: Mapping[str, Any], default_region: str) -> Found:
    return Found(
        id=int(item["ID"]),
        names={name: str(item.get(name) or "").strip() for name in _NAMES},
        phones=frozenset(phone_key(v, default_region) for v in _values(item.get("PHONE"))),
        emails=frozenset(v.casefold() for v in _values(item.get("EMAIL"))),
    )


# --- the decision ------------------------------------------------------------------------------


def decide(wanted: Sequence[Wanted], found: Mapping[int, Found]) -> list[Decision]:
    """One decision per job, in job order (an earlier job creates, a later one finds it)."""
    creators: list[Wanted] = []
    planned: dict[int, Found] = {}  # found contacts as this pass's updates leave them
    decisions: list[Decision] = []
    for job in sorted(wanted, key=lambda w: w.job_id):
        decision = _decide_one(job, found, creators, planned)
        if decision.action == "create":
            creators.append(job)
        decisions.append(decision)
    return decisions


def _decide_one(
    job: Wanted, found: Mapping[int, Found], creators: Sequence[Wanted], planned: dict[int, Found]
) -> Decision:
    if job.mode == "create":
        return Decision(job.job_id, "create")
    for by, value in (("phone", job.phone), ("email", job.email)):  # the phone wins
        if not value:
            continue
        matches = sorted(c.id for c in found.values() if _has(c, by, value))
        if matches:
            target = planned.get(matches[0], found[matches[0]])
            fill = _fill(job, target) if job.mode == "update" else {}
            if fill:
                planned[target.id] = _filled(target, fill)
            return Decision(job.job_id, "found", matches[0], 0, by, value, len(matches), fill)
        creator = next((c for c in creators if _value(c, by).casefold() == value.casefold()), None)
        if creator is not None:
            # Filling an in-pass contact waits for the next pass, where it is a portal contact.
            action: Literal["found", "later"] = "later" if job.mode == "update" else "found"
            return Decision(job.job_id, action, 0, creator.job_id, by, value, 1)
    return Decision(job.job_id, "create")


def _has(contact: Found, by: str, value: str) -> bool:
    return value in contact.phones if by == "phone" else value.casefold() in contact.emails


def _value(job: Wanted, by: str) -> str:
    return job.phone if by == "phone" else job.email


def _fill(job: Wanted, contact: Found) -> dict[str, Any]:
    """The input's values for the contact's empty fields; a phone or e-mail is added, never replaced."""
    fill: dict[str, Any] = {
        name: job.fields[name] for name in _NAMES if job.fields.get(name) and not contact.names.get(name)
    }
    if job.phone and job.phone not in contact.phones:
        fill["PHONE"] = [{"VALUE": job.phone, "VALUE_TYPE": "WORK"}]  # no ID: the portal adds it
    if job.email and job.email.casefold() not in contact.emails:
        fill["EMAIL"] = [{"VALUE": job.email, "VALUE_TYPE": "WORK"}]
    return fill


def _filled(contact: Found, fill: Mapping[str, Any]) -> Found:
    names = {name: str(fill.get(name) or contact.names.get(name, "")) for name in _NAMES}
    phones = contact.phones | {str(i["VALUE"]) for i in fill.get("PHONE", [])}
    emails = contact.emails | {str(i["VALUE"]).casefold() for i in fill.get("EMAIL", [])}
    return Found(contact.id, names, frozenset(phones), frozenset(emails))


def update_params(contact_id: int, fill: Mapping[str, Any]) -> dict[str, Any]:
    """`crm.contact.update` parameters; multifield rows without `ID` are added to the existing ones
    (b24restdocs api-reference/crm/contacts/crm-contact-update.md, "Working with Multiple Fields")."""
    return {"id": contact_id, "fields": dict(fill), "params": {"REGISTER_SONET_EVENT": "N"}}


# --- helpers -----------------------------------------------------------------------------------


def _multi_value(fields: Mapping[str, Any], name: str) -> str:
    items = fields.get(name)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return str(items[0].get("VALUE") or "")
    return ""


def _values(items: Any) -> list[str]:
    if not isinstance(items, list):
        return []
    return [str(i["VALUE"]) for i in items if isinstance(i, dict) and i.get("VALUE")]


def _unique(values: Iterable[str]) -> list[str]:
    seen: dict[str, str] = {}
    for value in values:
        if value and value.casefold() not in seen:
            seen[value.casefold()] = value
    return list(seen.values())


def request_fields(properties: Mapping[str, Any], default_region: str) -> dict[str, Any]:
    """`contact_fields` plus the responsible person; refuses an unknown `duplicates` value too."""
    fields = contact_fields(dict(properties), default_region)
    read_mode(properties)
    responsible = read_responsible(properties)
    if responsible is not None:
        fields["ASSIGNED_BY_ID"] = responsible
    return fields
