"""Container health check: exit 0 when the service answers 200 on a health route, 1 otherwise.

Used by the images' HEALTHCHECK and compose's healthcheck; the images carry no curl. Reads the
port the service was told to use (FERMAM_PORT), so changing it needs no second setting.

    python healthcheck.py [/readyz | /livez]
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    route = argv[0] if argv else "/readyz"
    url = f"http://127.0.0.1:{os.environ.get('FERMAM_PORT', '8000')}{route}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
