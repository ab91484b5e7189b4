"""What the app tells people, in Russian and English: the workflow's `error` and `LOG_MESSAGE`.

Every message names the cause and what to do about it. The language is the portal's: `LANG` of the
frame POST or `data[LANGUAGE_ID]` of `ONAPPINSTALL` (b24restdocs `settings/oauth/simple-way.md`,
`api-reference/common/events/on-app-install.md`), stored on the portal's record. Russian for a
Russian portal, English for every other.
"""

from typing import Literal

Lang = Literal["ru", "en"]
LANGUAGES: tuple[Lang, ...] = ("ru", "en")

_CATALOGUE: dict[str, dict[Lang, str]] = {
    "no_name": {
        "en": "Neither a last name nor a first name was given; "
        "fill in at least one of them in the robot's settings.",
        "ru": "Не указаны ни фамилия, ни имя: заполните хотя бы одно из этих полей в настройках робота.",
    },
    "phone_unparseable": {
        "en": "The phone {raw} is not a phone number; correct the phone in the robot's settings "
        "or in the document it comes from.",
        "ru": "Телефон {raw} не похож на номер телефона: исправьте телефон в настройках робота "
        "или в документе, из которого он берётся.",
    },
    "phone_letters": {
        "en": "The phone {raw} has letters where digits belong; correct the phone in the robot's settings "
        "or in the document it comes from.",
        "ru": "В телефоне {raw} буквы вместо цифр: исправьте телефон в настройках робота "
        "или в документе, из которого он берётся.",
    },
    "phone_invalid": {
        "en": "The phone {raw} is not a valid phone number (numbers without a country code are read "
        "as {region}); write it with its country code, e.g. +7 999 123-45-67.",
        "ru": "Телефон {raw} не является действительным номером (номера без кода страны читаются "
        "как {region}); укажите номер с кодом страны, например +7 999 123-45-67.",
    },
    "email_invalid": {
        "en": "The e-mail {raw} is not a valid address: {reason} Correct the e-mail in the robot's "
        "settings or in the document it comes from.",
        "ru": "E-mail {raw} не является правильным адресом: исправьте e-mail в настройках робота "
        "или в документе, из которого он берётся.",
    },
    "name_control": {
        "en": "The {field} contains control characters; correct it in the robot's settings.",
        "ru": "Поле «{field}» содержит управляющие символы: исправьте его в настройках робота.",
    },
    "name_too_long": {
        "en": "The {field} is longer than {limit} characters; shorten it in the robot's settings.",
        "ru": "Поле «{field}» длиннее {limit} символов: сократите его в настройках робота.",
    },
    "last_name": {"en": "last name", "ru": "Фамилия"},
    "first_name": {"en": "first name", "ru": "Имя"},
    "second_name": {"en": "second name", "ru": "Отчество"},
    "not_in_time": {
        "en": "The contact could not be created in time: {reason}. Check that the portal is reachable "
        "and the app's status page, then run the workflow again.",
        "ru": "Контакт не удалось создать вовремя: {reason}. Проверьте доступность портала и страницу "
        "состояния приложения, затем запустите бизнес-процесс снова.",
    },
    "no_answer": {"en": "the portal did not answer", "ru": "портал не ответил"},
    "not_created": {
        "en": "The contact was not created: {detail}. {hint}",
        "ru": "Контакт не создан: {detail}. {hint}",
    },
    "portal_refused": {
        "en": "The portal refused to create the contact: {detail}. Check the robot's values and the "
        "CRM's required contact fields.",
        "ru": "Портал отказался создать контакт: {detail}. Проверьте значения робота и обязательные "
        "поля контакта в CRM.",
    },
    "portal_refused_hint": {
        "en": "The portal refused to create the contact: {detail}. {hint}",
        "ru": "Портал отказался создать контакт: {detail}. {hint}",
    },
    "created": {"en": "Contact {contact_id} created", "ru": "Создан контакт {contact_id}"},
    # Find or create (issue 13; services/contact_matching.py)
    "duplicates_unknown": {
        "en": "The duplicates setting {raw} is unknown; "
        "choose create, reuse or update in the robot's settings.",
        "ru": "Значение {raw} настройки поиска дубликатов неизвестно: выберите create, reuse или update "
        "в настройках робота.",
    },
    "responsible_not_user": {
        "en": "The responsible person {raw} is not one user; "
        "choose a single employee in the robot's settings.",
        "ru": "Ответственный {raw} — не один пользователь: выберите одного сотрудника в настройках робота.",
    },
    "search_refused": {
        "en": "Existing contacts could not be searched: {detail}. {hint}",
        "ru": "Не удалось найти существующие контакты: {detail}. {hint}",
    },
    "found_by_phone": {
        "en": "Found contact {contact_id} by phone {value}",
        "ru": "Найден контакт {contact_id} по телефону {value}",
    },
    "found_by_email": {
        "en": "Found contact {contact_id} by email {value}",
        "ru": "Найден контакт {contact_id} по e-mail {value}",
    },
    "found_several": {
        "en": "; {count} contacts match, the oldest was taken",
        "ru": "; подходят контакты: {count}, взят самый старый",
    },
    "found_filled": {"en": "; filled in: {fields}", "ru": "; заполнены поля: {fields}"},
    "found_not_filled": {
        "en": "; its empty fields were not filled: {detail}",
        "ru": "; пустые поля не заполнены: {detail}",
    },
    # /health's reasons (services/health.py): English in /health, the page's language on the page.
    # A storage's own sentence (`detail`, `error`) is quoted as the log has it: it names the file
    # and the cause, and the README's troubleshooting table is searched by it.
    "health_journal_down": {
        "en": "{detail}",
        "ru": "Журнал заданий не принимает записи, поэтому вызовы робота не принимаются. "
        "Причина (как в журнале приложения): «{detail}»",
    },
    "health_token_store_down": {
        "en": "{detail}",
        "ru": "Токены порталов не читаются, поэтому вызовы робота нельзя проверить и принять. "
        "Причина (как в журнале приложения): «{detail}»",
    },
    "health_tokens_unsaved": {
        "en": "{error} The newest tokens of portal {domain} are kept in memory until the file can be "
        "written.",
        "ru": "Новые токены портала {domain} пока хранятся только в памяти: хранилище их не принимает. "
        "Освободите место или разрешите запись до перезапуска приложения. Причина: «{error}»",
    },
    "health_missing_settings": {
        "en": "Settings missing: {names}.",
        "ru": "Не заданы настройки: {names}.",
    },
    "health_no_portal": {
        "en": "No portal is installed: install the app in Bitrix24.",
        "ru": "Ни один портал не установил приложение: установите его в Битрикс24.",
    },
    "health_no_usable_tokens": {
        "en": "No usable tokens: open /oauth/login to authorize the app again.",
        "ru": "Нет рабочих токенов: откройте /oauth/login, чтобы снова авторизовать приложение.",
    },
    "health_failed_last_day": {
        "en": "{count} job(s) failed for good in the last 24 hours (log: 'Job N failed').",
        "ru": "Заданий, окончательно не выполненных за последние 24 часа: {count} "
        "(в журнале: 'Job N failed').",
    },
    "health_retrying": {
        "en": "{count} job(s) failed {attempts} or more attempts in a row and are retrying.",
        "ru": "Заданий, у которых не удались {attempts} и более попыток подряд (они повторяются): {count}.",
    },
}

# The Russian text of each client error's `admin_hint`, by class name (services/bitrix_errors.py).
_HINTS_RU: dict[str, str] = {
    "BitrixTransportError": "Портал недоступен: проверьте сеть между приложением и Битрикс24.",
    "BitrixAuthError": "Портал отклонил токен приложения: откройте /oauth/login, чтобы снова "
    "авторизовать приложение.",
    "BitrixAccessDenied": "Портал отказал в доступе: проверьте права приложения (crm, bizproc) "
    "и права пользователя.",
    "BitrixRateLimitError": "Превышен лимит запросов к REST портала; приложение повторяло попытки "
    "и сдалось. Запустите бизнес-процесс позже.",
    "BitrixServerError": "Портал ответил ошибкой сервера; приложение повторяло попытки и сдалось.",
    "OAuthInvalidGrant": "Refresh-токен больше не действует: откройте /oauth/login, чтобы снова "
    "авторизовать приложение.",
    "OAuthInvalidClient": "Сервер OAuth отклонил приложение: проверьте BITRIX_CLIENT_ID "
    "и BITRIX_CLIENT_SECRET.",
    "OAuthPaymentRequired": "Подписка приложения на портале закончилась: продлите её на портале.",
    "BitrixWrongAuthType": "Метод не принимает такой вид авторизации (нужен OAuth-контекст самого "
    "приложения); повторная авторизация не поможет.",
    "BitrixInvalidCredentials": "Пользователю портала, чьим токеном работает приложение, не хватает прав "
    "на этот метод: дайте ему права или переустановите приложение от имени администратора.",
    "BitrixUserInactive": "Пользователь, установивший приложение, деактивирован: переустановите "
    "приложение от имени активного администратора.",
    "BitrixAppNotInstalled": "Портал больше не знает это приложение (удалено, или BITRIX_CLIENT_ID "
    "принадлежит другому): установите его снова.",
    "BitrixConfirmationPending": "Администратор портала должен разрешить этот метод: подтвердите запрос "
    "приложения в уведомлениях портала; приложение продолжает попытки.",
    "BitrixConfirmationDenied": "Администратор портала запретил приложению этот метод: разрешите его "
    "на портале.",
    "BitrixPaymentRequired": "Закончилась подписка приложения или тариф портала: продлите на портале.",
    "BitrixScopeMissing": "Приложению не хватает прав: дайте ему права crm и bizproc в настройках "
    "приложения на портале и переустановите его (REST API также требует коммерческого тарифа).",
    "BitrixMethodLimited": "Исчерпан лимит времени портала на этот метод (OPERATION_TIME_LIMIT); "
    "приложение вызовет его снова, когда портал сбросит лимит.",
    "PortalMoved": "У портала новый адрес: смотрите в журнале приложения, какую настройку изменить.",
    "PortalNotConnected": "У приложения нет токенов этого портала: установите приложение "
    "или откройте /oauth/login.",
}
_HINT_RU_DEFAULT = "Проверьте портал и журнал приложения."


def text(lang: Lang, key: str, **params: object) -> str:
    """The message `key` in `lang`, with its parameters filled in."""
    return _CATALOGUE[key][lang].format(**params)


def hint(lang: Lang, error: BaseException) -> str:
    """What the administrator should do about a client error, in `lang`."""
    if lang == "en":
        return str(getattr(error, "admin_hint", "Check the portal and the app's log."))
    for cls in type(error).__mro__:
        if cls.__name__ in _HINTS_RU:
            return _HINTS_RU[cls.__name__]
    return _HINT_RU_DEFAULT


def portal_language(language_id: str | None) -> Lang | None:
    """`ru` for a Russian portal, `en` for any other; None when the portal did not say."""
    if not language_id or not language_id.strip():
        return None
    return "ru" if language_id.strip().lower() == "ru" else "en"


def from_accept_language(header: str | None) -> Lang | None:
    """The first of our languages the browser asks for (`ru-RU,ru;q=0.9,en;q=0.8` -> `ru`)."""
    ranked: list[tuple[float, int, Lang]] = []
    for index, part in enumerate((header or "").split(",")):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in LANGUAGES:
            continue
        quality = _quality(params)
        if quality > 0:
            ranked.append((-quality, index, "ru" if primary == "ru" else "en"))
    return min(ranked)[2] if ranked else None


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def choose(portal: str | None, accept_language: str | None, default: str) -> Lang:
    """The portal's language, then the browser's, then the `DEFAULT_LANGUAGE` setting."""
    return portal_language(portal) or from_accept_language(accept_language) or _setting(default)


def _setting(default: str) -> Lang:
    return "ru" if default.strip().lower() == "ru" else "en"
