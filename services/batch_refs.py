"""Values that `batch` would rewrite: such commands are sent on their own instead.

The portal's core (`CRestUtil::processBatchStructure` / `processBatchElement` in
`rest/classes/general/rest_util.php`, as quoted in public mirrors of the core) scans every
parameter value of every command in a `batch` for `$result`, `$error`, `$time`, `$next` or
`$total` (case-insensitively) followed by non-space text holding a `[...]` key, and replaces it
with what earlier commands returned (or with nothing useful). There is no escape. A contact
named `$result[x]`, or an error message that quotes one, would reach the CRM or the workflow
altered; outside `batch` the portal takes the value as it is.
"""

import re
from collections.abc import Mapping
from typing import Any

# `\$(result|next|total|time|error)([^\s]*)` in the core, acting only when the path holds a `[key]`.
_REFERENCE = re.compile(r"\$(?:result|error|time|next|total)\S*?\[[^\]\s]+\]", re.IGNORECASE)


def has_batch_reference(value: Any) -> bool:
    """Whether any key or value in `value` (nested) is something `batch` would substitute."""
    if isinstance(value, str):
        return "$" in value and _REFERENCE.search(value) is not None
    if isinstance(value, Mapping):
        return any(has_batch_reference(str(key)) or has_batch_reference(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(has_batch_reference(item) for item in value)
    return False
