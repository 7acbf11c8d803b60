"""Read a YAML document strictly: a key given twice is an error, not a silent last-wins.

Imported only when a file is read: PyYAML costs about 1.7 MiB of memory, which an
exporter configured by flags alone never needs to pay.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml import YAMLError

__all__ = ["DuplicateKeyError", "YAMLError", "load"]


class DuplicateKeyError(YAMLError):
    """A mapping gives `key` twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in keys:
            raise DuplicateKeyError(str(key))
        keys.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load(text: str) -> Any:
    """The document `text` holds; DuplicateKeyError or another YAMLError when it is not valid."""
    return yaml.load(text, Loader=_StrictLoader)
