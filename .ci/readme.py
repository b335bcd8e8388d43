"""The README's commands, read from the README itself, so CI runs exactly what users copy.

    python3 .ci/readme.py serve|test|example

serve: the first bash block under "## Set up" (install and start the service); test: the second
(install and run the tests); example: the first bash block under "## Example" (the curl call).
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def bash_blocks(section: str) -> list[str]:
    """The bash blocks of one `## section`, in order, backslash-continued lines joined."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if match is None:
        raise SystemExit(f"README.md has no section '## {section}'")
    return [block.replace("\\\n", " ").strip() for block in BLOCK.findall(match.group(1))]


def command(which: str) -> str:
    if which == "serve":
        return bash_blocks("Set up")[0]
    if which == "test":
        return bash_blocks("Set up")[1]
    if which == "example":
        return bash_blocks("Example")[0]
    raise SystemExit(f"unknown command {which!r}: serve, test or example")


if __name__ == "__main__":
    print(command(sys.argv[1]))
