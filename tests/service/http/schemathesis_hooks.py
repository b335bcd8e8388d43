"""Schemathesis hooks for test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

In a multipart body an option mutated to an empty array is serialised as no field at all, which
is a valid request; schemathesis would still count its acceptance as a failure, so such
generated bodies are skipped. A JSON body sends `[]` as it is, and the server refuses it.
"""

from __future__ import annotations

import schemathesis


@schemathesis.hook
def filter_body(context, body) -> bool:
    if not isinstance(body, dict) or "images" in body:
        return True
    return not any(value == [] for key, value in body.items() if key != "files")
