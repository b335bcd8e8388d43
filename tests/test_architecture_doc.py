"""docs/architecture.md lists every module of model/, service/ and the Python client, and names none
that is gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
SECTION = re.compile(r"^## `([\w/]+/)`", re.M)
# The names before a bullet's first colon: "- `a.py`, `b.py`: what they are for".
ENTRY = re.compile(r"^- ((?:`[^`]+`(?:, )?)+):", re.M)


def documented() -> dict[str, set[str]]:
    """Folder -> the file and folder names its section lists."""
    text = DOC.read_text(encoding="utf-8")
    heads = list(SECTION.finditer(text))
    sections = {}
    for index, head in enumerate(heads):
        end = heads[index + 1].start() if index + 1 < len(heads) else len(text)
        body = text[head.end() : end]
        names = {name for entry in ENTRY.findall(body) for name in re.findall(r"`([^`]+)`", entry)}
        sections[head.group(1)] = names
    return sections


def test_every_module_is_listed_and_every_listed_file_exists() -> None:
    sections = documented()
    # The client's folders by name: a `pip install ./clients/python` leaves a build/ copy beside them.
    packages = {
        f"{path.parent.relative_to(REPO).as_posix()}/"
        for root in ("model", "service", "clients/python/fermam_client", "clients/python/examples")
        for path in (REPO / root).rglob("*.py")
        if path.name != "__init__.py"
    }
    assert set(sections) == packages, "one section per folder that holds modules"
    for folder, names in sections.items():
        missing = [name for name in names if not (REPO / folder / name).exists()]
        assert not missing, f"{folder}: no such file {missing}"
        modules = {p.name for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        assert modules <= names, f"{folder}: not described {sorted(modules - names)}"
