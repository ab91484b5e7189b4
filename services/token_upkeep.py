"""Keeps the stored tokens alive while no robot runs: renews aging refresh tokens and saves kept pairs.

A refresh token dies 180 days after it was issued ("The lifetime of `refresh_token` is 180 days";
"it is enough to request a new pair of tokens once every 180 days so that the retained
authorization does not expire": b24restdocs `settings/oauth/auto-renewal.md`). A robot that runs
twice a year would find it dead, so every `TOKEN_RENEW_AFTER_SECONDS` (30 days by default, far from
the hourly or daily renewal the same page warns against) the pair is renewed through
`BitrixClient.renew`, under the cross-process refresh lock: with `--workers N` each process checks,
and the ones that come second find the pair already renewed and send nothing.
"""

import asyncio
import logging
from contextlib import suppress

from config import Settings
from repositories.token_store import TokenStore, TokenStoreError
from services.bitrix_client import BitrixClient, BitrixError

logger = logging.getLogger(__name__)

_FLUSH_SECONDS = 1.0  # how often a pair the disk refused is offered to it again
_MAX_CHECK_SECONDS = 3600.0


class TokenUpkeep:
    """Runs until cancelled; failures are logged, never fatal."""

    def __init__(self, tokens: TokenStore, bitrix: BitrixClient, settings: Settings) -> None:
        self._tokens = tokens
        self._bitrix = bitrix
        self._renew_after = settings.token_renew_after_seconds
        self._check_every = min(_MAX_CHECK_SECONDS, self._renew_after / 4)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time()
        try:
            while True:
                try:
                    await self._flush()
                    if loop.time() >= next_check:
                        next_check = loop.time() + self._check_every
                        await self.renew_aging()
                except Exception:
                    logger.exception("Token upkeep failed; trying again shortly")
                await asyncio.sleep(min(_FLUSH_SECONDS, self._check_every))
        finally:
            await self._last_flush()

    async def _last_flush(self) -> None:
        await self._flush()
        for member_id, error in self._tokens.unsaved().items():
            logger.error(
                "Shutting down with the newest tokens of portal %s unsaved (%s): they are lost; the "
                "portal's next robot call reconnects it, or open /oauth/login.",
                member_id,
                error,
            )

    async def _flush(self) -> None:
        if not self._tokens.unsaved():
            return
        # Logged when the pair was kept; /health shows it until it is saved.
        with suppress(TokenStoreError):
            await self._tokens.flush()

    async def renew_aging(self) -> None:
        """Refresh every working pair whose refresh token is older than `TOKEN_RENEW_AFTER_SECONDS`."""
        try:
            records = await self._tokens.list()
        except TokenStoreError as exc:
            logger.warning("Cannot check the tokens' age: %s", exc)
            return
        for record in records:
            if not record.works or record.refresh_age() < self._renew_after:
                continue
            logger.info("Renewing the refresh token of portal %s before it expires", record.domain)
            try:
                await self._bitrix.renew(record.member_id, record.access_token)
            except (BitrixError, TokenStoreError) as exc:
                logger.warning("Renewing the refresh token of portal %s failed: %s", record.domain, exc)
