"""Reading a search space file's YAML: UTF-8, duplicate keys refused, YAML 1.2 exponent floats and no
base-60 integers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["read_yaml"]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"key {key!r} appears twice")
        self.key, self.first_line, self.line = key, first_line, line


class _SpaceLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently), and reads
    exponent floats without a dot (``1e-4``) as numbers, as YAML 1.2 does, not as strings."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in from an anchor may be overridden; that is what << is for
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader refuses it with its own error
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# YAML 1.1 reads 2:4 as a base-60 integer (124); YAML 1.2 has no base-60 numbers, and a sparsity
# pattern such as 2:4 must stay the text it looks like.
_INT = "tag:yaml.org,2002:int"
_SpaceLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
    for first, resolvers in _SpaceLoader.yaml_implicit_resolvers.items()
}
_SpaceLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def read_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Search space file {path} cannot be read ({exc.strerror or exc}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Search space file {path} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start} "
            "cannot be decoded); a search space is a YAML file saved as UTF-8."
        ) from None
    try:
        return yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(
            f"Search space file {path}: key {exc.key!r} appears twice (line {exc.first_line} and line {exc.line}); "
            "each key may be given once in a mapping."
        ) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"Search space file {path} is not valid YAML: {detail}") from None
    except RecursionError:
        raise ConfigError(f"Search space file {path} is not a usable YAML file: it nests too deeply.") from None
