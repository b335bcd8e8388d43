"""What of the checkpoint's metadata `/v1/models` may show: no paths, no hosts.

The training run records where its data lay (`../shared/data/ferplus/train.npz`) and what it
ran on; neither is the client's business and a path tells an attacker about the layout. Keys
naming a host or machine are dropped, and paths inside text are cut to their file name.
"""

from __future__ import annotations

import re
from typing import Any

_PRIVATE_KEYS = re.compile(r"host|machine|node|user|trained_on|path|dir", re.IGNORECASE)
# A path: rooted (/x, ./x, ../x, ~/x, C:\\x) or of three parts or more (a/b/c); "x/y" is prose.
_PATH = re.compile(
    r"(?:(?<![\w.-])(?:\.{1,2}|~|[A-Za-z]:)?[/\\]|[\w.-]+[/\\][\w.-]+[/\\])(?:[\w.-]+[/\\])*([\w.-]*)"
)


def public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    public: dict[str, Any] = {}
    for key, value in metadata.items():
        if _PRIVATE_KEYS.search(key):
            continue
        public[key] = _PATH.sub(lambda m: m.group(1) or "-", value) if isinstance(value, str) else value
    return public
