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


def robot_fields(settings: Settings) -> dict[str, Any]:
    """Every field of the robot except `CODE` (which `bizproc.robot.update` takes separately)."""
    return {
        "HANDLER": settings.robot_handler_url,
        "USE_SUBSCRIPTION": "Y",
        "NAME": {"ru": "Создать контакт", "en": "Create contact"},
        "DESCRIPTION": {
            "ru": "Создает контакт CRM и возвращает его ID",
            "en": "Creates a CRM contact and returns its ID",
        },
        "PROPERTIES": {
            key: {"Name": {"ru": ru, "en": en}, "Type": "string", "Required": "N", "Multiple": "N"}
            for key, (ru, en) in _INPUTS.items()
        },
        "RETURN_PROPERTIES": {
            "contact_id": {"Name": {"ru": "ID контакта", "en": "Contact ID"}, "Type": "int", "Multiple": "N"},
            "error": {"Name": {"ru": "Ошибка", "en": "Error"}, "Type": "string", "Multiple": "N"},
        },
    }
