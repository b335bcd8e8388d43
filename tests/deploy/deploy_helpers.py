"""Readers shared by the deployment checks: repository paths, Compose-flavoured YAML, the
service's settings variables, and the series names /metrics exposes."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared"
FERMAM_PREFIX = "FERMAM_"

# Compose's `${NAME}`, `${NAME:-default}`, `${NAME-default}` (and `$$` for a literal dollar).
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<sep>:?-)(?P<default>[^}]*))?\}")


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus Compose's merge tags (`!reset`, `!override`), read as their plain value."""


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)


def load_compose(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        return yaml.load(handle, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def tagged_paths(path: Path, tag: str) -> set[tuple[str, ...]]:
    """Key paths (e.g. ("services", "fermam", "build", "args")) whose value carries `tag`."""
    found: set[tuple[str, ...]] = set()

    def walk(node: yaml.Node, where: tuple[str, ...]) -> None:
        if node.tag == tag:
            found.add(where)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, (*where, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                walk(value, (*where, str(index)))

    with path.open(encoding="utf-8") as handle:
        walk(yaml.compose(handle, Loader=ComposeLoader), ())
    return found


def interpolate(value: object, environment: Mapping[str, str] | None = None) -> str:
    """A Compose value as Compose would pass it, with host variables from `environment`."""
    environment = environment or {}

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, separator, default = match["name"], match["sep"], match["default"] or ""
        if name in environment and (environment[name] or separator != ":-"):
            return environment[name]
        return default if separator else ""

    return _INTERPOLATION.sub(replace, str(value))


def load_yaml_documents(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def settings_fields() -> set[str]:
    """Every environment variable the service reads: FERMAM_ + each Settings field, upper-case."""
    from service.settings import Settings

    return {FERMAM_PREFIX + name.upper() for name in Settings.model_fields}


def exposed_series() -> set[str]:
    """Every series name the service's /metrics can carry, from its own registry's families."""
    from service.metrics import ServiceMetrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in ServiceMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


_SERIES_NAME = re.compile(r"\bfermam_[a-z0-9_]+\b")


def fermam_series_in(text: str) -> set[str]:
    """Names of fermam_* series a PromQL expression (or any text) mentions."""
    return set(_SERIES_NAME.findall(text))


def dockerfile_commands(path: Path) -> Iterator:
    """The Dockerfile's instructions as read by BuildKit's own parser."""
    import dockerfile

    yield from dockerfile.parse_file(str(path))
