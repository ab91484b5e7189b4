"""Tokens at rest: with `TOKEN_ENCRYPTION_KEY`, the secret fields of a token record are encrypted.

Fernet (AES-128-CBC with HMAC-SHA256, from `cryptography`) authenticates what it decrypts, so a
wrong key is told apart from a right one, never silently producing garbage. Encrypted values carry
a prefix; a plain value (stored before the key was set) is still read, and is encrypted at the next
write. Without a key, records are stored as they always were, and an encrypted one is refused.
Make a key: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"
"""

from typing import Any

from cryptography.fernet import Fernet, InvalidToken

SECRET_FIELDS = ("access_token", "refresh_token", "application_token")
PREFIX = "fernet:"


class TokenKeyError(ValueError):
    """The stored tokens cannot be read with the configured key (or without one)."""


class TokenCipher:
    def __init__(self, key: str | None) -> None:
        try:
            self._fernet = Fernet(key.encode()) if key else None
        except ValueError as exc:
            raise TokenKeyError(
                "TOKEN_ENCRYPTION_KEY is not a Fernet key (32 url-safe base64-encoded bytes); make one"
                ' with: python -c "from cryptography.fernet import Fernet;'
                ' print(Fernet.generate_key().decode())"'
            ) from exc

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as stored: its secret fields encrypted when a key is set."""
        if self._fernet is None:
            return record
        sealed = dict(record)
        for name in SECRET_FIELDS:
            value = sealed.get(name)
            if isinstance(value, str) and value:
                sealed[name] = PREFIX + self._fernet.encrypt(value.encode()).decode()
        return sealed

    def open(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as stored, made readable; TokenKeyError when the key does not fit."""
        opened = dict(record)
        for name in SECRET_FIELDS:
            value = opened.get(name)
            if isinstance(value, str) and value.startswith(PREFIX):
                opened[name] = self._decrypt(value[len(PREFIX) :])
        return opened

    def _decrypt(self, token: str) -> str:
        if self._fernet is None:
            raise TokenKeyError(
                "The stored tokens are encrypted, and TOKEN_ENCRYPTION_KEY is not set: set the key they"
                " were stored with and restart"
            )
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise TokenKeyError(
                "TOKEN_ENCRYPTION_KEY does not decrypt the stored tokens (a different key wrote them):"
                " set the key they were stored with and restart"
            ) from None
