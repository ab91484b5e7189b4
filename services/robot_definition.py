"""The robot as `bizproc.robot.add` registers it: inputs, outputs and names in Russian and English."""

from typing import Any

from config import Settings

_INPUTS = {
    "last_name": ("Фамилия", "Last name"),
    "first_name": ("Имя", "First name"),
    "second_name": ("Отчество", "Middle name"),
    "phone": ("Телефон", "Phone"),
    "email": ("Email", "Email"),
}

# Option keys are what the portal sends in `properties[duplicates]` (a select sends its key:
# bizproc/lib/basetype/select.php, externalizeValue); the labels are what the designer shows.
DUPLICATE_OPTIONS = {
    "create": {"ru": "Всегда создавать новый контакт", "en": "Always create a new contact"},
    "reuse": {"ru": "Вернуть найденный контакт", "en": "Return the existing contact"},
    "update": {
        "ru": "Вернуть найденный и дополнить его пустые поля",
        "en": "Return the existing contact and fill its empty fields",
    },
}


def _string_input(ru: str, en: str) -> dict[str, Any]:
    return {"Name": {"ru": ru, "en": en}, "Type": "string", "Required": "N", "Multiple": "N"}


def _more_inputs() -> dict[str, Any]:
    return {
        "duplicates": {
            "Name": {
                "ru": "Если контакт с таким телефоном или e-mail уже есть",
                "en": "If a contact with this phone or e-mail exists",
            },
            "Type": "select",
            # A select's option labels are plain strings (bizproc.robot.add), so both languages at once.
            "Options": {key: f"{names['en']} / {names['ru']}" for key, names in DUPLICATE_OPTIONS.items()},
            "Default": "create",
            "Required": "N",
            "Multiple": "N",
        },
        "responsible": {
            "Name": {"ru": "Ответственный", "en": "Responsible person"},
            "Type": "user",
            "Required": "N",
            "Multiple": "N",
        },
    }


def robot_fields(settings: Settings) -> dict[str, Any]:
    """Every field of the robot except `CODE` (which `bizproc.robot.update` takes separately)."""
    return {
        "HANDLER": settings.robot_handler_url,
        "USE_SUBSCRIPTION": "Y",
        "NAME": {"ru": "Создать контакт", "en": "Create contact"},
        "DESCRIPTION": {
            "ru": "Создает контакт CRM (или находит существующий) и возвращает его ID",
            "en": "Creates a CRM contact (or finds the existing one) and returns its ID",
        },
        "PROPERTIES": {
            **{key: _string_input(ru, en) for key, (ru, en) in _INPUTS.items()},
            **_more_inputs(),
        },
        "RETURN_PROPERTIES": {
            "contact_id": {"Name": {"ru": "ID контакта", "en": "Contact ID"}, "Type": "int", "Multiple": "N"},
            "error": {"Name": {"ru": "Ошибка", "en": "Error"}, "Type": "string", "Multiple": "N"},
            "duplicate": {
                "Name": {"ru": "Найден существующий (Y/N)", "en": "Existing contact found (Y/N)"},
                "Type": "string",
                "Multiple": "N",
            },
        },
    }
