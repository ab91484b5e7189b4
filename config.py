"""Application settings, read from the environment or a `.env` file in the working directory."""

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from repositories.token_cipher import TokenCipher


class Settings(BaseSettings):
    """Every setting the app reads; the README documents each one."""

    # hide_input_in_errors: a wrong DATABASE_URL or key must not print its password in the error.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    bitrix_client_id: str | None = None
    bitrix_client_secret: SecretStr | None = None
    app_base_url: str = "http://localhost:8000"
    bitrix_portal_url: str | None = None
    bitrix_oauth_url: str = "https://oauth.bitrix.info"
    token_file: Path = Path("tokens.json")
    robot_code: str = Field(default="create_contact", pattern=r"^[A-Za-z0-9._-]+$")
    log_level: str = "INFO"

    job_db_file: Path = Path("jobs.sqlite3")
    # postgresql://user:password@host:port/db: shared state for several instances (README "Several hosts")
    database_url: SecretStr | None = None
    token_encryption_key: SecretStr | None = None
    phone_default_region: str = "RU"
    rate_limit_burst: int = Field(default=50, ge=1)
    rate_limit_per_second: float = Field(default=2.0, gt=0)
    job_max_age_seconds: float = Field(default=604800.0, gt=0)
    job_lease_seconds: float = Field(default=60.0, gt=0)
    batch_linger_seconds: float = Field(default=0.05, ge=0)
    http_timeout_seconds: float = Field(default=30.0, gt=0)
    token_refresh_margin_seconds: float = Field(default=60.0, ge=0)
    body_timeout_seconds: float = Field(default=10.0, gt=0)
    # The status page's language when neither the portal nor the browser names one.
    default_language: Literal["en", "ru"] = "en"
    # Refresh tokens die 180 days after issue (b24restdocs settings/oauth/auto-renewal.md).
    token_renew_after_seconds: float = Field(default=30 * 86400.0, gt=0)
    install_timeout_seconds: float = Field(default=15.0, gt=0)

    @field_validator("app_base_url", "bitrix_oauth_url", "bitrix_portal_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("database_url")
    @classmethod
    def _database_is_postgres(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("DATABASE_URL must look like postgresql://user:password@host:port/db")
        return value

    @field_validator("token_encryption_key")
    @classmethod
    def _key_is_fernet(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        TokenCipher(value.get_secret_value().strip())  # raises TokenKeyError, which says how to make one
        return SecretStr(value.get_secret_value().strip())

    @field_validator("bitrix_portal_url")
    @classmethod
    def _portal_is_url(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("BITRIX_PORTAL_URL must start with https:// (or http://)")
        return value

    @property
    def robot_handler_url(self) -> str:
        return f"{self.app_base_url}/robot"

    @property
    def uninstall_handler_url(self) -> str:
        return f"{self.app_base_url}/uninstall"

    @property
    def update_handler_url(self) -> str:
        return f"{self.app_base_url}/update"

    @property
    def token_endpoint(self) -> str:
        return f"{self.bitrix_oauth_url}/oauth/token/"

    @property
    def portal_host(self) -> str | None:
        """Host (with port) of the configured portal, e.g. `example.bitrix24.ru`."""
        return _host(self.bitrix_portal_url) if self.bitrix_portal_url else None

    def missing(self) -> list[str]:
        """Names of the settings without which the portal cannot be connected."""
        names = {"BITRIX_CLIENT_ID": self.bitrix_client_id, "BITRIX_CLIENT_SECRET": self.bitrix_client_secret}
        return [name for name, value in names.items() if not value]

    def secret_values(self) -> list[str]:
        """Values that must never appear in a log line."""
        values = [self.bitrix_client_secret.get_secret_value()] if self.bitrix_client_secret else []
        if self.token_encryption_key:
            values.append(self.token_encryption_key.get_secret_value())
        if self.database_url:
            values.append(self.database_url.get_secret_value())
            password = urlsplit(self.database_url.get_secret_value()).password
            values += [password] if password else []
        return values


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests override this dependency."""
    return Settings()


@lru_cache(maxsize=64)
def _host(url: str) -> str:
    # Every robot call checks its portal against this: worked out once per URL, not per call.
    return urlsplit(url).netloc.lower()
