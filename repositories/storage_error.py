"""The one error every durable store raises when its storage fails (mapped to 503 `storage_error`)."""


class StorageError(Exception):
    """Storage cannot do what was asked (full disk, read-only, locked, corrupt).

    The message is a sentence an operator can act on: it names the file (or database) and the
    cause. `main.register_exception_handlers` turns it into 503 `storage_error`.
    """
