"""The status page's words in Russian and English (the templates look them up with `t(key)`)."""

from services.messages import Lang

PAGE_TEXT: dict[str, dict[Lang, str]] = {
    "title": {"en": "Bitrix24 contact robot", "ru": "Робот «Создать контакт» для Битрикс24"},
    "missing_settings": {
        "en": "Missing settings: {names}. Set them in .env (beside start.sh) and restart the app.",
        "ru": "Не заданы настройки: {names}. Укажите их в файле .env (рядом со start.sh) "
        "и перезапустите приложение.",
    },
    "settings_complete": {"en": "Settings complete.", "ru": "Все настройки заданы."},
    "handler": {"en": "Robot handler", "ru": "Обработчик робота"},
    "warn_dotless_host": {
        "en": "This address cannot work: the host “{host}” has no domain, so Bitrix24's servers cannot "
        "find it. Set APP_BASE_URL to the app's public https address, restart, and reinstall the app.",
        "ru": "Этот адрес не будет работать: у хоста «{host}» нет домена, серверы Битрикс24 его не найдут. "
        "Укажите в APP_BASE_URL публичный https-адрес приложения, перезапустите его и переустановите.",
    },
    "warn_private_address": {
        "en": "This address cannot work: {host} is a private address that Bitrix24's servers cannot reach "
        "(unless the portal is self-hosted in the same network). Set APP_BASE_URL to the app's public "
        "https address, restart, and reinstall the app.",
        "ru": "Этот адрес не будет работать: {host} — внутренний адрес, серверы Битрикс24 до него не "
        "достучатся (если только портал не коробочный в той же сети). Укажите в APP_BASE_URL публичный "
        "https-адрес приложения, перезапустите его и переустановите.",
    },
    "warn_plain_http": {
        "en": "Plain http: robot calls and their tokens travel unencrypted. Put the app behind https and "
        "set APP_BASE_URL to the https address.",
        "ru": "Обычный http: вызовы робота и их токены передаются без шифрования. Поставьте приложение "
        "за https и укажите https-адрес в APP_BASE_URL.",
    },
    "warn_port_mismatch": {
        "en": "This address cannot work: it names port {url_port}, but the app listens on port "
        "{listen_port}. Make APP_BASE_URL and PORT agree, restart, and reinstall the app.",
        "ru": "Этот адрес не будет работать: в нём порт {url_port}, а приложение слушает порт "
        "{listen_port}. Согласуйте APP_BASE_URL и PORT, перезапустите приложение и переустановите его.",
    },
    "connection": {"en": "Portal", "ru": "Портал"},
    # What /health concludes (services/health.py); its reasons are shown as /health gives them.
    "health_ok": {
        "en": "Health: ok. The app accepts robot calls and finishes them.",
        "ru": "Состояние: ok. Приложение принимает вызовы робота и выполняет их.",
    },
    "health_degraded": {
        "en": "Health: degraded. The app accepts robot calls but cannot finish them now:",
        "ru": "Состояние: degraded. Приложение принимает вызовы робота, но сейчас не может их выполнить:",
    },
    "health_down": {
        "en": "Health: down. The app cannot accept robot calls:",
        "ru": "Состояние: down. Приложение не может принимать вызовы робота:",
    },
    "installed_disconnected": {
        "en": "A portal is installed, but none accepts the app's tokens: the portal's next robot call "
        "reconnects it, or open /oauth/login.",
        "ru": "Портал установлен, но не принимает токены приложения: следующий вызов робота с портала "
        "подключит его снова, или откройте /oauth/login.",
    },
    "renamed_from": {"en": "Renamed from", "ru": "Прежний адрес"},
    "no_portal": {
        "en": "No portal connected yet: install the app in the portal.",
        "ru": "Портал ещё не подключён: установите приложение на портале.",
    },
    "connected_robot_ok": {
        "en": "A portal is connected; the robot is registered.",
        "ru": "Портал подключён, робот зарегистрирован.",
    },
    "connected_robot_missing": {
        "en": "A portal is connected, but the robot is not registered: install the app again.",
        "ru": "Портал подключён, но робот не зарегистрирован: переустановите приложение.",
    },
    "disconnected": {
        "en": "The portal no longer accepts the app's tokens: the portal's next robot call reconnects "
        "it, or open /oauth/login.",
        "ru": "Портал больше не принимает токены приложения: следующий вызов робота с портала "
        "подключит его снова, или откройте /oauth/login.",
    },
    "portal": {"en": "Portal", "ru": "Портал"},
    "access_token": {"en": "Access token", "ru": "Токен доступа"},
    "valid_for": {"en": "valid for {left} more", "ru": "действует ещё {left}"},
    "expired_renews": {
        "en": "expired; renewed with the next REST call",
        "ru": "истёк; будет обновлён при следующем запросе к REST",
    },
    "refresh_token": {"en": "Refresh token", "ru": "Токен обновления"},
    "refresh_age": {
        "en": "issued {age} ago; {left} left of its 180 days (each use renews it)",
        "ru": "выдан {age} назад; осталось {left} из 180 дней (каждое обновление выдаёт новый)",
    },
    "refresh_age_unknown": {"en": "held; issue date unknown", "ru": "есть; дата выдачи неизвестна"},
    "no_refresh_token": {
        "en": "none: reinstall the app or open /oauth/login",
        "ru": "нет: переустановите приложение или откройте /oauth/login",
    },
    "robot_checked": {"en": "Robot last checked", "ru": "Робот проверен"},
    "never": {"en": "never", "ru": "ни разу"},
    "queue": {"en": "Robot calls", "ru": "Вызовы робота"},
    "outcome_created": {"en": "Contact created", "ru": "Контакт создан"},
    "outcome_answered_error": {
        "en": "Answered with an error (bad data)",
        "ru": "Ответ с ошибкой (неверные данные)",
    },
    "outcome_failed": {"en": "Failed", "ru": "Сбой"},
    "outcome_abandoned": {"en": "Workflow gone", "ru": "Процесс завершён без ответа"},
    "outcome_pending": {"en": "Pending", "ru": "В очереди"},
    "oldest": {"en": "oldest {age}", "ru": "самый старый {age}"},
    "runs": {"en": "Last robot runs", "ru": "Последние запуски робота"},
    "no_runs": {"en": "None yet.", "ru": "Запусков ещё не было."},
    "job": {"en": "Job", "ru": "Задание"},
    "accepted": {"en": "Accepted", "ru": "Принят"},
    "document": {"en": "Document", "ru": "Документ"},
    "outcome": {"en": "Outcome", "ru": "Итог"},
    "contact": {"en": "Contact", "ru": "Контакт"},
    "error": {"en": "Error", "ru": "Ошибка"},
    "state_created": {"en": "contact created", "ru": "контакт создан"},
    "state_answered_error": {"en": "answered with an error", "ru": "ответ с ошибкой"},
    "state_failed": {"en": "failed", "ru": "сбой"},
    "state_abandoned": {"en": "workflow gone", "ru": "процесс не ждёт ответа"},
    "state_pending": {"en": "pending", "ru": "в очереди"},
    "open_from_portal": {
        "en": "Open the app from your Bitrix24 portal to see its portal and the last robot runs.",
        "ru": "Откройте приложение на портале Битрикс24, чтобы увидеть портал и последние запуски робота.",
    },
    "times_in": {"en": "Times are in {zone}.", "ru": "Время указано в {zone}."},
    "installed": {
        "en": "Installed on {domain}. The robot “Create contact” is registered.",
        "ru": "Приложение установлено на {domain}. Робот «Создать контакт» зарегистрирован.",
    },
    "installed_robot_pending": {
        "en": "Installed on {domain}. The robot “Create contact” is being registered: the portal did "
        "not answer in time, the app keeps trying.",
        "ru": "Приложение установлено на {domain}. Робот «Создать контакт» регистрируется: портал "
        "не ответил вовремя, приложение продолжает попытки.",
    },
    "installed_title": {"en": "Bitrix24 robot installed", "ru": "Робот для Битрикс24 установлен"},
}

_UNITS: dict[str, dict[Lang, tuple[str, ...]]] = {
    "day": {"en": ("day", "days"), "ru": ("день", "дня", "дней")},
    "h": {"en": ("h",), "ru": ("ч",)},
    "min": {"en": ("min",), "ru": ("мин",)},
    "s": {"en": ("s",), "ru": ("с",)},
}


def unit(lang: Lang, name: str, count: int) -> str:
    """`count` with its unit, plural as the language wants it (1 день, 2 дня, 5 дней)."""
    forms = _UNITS[name][lang]
    if len(forms) == 1:
        return f"{count} {forms[0]}"
    if lang == "en":
        return f"{count} {forms[0] if count == 1 else forms[1]}"
    last, tens = count % 10, count % 100
    if last == 1 and tens != 11:
        return f"{count} {forms[0]}"
    if 2 <= last <= 4 and not 12 <= tens <= 14:
        return f"{count} {forms[1]}"
    return f"{count} {forms[2]}"
