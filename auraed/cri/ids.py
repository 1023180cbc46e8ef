"""How kubelet and crictl name sandboxes and containers: by id, or by a unique prefix of one
(crictl shows truncated ids), and by label selectors."""

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def by_id(items: Mapping[str, T], wanted: str) -> T | None:
    """The item with id `wanted`, else the only one whose id starts with it; None otherwise."""
    found = items.get(wanted)
    if found is None and wanted:
        matches = [item for key, item in items.items() if key.startswith(wanted)]
        found = matches[0] if len(matches) == 1 else None
    return found


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
