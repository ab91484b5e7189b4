"""Which language each portal speaks, for the messages its workflows get."""

from repositories.token_store import TokenStore, TokenStoreError
from services.messages import Lang, choose


class PortalLanguages:
    """The stored portal language (`LANGUAGE_ID` of the install), else the `DEFAULT_LANGUAGE` setting."""

    def __init__(self, tokens: TokenStore, default: str) -> None:
        self._tokens = tokens
        self._default = default

    async def of(self, member_id: str) -> Lang:
        try:
            record = await self._tokens.get(member_id)
        except TokenStoreError:
            record = None  # the worker reports the store's failure itself; the message still goes out
        return choose(record.language if record else None, None, self._default)
